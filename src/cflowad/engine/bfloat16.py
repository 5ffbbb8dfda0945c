"""bfloat16: OpenVINO computing in bfloat16 on CPUs built for it, thresholds refitted.

CPUs with AMX or AVX-512 BF16 units multiply bfloat16 matrices several times faster
than float32, and OpenVINO uses them by itself when nothing says otherwise (anomalib's
OpenVINO exports run so). cflowad's OpenVINO exports compute in float32 unless
exported with ``--bf16``, because an 8-bit mantissa moves the flows' log-likelihoods
and so the maps: on magnetic_tile the maps' median Pearson correlation with float32
is 0.98 (float32 IR: 1.00000), while image AUROC, pixel AUROC and AUPRO stay within
0.002, for 1.4x the float32 path's images/s at batch 1 and 1.6x at batch 16 on an AMX
Xeon with 2 cores (docs/benchmarks.md, "Runtimes"). The thresholds are fitted again
on the bfloat16 graph's own scores for the held-out images (:mod:`cflowad.engine.refit`),
which takes a CPU that computes in bfloat16: the export refuses to run on one that
does not, and a bfloat16 export loaded on such a CPU runs in float32 with a warning.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.engine.export import refuse_foreign_openvino
from cflowad.engine.model import CFlowAD
from cflowad.engine.openvino import OpenVinoModel, host_has_bf16, require_openvino
from cflowad.engine.refit import held_out, refit_thresholds

__all__ = ["export_bf16"]

_EXPECTED = 0.95  # bfloat16 moves maps to a median correlation near 0.98; below this, more


def export_bf16(
    model: CFlowAD, folder: Path, data: Any, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Write ``model`` as an OpenVINO IR that computes in bfloat16, thresholds refitted.

    Args:
        model: a trained model.
        folder: the IR folder to write (replaced only if cflowad wrote it).
        data: what the model was trained on; its held-out images (the same seeded
            split as training) refit the thresholds.
        reporter: progress lines.

    Returns:
        :func:`cflowad.engine.export.export_openvino`'s keys and
        :func:`cflowad.engine.refit.refit_thresholds`'s.
    """
    require_openvino("bfloat16 export")
    if not host_has_bf16():
        raise UserError(
            "option --bf16: this CPU has no bfloat16 units (AMX or AVX-512 BF16), so the "
            "thresholds cannot be fitted in bfloat16 here; export on a CPU of the line's kind"
        )
    reporter = reporter or Reporter(enabled=False)
    start = time.perf_counter()
    refuse_foreign_openvino(folder)
    _, held = held_out(model, data, "bfloat16")
    with (
        tempfile.TemporaryDirectory() as scratch,
        reporter.task("exporting in bfloat16", 2) as task,
    ):
        first = Path(scratch) / "first"
        model.export_openvino(first, precision="bf16")
        task.advance()
        refitted, changes = refit_thresholds(model, OpenVinoModel(first), held, "bf16")
        written = refitted.export_openvino(folder, precision="bf16")
        task.advance()
    if not changes["map_correlation_median"] >= _EXPECTED:
        reporter.warn(
            f"bfloat16 moved the maps more than usual: their median correlation with float32 "
            f"is {changes['map_correlation_median']:.2f} on {len(held)} held-out images; keep "
            "the float32 export where accuracy matters"
        )
    return {**written, **changes, "seconds": round(time.perf_counter() - start, 1)}
