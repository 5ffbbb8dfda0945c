"""The exportable network: images -> features -> log-likelihood maps -> anomaly map -> score.

:class:`CFlowNet` is a plain ``nn.Module`` whose ``forward`` is whole-tensor code
with no data-dependent Python control flow, so it traces and exports unchanged.
Every constant it uses (per-scale normalization, precomputed conditions) belongs
to the model, so an image's map never depends on the other images in its batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cflowad.method.config import Config
from cflowad.method.encoder import Encoder
from cflowad.method.flows import ConditionalFlow, positional_encoding
from cflowad.method.gaussian import GaussianDecoder
from cflowad.method.tiles import TileLayout, tile_layout

__all__ = ["REFERENCE_QUANTILE", "CFlowNet", "readable"]

# The quantile of held-out good log-likelihoods that normalizes each scale.
REFERENCE_QUANTILE = 0.999
# Input pixels of the tiles of one image encoded in one call of the encoder (16 tiles
# of 256 x 256): memory follows this and the batch, not the image.
TILE_GROUP_PIXELS = 2**20
# Exports encode up to this many groups of tiles as separate calls and more in a loop
# (ONNX Scan). ONNX Runtime runs the convolutions in a Scan's body several times slower
# (640 x 416 in 6 tiles: 226 against 47 ms an image; 88 tiles in 6 groups: 1.54 against
# 0.74 s), but an unrolled graph grows with the groups: a 20-megapixel input's 35
# groups ran out of 24 GB exporting.
UNROLLED_GROUPS = 8
# Precomputed condition terms above this many bytes (inputs of several megapixels) are
# computed as the flows go instead, POSITION_CHUNK positions at a time: 8 blocks'
# terms for a 20-megapixel input would take 4 GB.
CONDITION_BUDGET = 256 * 2**20
POSITION_CHUNK = 16384


class CFlowNet(nn.Module):
    """Frozen encoder plus one decoder per scale (a conditional flow, or the appendix's
    Gaussian model), with a bounded scale fusion.

    Each scale's log-likelihood per dimension ``l_k = log p_k / D_k`` becomes a
    likelihood before the scales meet, as in the paper: the term of scale k is

        a_k = 1 - exp(min(0, l_k - m_k)),

    with ``m_k`` the 99.9th percentile of ``l_k`` over held-out good images: the
    paper normalizes each scale's likelihood by its maximum over the test set; the
    held-out images' near-maximum is the same normalizer fitted on good images only,
    robust to one extreme position, and a constant of the model, so a map never
    depends on its batch. A scale whose good positions spread widely gets a small
    ``exp(l_k - m_k)`` on ordinary positions too, so its variations weigh less: a
    reliability weighting with no parameter. An unseen feature, however extreme its
    log-likelihood (the coarsest flow reaches -1e8 nats on unseen content), saturates
    at 1. The raw map is the mean of the upsampled terms, so it lies in [0, 1) and no
    scale can outweigh the others by magnitude: each contributes at most 1/K (with
    ``scale_weights``, a weighted mean: at most its share of the weights).

    The raw image score is the raw map's maximum, as in the paper (or the mean of
    its top ``score_top_k`` fraction). Scores and maps are then put on the readable
    scale of :mod:`cflowad.method.calibration`, where both thresholds sit at 0.5.
    """

    reference: Tensor
    image_threshold: Tensor
    pixel_threshold: Tensor
    region: Tensor | None

    def __init__(self, config: Config, encoder: Encoder) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.score_top_k = config.score_top_k
        self.scale_weights: list[float] = []
        self.set_scale_weights(config.scale_weights, len(config.strides))
        self.feature_pooling = config.feature_pooling
        self.encoder = encoder
        self.tiles: TileLayout | None = (
            None
            if config.tile_size is None
            else tile_layout(
                config.image_size, config.tile_size, config.tile_overlap, max(config.strides)
            )
        )
        self.feature_sizes = [
            (config.image_size[0] // s, config.image_size[1] // s) for s in encoder.strides
        ]
        if self.tiles is not None:  # where each stitched cell lies in the tiles' maps
            for k, stride in enumerate(encoder.strides):
                cells = torch.tensor(self.tiles.cells(stride))
                self.register_buffer(f"tile_cells_{k}", cells, persistent=False)
        self.decoders = nn.ModuleList(
            GaussianDecoder(dim, height * width)
            if config.decoder == "gaussian"
            else ConditionalFlow(
                dim,
                config.condition_dim,
                blocks,
                config.clamp_alpha,
                seed=config.seed + k,
            )
            for k, (dim, (height, width), blocks) in enumerate(
                zip(encoder.channels, self.feature_sizes, config.blocks_per_scale, strict=True)
            )
        )
        for k, (height, width) in enumerate(self.feature_sizes):
            code = positional_encoding(config.condition_dim, height, width)
            self.register_buffer(f"code_{k}", code.flatten(1).T.contiguous(), persistent=False)
            self.register_buffer(f"conditions_{k}", torch.empty(0), persistent=False)
        self.register_buffer("reference", torch.zeros(len(self.decoders)))
        self.register_buffer("image_threshold", torch.tensor(0.5))
        self.register_buffer("pixel_threshold", torch.tensor(0.5))
        # the inspection region at the input size (cflowad.method.region), kept in
        # model.json rather than the weights: None inspects everything
        self.register_buffer("region", None, persistent=False)

    @classmethod
    def build(cls, config: Config, pretrained: bool) -> CFlowNet:
        """The network for ``config``; the encoder gets ImageNet weights if ``pretrained``."""
        encoder = Encoder.create(
            config.backbone,
            config.strides,
            "pretrained" if pretrained else "random",
            config.weights_file,
            seed=config.seed,
        )
        return cls(config, encoder)

    def codes(self, k: int) -> Tensor:
        """Positional condition of scale k, (H_k * W_k, C) in row-major position order."""
        return getattr(self, f"code_{k}")

    @torch.no_grad()
    def refresh_conditions(self) -> None:
        """Precompute every block's condition term for the model's image size.

        Call after the decoder weights change (end of training, loading). Inputs too
        large for :data:`CONDITION_BUDGET` keep none: their flows compute the terms as
        they go (:meth:`scale_log_likelihood`).
        """
        terms = sum(
            decoder.condition_width * len(decoder.blocks) * self.codes(k).shape[0] * 4
            for k, decoder in enumerate(self.decoders)
            if isinstance(decoder, ConditionalFlow)
        )
        for k, decoder in enumerate(self.decoders):
            if isinstance(decoder, ConditionalFlow) and terms > CONDITION_BUDGET:
                setattr(self, f"conditions_{k}", torch.empty(0, device=self.reference.device))
            elif isinstance(decoder, ConditionalFlow):
                # Below 16 rows (a 4 x 4 map or smaller) BLAS picks its kernel by thread
                # count, and rounds differently on one thread (measured): padded, the
                # conditions and so the model are the same on any number of threads.
                codes = self.codes(k)
                rows = codes.shape[0]
                padded = torch.cat([codes, codes[-1:].expand(max(0, 16 - rows), -1)])
                setattr(self, f"conditions_{k}", decoder.condition(padded)[:, :rows].contiguous())

    def computed_codes(self) -> list[str]:
        """The buffers of positional codes whose flows compute their condition terms as
        they go (none kept by :meth:`refresh_conditions`): an export keeps them unfolded."""
        return [
            f"code_{k}"
            for k, decoder in enumerate(self.decoders)
            if isinstance(decoder, ConditionalFlow) and not getattr(self, f"conditions_{k}").numel()
        ]

    def decoder(self, k: int) -> ConditionalFlow:
        """The flow of scale k (typed: ``nn.ModuleList`` items are plain modules)."""
        decoder = self.decoders[k]
        if not isinstance(decoder, ConditionalFlow):
            raise TypeError(f"scale {k} has a {type(decoder).__name__}, not a flow")
        return decoder

    def encode(self, images: Tensor, min_batch: int = 1) -> list[Tensor]:
        """The encoder's features [(B, D_k, H_k, W_k)] of (B, 3, H, W) inputs: in one
        pass, or with tiles (:mod:`cflowad.method.tiles`) stitched from what each tile
        owns. Every call of the encoder gets at least ``min_batch`` images (repeats of
        the last), which makes it round the same way on any number of threads
        (:func:`cflowad.method.train.training_features`).
        """
        if self.tiles is None:
            return self._encode_batch(images, min_batch)
        layout, batch = self.tiles, images.shape[0]
        height, width = layout.size
        # (B, 3, h, w) each, tiles row-major: slices of each row's strip. An exported
        # graph keeps few slices: onnxscript's optimizer tries every pair of them.
        strips = [images[:, :, row.start : row.start + height] for row in layout.rows]
        crops = [
            strip[:, :, :, column.start : column.start + width]
            for strip in strips
            for column in layout.columns
        ]
        group = max(1, TILE_GROUP_PIXELS // (height * width))
        if min_batch > 1:  # training asks for min_batch inputs a call: tiles, not padding
            group = max(group, -(-min_batch // batch))
        if torch.compiler.is_exporting() and -(-len(crops) // group) > UNROLLED_GROUPS:
            encoded = self._encode_in_loop(torch.stack(crops), group)
        else:  # (tiles * B, D_k, h_k, w_k) per scale
            per_group = [
                self._encode_batch(torch.cat(crops[first : first + group]), min_batch)
                for first in range(0, len(crops), group)
            ]
            encoded = [torch.cat(scale) for scale in zip(*per_group, strict=True)]
        stitched = []
        for k, (f, (rows, columns)) in enumerate(zip(encoded, self.feature_sizes, strict=True)):
            # (tiles * B, D, h, w) -> (B * D, tiles * h * w) -> each cell from the tile that
            # owns it: one gather (the reshape keeps the batch apart from what it merges,
            # which OpenVINO's CPU plugin needs with a dynamic batch)
            dim = f.shape[1]
            laid = f.reshape(len(crops), -1, f.shape[2] * f.shape[3]).transpose(0, 1)
            cells = laid.reshape(laid.shape[0], -1).index_select(1, self.tile_cells(k))
            stitched.append(cells.view(batch, dim, rows, columns))
        return stitched

    def tile_cells(self, k: int) -> Tensor:
        """:meth:`TileLayout.cells` of scale k (a buffer, on the model's device)."""
        return getattr(self, f"tile_cells_{k}")

    def _encode_in_loop(self, tiles: Tensor, group: int) -> list[Tensor]:
        """The encoder over (tiles, B, 3, h, w) ``group`` tiles at a time, as one loop
        in an exported graph (ONNX Scan): the graph holds the encoder once, not once per
        group, and memory follows the group, as in PyTorch (for more than
        :data:`UNROLLED_GROUPS` groups)."""
        # torch.onnx's exporter turns this loop, and no other, into ONNX Scan
        from torch._higher_order_ops.scan import scan

        count, batch = tiles.shape[0], tiles.shape[1]
        steps = -(-count // group)
        padded = torch.cat([tiles, tiles[-1:].expand(steps * group - count, *tiles.shape[1:])])
        groups = padded.reshape(steps, group * batch, *tiles.shape[2:])

        def step(carry: Tensor, images: Tensor) -> tuple[Tensor, list[Tensor]]:
            return carry.clone(), self.encoder(images)

        _, encoded = scan(step, torch.zeros(()), groups)
        return [f.flatten(0, 1)[: count * batch] for f in encoded]

    def _encode_batch(self, images: Tensor, min_batch: int) -> list[Tensor]:
        n = images.shape[0]
        if n < min_batch:
            images = torch.cat([images, images[-1:].expand(min_batch - n, -1, -1, -1)])
            return [f[:n] for f in self.encoder(images)]
        return self.encoder(images)

    def features(self, images: Tensor, min_batch: int = 1) -> list[Tensor]:
        """(B, 3, H, W) in [0, 1] -> the flows' inputs [(B, D_k, H_k, W_k)].

        With an inspection region, the image outside it is replaced by the encoder's
        input mean first. ``min_batch``: see :meth:`encode`.

        With ``feature_pooling`` p > 1 each position's feature is the mean over its
        p x p neighbourhood (as PatchCore's local aggregation), padding excluded.
        """
        if self.region is not None:
            # Outside the region the encoder sees the input mean, which its normalization
            # turns into zeros: its own padding. Specks there reach no feature, so nothing
            # outside can move a map inside, and training sees the parts the same way.
            images = images * self.region + self.encoder.mean * (1 - self.region)
        features = self.encode(images, min_batch)
        if self.feature_pooling == 1:
            return features
        p = self.feature_pooling
        return [
            F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=False) for f in features
        ]

    def log_likelihoods(self, images: Tensor) -> list[Tensor]:
        """log p(z | c) / D per position: (B, 3, H, W) in [0, 1] -> [(B, H_k, W_k)]."""
        return [self.scale_log_likelihood(k, f) for k, f in enumerate(self.features(images))]

    def scale_log_likelihood(self, k: int, features: Tensor) -> Tensor:
        """(B, D, H_k, W_k) features of scale k -> (B, H_k, W_k) log-likelihood per dim."""
        batch, dim, height, width = features.shape
        z = features.flatten(2).transpose(1, 2)  # (B, H*W, D)
        decoder = self.decoders[k]
        conditions = getattr(self, f"conditions_{k}")
        if isinstance(decoder, GaussianDecoder):
            log_prob = decoder.log_prob(z)
        elif conditions.numel():
            log_prob = self.decoder(k).log_prob_conditioned(z, conditions)
        else:  # no terms kept (refresh_conditions): computed for a chunk at a time
            codes = self.codes(k)
            log_prob = torch.cat(
                [
                    self.decoder(k).log_prob(
                        z[:, i : i + POSITION_CHUNK], codes[i : i + POSITION_CHUNK]
                    )
                    for i in range(0, z.shape[1], POSITION_CHUNK)
                ],
                dim=1,
            )
        return (log_prob / dim).view(batch, height, width)

    @torch.no_grad()
    def fit_reference(self, good: list[Tensor]) -> None:
        """Set each scale's ``m_k`` from held-out good log-likelihoods [(N, ...)] of scale k."""
        for k, values in enumerate(good):
            flat = values.detach().double().flatten().cpu().numpy()
            self.reference[k] = float(np.quantile(flat, REFERENCE_QUANTILE))

    def raw_map(self, log_likelihoods: list[Tensor]) -> Tensor:
        """Per-scale log-likelihood maps -> raw anomaly map (B, H, W) in [0, 1), zero
        outside the inspection region if the model has one.

        Upsampling is linear, so the weighted mean of the upsampled terms is computed as
        ``1 - sum(w_k up(exp(min(0, l_k - m_k)))) / sum(w_k)``, in place on the full-size
        map (equal weights unless the config's ``scale_weights`` says otherwise).
        """
        total = torch.zeros(())
        for k, log_likelihood in enumerate(log_likelihoods):
            likelihood = torch.exp((log_likelihood - self.reference[k]).clamp(max=0))
            upsampled = F.interpolate(
                likelihood[:, None], size=self.image_size, mode="bilinear", align_corners=False
            )
            weight = self.scale_weights[k]
            total = upsampled.mul_(weight) if k == 0 else total.add_(upsampled, alpha=weight)
        # mul, not mul_: in place on the view total[:, 0], an exported graph writes the
        # result back into total with two ScatterElements (14 % of ONNX Runtime's time)
        raw = total[:, 0].mul(-1 / sum(self.scale_weights)).add_(1)
        return raw if self.region is None else raw.mul_(self.region)

    def set_scale_weights(self, weights: tuple[float, ...] | None, scales: int) -> None:
        """Weight the scales' terms in the map (finest first); None: equal weights."""
        self.scale_weights = list(weights or [1.0] * scales)

    def region_cells(self, k: int) -> Tensor | None:
        """Positions of scale k (H_k, W_k) whose cell touches the region: those that
        reach a map inside it, so the ones the flows train on and the reference
        describes (the painted outside would swamp both). None without a region."""
        if self.region is None:
            return None
        pooled = F.adaptive_max_pool2d(self.region[None, None], self.feature_sizes[k])
        return pooled[0, 0] > 0

    def set_region(self, mask: np.ndarray | None) -> None:
        """Inspect only where ``mask`` (H, W at the input size) is true; None: everywhere."""
        if mask is not None and mask.shape != tuple(self.image_size):
            raise ValueError(f"a region at the input size {self.image_size}, got {mask.shape}")
        device = self.reference.device
        self.region = None if mask is None else torch.from_numpy(mask).float().to(device)

    def raw_score(self, raw_maps: Tensor) -> Tensor:
        """(B, H, W) raw maps -> (B,) raw image scores: max, or mean of the top fraction."""
        flat = raw_maps.flatten(1)
        if self.score_top_k <= 0:
            return flat.amax(dim=1)
        count = max(1, round(self.score_top_k * flat.shape[1]))
        return flat.topk(count, dim=1).values.mean(dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] -> readable scores (B,), readable maps (B, H, W), raw scores."""
        raw_maps = self.raw_map(self.log_likelihoods(images))
        raw_scores = self.raw_score(raw_maps)
        return (
            readable(raw_scores, self.image_threshold),
            readable(raw_maps, self.pixel_threshold),
            raw_scores,
        )


def readable(raw: Tensor, threshold: Tensor) -> Tensor:
    """Raw values in [0, 1] -> 0 at 0, 0.5 at ``threshold``, 1 at 1, linear in between.

    Inside the exported graph; :func:`cflowad.method.calibration.raw_from_readable` inverts it.

    Example:
        >>> readable(torch.tensor([0.0, 0.2, 0.6, 1.0]), torch.tensor(0.2)).tolist()
        [0.0, 0.5, 0.75, 1.0]
    """
    t = threshold.clamp(1e-6, 1 - 1e-6)
    below, above = 0.5 / t, 0.5 / (1 - t)
    return torch.where(raw <= t, raw * below, raw * above + (0.5 - above * t))
