"""Scale fusion, thresholds and the readable scale, against brute force and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cflowad import Config
from cflowad.common.errors import UserError
from cflowad.method.calibration import order_statistic_threshold, raw_from_readable
from cflowad.method.scoring import CFlowNet, readable
from cflowad.results.metrics import pixel_auroc

SIZE = (128, 128)


@pytest.fixture(scope="module")
def net() -> CFlowNet:
    return CFlowNet.build(Config(encoder_weights="random", image_size=128), pretrained=False)


def _good_maps(net: CFlowNet, n: int, gain: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        g * 0.3 * torch.randn(n, h, w, generator=generator)
        for g, (h, w) in zip(gain, net.feature_sizes, strict=True)
    ]


def test_one_scale_a_thousandfold_louder_cannot_decide_the_map(net):
    """A defect that only strides 8 and 16 see stays the hottest place in the map when the
    stride-32 flow reports a log-likelihood a thousand times further out than anything it
    saw, elsewhere (as the coarsest flow does on unseen content).

    Under the old fusion (robust z-scores summed) that one scale decided every pixel.
    """
    good = _good_maps(net, 40, (1.0, 1.0, 1.0), seed=0)
    net.fit_reference(good)
    test = _good_maps(net, 1, (1.0, 1.0, 1.0), seed=1)
    truth = np.zeros(SIZE, bool)
    truth[16:48, 80:112] = True
    for k, stride in enumerate((8, 16)):
        test[k][0, 16 // stride : 48 // stride, 80 // stride : 112 // stride] -= 3.0
    # far from the defect, which stride 32 does not see
    test[2][0, 3, 0] -= 1000 * float(good[2].abs().max())

    raw = net.raw_map(test)[0].numpy()
    assert truth[np.unravel_index(raw.argmax(), raw.shape)]
    assert raw.min() >= 0 and raw.max() < 1
    ours = pixel_auroc([raw], [truth])

    def standardized(k: int) -> np.ndarray:
        median = np.median(good[k].numpy())
        mad = 1.4826 * np.median(np.abs(good[k].numpy() - median))
        up = F.interpolate(test[k][:, None], size=SIZE, mode="bilinear")[0, 0].numpy()
        return (median - up) / mad

    old = sum(standardized(k) for k in range(3))
    assert not truth[np.unravel_index(old.argmax(), old.shape)]  # the test tells them apart
    assert ours > 0.95 > pixel_auroc([old], [truth])


def _terms_by_hand(net: CFlowNet, values: list[torch.Tensor]) -> list[np.ndarray]:
    """Each scale's term 1 - exp(min(0, l_k - m_k)) in float64, upsampled to SIZE."""
    terms = []
    for k, value in enumerate(values):
        term = 1 - np.exp(np.minimum(0.0, value.double().numpy() - net.reference[k].item()))
        upsampled = F.interpolate(torch.from_numpy(term)[:, None], size=SIZE, mode="bilinear")
        terms.append(upsampled[:, 0].numpy())
    return terms


def test_raw_map_is_the_mean_of_the_likelihood_terms_by_hand(net):
    net.fit_reference(_good_maps(net, 20, (1.0, 1.0, 1.0), seed=2))
    values = _good_maps(net, 2, (3.0, 3.0, 3.0), seed=3)
    expected = np.mean(_terms_by_hand(net, values), axis=0)
    np.testing.assert_allclose(net.raw_map(values).numpy(), expected, rtol=0, atol=1e-6)
    extreme = [torch.full((1, h, w), -1e8) for h, w in net.feature_sizes]
    assert net.raw_map(extreme).max().item() == pytest.approx(1.0)


def test_scale_weights_give_the_weighted_mean_by_hand(net):
    """With ``scale_weights`` the raw map is the weighted mean of the same terms, still in
    [0, 1): a scale weighted 4 of 6 can move it by at most 4/6, however extreme."""
    weighted = CFlowNet.build(
        Config(encoder_weights="random", image_size=128, scale_weights=(4, 1, 1)), pretrained=False
    )
    good = _good_maps(net, 20, (1.0, 1.0, 1.0), seed=2)
    weighted.fit_reference(good)
    values = _good_maps(net, 2, (3.0, 3.0, 3.0), seed=3)
    terms = _terms_by_hand(weighted, values)
    expected = (4 * terms[0] + terms[1] + terms[2]) / 6
    np.testing.assert_allclose(weighted.raw_map(values).numpy(), expected, rtol=0, atol=1e-6)
    assert not np.allclose(expected, np.mean(terms, axis=0), atol=1e-3)  # weights do count
    calm = [torch.full((1, h, w), 1e3) for h, w in weighted.feature_sizes]
    finest_extreme = [v.clone() for v in calm]
    finest_extreme[0].fill_(-1e8)
    assert weighted.raw_map(calm).max().item() == 0
    assert weighted.raw_map(finest_extreme).max().item() == pytest.approx(4 / 6)


def test_equal_scale_weights_are_the_default_bit_for_bit(net):
    net.fit_reference(_good_maps(net, 20, (1.0, 1.0, 1.0), seed=2))
    equal = CFlowNet.build(
        Config(encoder_weights="random", image_size=128, scale_weights=(2, 2, 2)), pretrained=False
    )
    equal.reference.copy_(net.reference)
    values = _good_maps(net, 2, (3.0, 3.0, 3.0), seed=5)
    assert torch.equal(net.raw_map(values), equal.raw_map(values))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ((1, 1), "one positive weight per stride"),
        ((1, 0, 1), "one positive weight per stride"),
        ((1, float("nan"), 1), "one positive weight per stride"),
        (("a", 1, 1), "must be numbers"),
    ],
)
def test_scale_weights_are_checked(weights, message):
    with pytest.raises(UserError, match=f"scale_weights.*{message}"):
        Config(scale_weights=weights)


def test_reference_is_the_held_out_quantile(net):
    good = _good_maps(net, 30, (1.0, 2.0, 4.0), seed=4)
    net.fit_reference(good)
    for k, values in enumerate(good):
        flat = np.sort(values.double().flatten().numpy())
        position = 0.999 * (len(flat) - 1)
        low = flat[math.floor(position)]
        high = flat[math.ceil(position)]
        expected = low + (high - low) * (position - math.floor(position))
        assert net.reference[k].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [5, 20, 99, 100, 250, 1000])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1])
def test_order_statistic_threshold_against_brute_force(n, fpr):
    values = np.random.default_rng(n).normal(size=n)
    t = order_statistic_threshold(values, fpr)
    above = int((values > t.value).sum())
    # brute force: the largest count m of held-out values above with (m + 1)/(n + 1) <= fpr
    feasible = [m for m in range(n) if (m + 1) / (n + 1) <= fpr + 1e-12]
    expected = max(feasible) if feasible else 0
    assert above == expected
    assert t.achievable_fpr == pytest.approx((expected + 1) / (n + 1))
    assert t.enough_images == bool(feasible)
    assert t.value in values


def test_too_few_held_out_images_are_reported():
    t = order_statistic_threshold(np.arange(20.0), 0.01)
    assert t.value == 19.0 and not t.enough_images and t.images_needed() == 99


def test_readable_scale_puts_the_threshold_at_one_half_and_inverts():
    raw = np.linspace(0, 1, 1001)
    for threshold in (0.05, 0.4, 0.93):
        t = torch.tensor(threshold, dtype=torch.float64)
        values = readable(torch.from_numpy(raw), t).numpy()
        assert readable(t, t).item() == pytest.approx(0.5)
        assert values[0] == 0 and values[-1] == pytest.approx(1)
        assert np.all(np.diff(values) > 0)
        assert np.array_equal(values > 0.5, raw > threshold)
        np.testing.assert_allclose(raw_from_readable(values, threshold), raw, atol=1e-12)
        by_hand = np.where(
            raw <= threshold,
            0.5 * raw / threshold,
            0.5 + 0.5 * (raw - threshold) / (1 - threshold),
        )
        np.testing.assert_allclose(values, by_hand, atol=1e-12)
