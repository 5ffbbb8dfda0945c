"""``cflowad export --int8``: which flows the int8 file keeps, chosen on synthetic defects.

int8 moves the encoder's features (:mod:`cflowad.engine.quantize`). The flows can
keep their float training, which fits the float features, or be trained again on
the int8 ones, which adds a training's randomness. Neither won on both shared sets
(docs/benchmarks.md, "int8"), so each export measures both without a label: the
float model and both int8 candidates score the held-out good images as they are and
with synthetic defects pasted in (:mod:`cflowad.data.synthetic`, three seeds), and
the candidate with the higher mean of image AUROC and AUPRO is written, as
``train --tune`` chooses. The export warns when it falls below float's figures by
more than 0.005. Its thresholds are then fitted on the int8 graph's own scores of
the held-out images, so the promised false-positive rate holds for the file.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.progress import Reporter
from cflowad.data.images import ImageInput, load_image
from cflowad.data.synthetic import paste_defects
from cflowad.engine.export import refuse_foreign_onnx, refuse_foreign_openvino
from cflowad.engine.inference import InferenceEngine
from cflowad.engine.model import CFlowAD
from cflowad.engine.onnx import OnnxModel, require_onnxruntime
from cflowad.engine.openvino import OpenVinoModel, require_openvino
from cflowad.engine.quantize import (
    QUANTIZED_OPS,
    calibration_images,
    fit_on_int8_encoder,
    quantize_model,
    require_nncf,
)
from cflowad.engine.refit import held_out, refit_thresholds
from cflowad.results.metrics import aupro, image_auroc

__all__ = ["FLOWS", "FORMATS", "TOLERANCE", "export_int8", "on_synthetic_defects"]

FLOWS = {"as trained": "the model's own flows", "fitted": "flows trained on the int8 features"}
FORMATS = {
    "onnx": "QDQ int8 (ONNX Runtime static quantization)",
    "openvino": "FakeQuantize int8 (NNCF post-training quantization)",
}
QUANTIZED = {"onnx": list(QUANTIZED_OPS), "openvino": ["Convolution", "GroupConvolution"]}
TOLERANCE = 0.005  # a figure below the float model's by more: found less well, a warning
_SEEDS = (0, 1, 2)  # synthetic defects: each held-out image gets one per seed


def export_int8(
    model: CFlowAD,
    path: Path,
    data: Any,
    reporter: Reporter | None = None,
    runtime: str = "onnx",
) -> dict[str, Any]:
    """Write ``model`` in int8 with the flows that find synthetic defects best.

    Args:
        model: a trained model.
        path: the ``.onnx`` file to write, or with ``runtime`` openvino the IR folder
            (replaced only if cflowad wrote it).
        data: what the model was trained on (a folder, an MVTec category, a list): the
            training images calibrate the activations and train the second flows, the
            held-out ones (the same seeded split as training) carry the synthetic
            defects and fit the thresholds.
        reporter: progress lines.
        runtime: onnx (ONNX Runtime's static quantization, QDQ) or openvino (NNCF).

    Returns:
        What was written, the flows kept (``flows``), every model's figures on the
        synthetic defects (``synthetic_defects``), what fell below float (``worse``) and
        how far the file is from float (:func:`cflowad.engine.refit.refit_thresholds`).
    """
    if runtime == "openvino":
        require_openvino("int8 export")
        require_nncf()
        refuse_foreign_openvino(path)
    else:
        require_onnxruntime("int8 export")
        refuse_foreign_onnx(path)
    reporter = reporter or Reporter(enabled=False)
    start = time.perf_counter()
    train, held = held_out(model, data, "int8")
    calibration = calibration_images(model, train)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        reporter.log(
            f"int8: the encoder calibrated on {len(calibration)} training images; the flows "
            "trained again on its features, to compare with the model's own"
        )
        fitted = fit_on_int8_encoder(model, train, held, calibration, work, reporter, runtime)
        candidates = {"as trained": model, "fitted": fitted}
        files: dict[str, OnnxModel | OpenVinoModel] = {}
        with reporter.task(f"quantizing to int8 ({runtime})", len(candidates)) as task:
            for name, candidate in candidates.items():
                file = work / name.replace(" ", "-")
                quantize_model(candidate, file, calibration.numpy(), work, runtime=runtime)
                files[name] = OpenVinoModel(file) if runtime == "openvino" else OnnxModel(file)
                task.advance()
        with reporter.task("synthetic defects", 1) as task:
            figures = on_synthetic_defects({"float": model, **files}, held, _SEEDS)
            task.advance()
        chosen = max(candidates, key=lambda name: figures[name]["criterion"])
        refitted, changes = refit_thresholds(candidates[chosen], files[chosen], held, "int8", model)
        metadata = {
            "quantization": json.dumps(
                {
                    "format": FORMATS[runtime],
                    "quantized": QUANTIZED[runtime],
                    "float": "the flows, the fusion, the maps",
                    "flows": FLOWS[chosen],
                    "calibration_images": len(calibration),
                    "threshold_images": len(held),
                    "synthetic_defects": figures,
                }
            )
        }
        with reporter.task("writing", 1) as task:
            quantize_model(refitted, path, calibration.numpy(), work, metadata, runtime)
            task.advance()
    worse = {
        key: round(figures["float"][key] - figures[chosen][key], 4)
        for key in ("image_auroc", "aupro")
        if figures["float"][key] - figures[chosen][key] > TOLERANCE
    }
    if worse:
        reporter.warn(
            "int8 finds synthetic defects in the held-out images less well than float ("
            + ", ".join(f"{key} {drop:.3f} lower" for key, drop in worse.items())
            + "); keep the float export where accuracy matters (docs/benchmarks.md, 'int8')"
        )
    return {
        runtime: str(path),
        "megabytes": round(
            sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir())) / 2**20,
            1,
        ),
        "seconds": round(time.perf_counter() - start, 1),
        "quantized": QUANTIZED[runtime],
        "flows": chosen,
        "synthetic_defects": figures,
        "worse": worse,
        **changes,
    }


def on_synthetic_defects(
    models: dict[str, InferenceEngine], held: Sequence[ImageInput], seeds: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Each model's image AUROC, AUPRO and their mean (``criterion``) on ``held`` as it is
    and with one synthetic defect per image and seed (the same defects for every model),
    and how many ``defects`` counted: as in ``train --tune``, a defect is counted by its
    part inside the inspection region, and not at all when it falls wholly outside."""
    clean = [load_image(item) for item in held]
    first = next(iter(models.values()))  # every candidate carries the model's region
    defective: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for seed in seeds:
        pasted, pasted_masks, _ = paste_defects(clean, seed=seed)
        for with_defect, mask in zip(pasted, pasted_masks, strict=True):
            inside = first.region_at((mask.shape[0], mask.shape[1]))
            seen = mask if inside is None else mask & inside
            if seen.any():
                defective.append(with_defect)
                masks.append(seen)
    labels = np.r_[np.zeros(len(clean)), np.ones(len(defective))]
    figures = {}
    for name, predictor in models.items():
        good = [r.raw_score for r in predictor.predict_iter(clean, batch_size=8)]
        results = list(predictor.predict_iter(defective, batch_size=8))
        image = image_auroc(np.r_[good, [r.raw_score for r in results]], labels)
        pro = aupro([r.anomaly_map for r in results], masks)
        figures[name] = {
            "image_auroc": round(image, 4),
            "aupro": round(pro, 4),
            "criterion": round((image + pro) / 2, 4),
            "defects": len(defective),
        }
    return figures
