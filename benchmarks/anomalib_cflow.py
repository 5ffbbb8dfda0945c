"""Export anomalib's Cflow with cflowad's encoder and input size, by anomalib itself.

Runs in an environment with anomalib (2.7) installed, not cflowad's; called by
benchmarks/peer.py:

    ANOMALIB_PYTHON benchmarks/anomalib_cflow.py HEIGHT WIDTH FOLDER

Writes an ONNX file (``to_onnx``) and an OpenVINO IR (``to_openvino``) under FOLDER
and prints their paths as JSON, each with anomalib's pre-processor (resize to HEIGHT x WIDTH,
ImageNet normalization) in the graph, as anomalib's users deploy it. The weights are
random (``pre_trained=False``: no download here); a graph's speed does not depend on
them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from anomalib.models import Cflow


def main() -> None:
    height, width, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    model = Cflow(
        backbone="tf_efficientnet_lite0",
        layers=[2, 3, 4],  # strides 8, 16, 32: cflowad's three scales
        pre_trained=False,
        pre_processor=Cflow.configure_pre_processor((height, width)),
    )
    model.eval()
    onnx = model.to_onnx(folder / "onnx", input_size=(height, width))
    openvino = model.to_openvino(folder / "openvino", input_size=(height, width))
    print(json.dumps({"onnx": str(onnx), "openvino": str(openvino)}))


if __name__ == "__main__":
    main()
