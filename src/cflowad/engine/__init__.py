"""The model and its engines: the one inference engine, the ``CFlowAD`` facade, ONNX
Runtime, the ONNX exporter, devices, threads, loading and ``cflowad bench``. Serving,
streams and fleets sit on top of it and never fork it.

The package map and what each package may import: docs/architecture.md.
"""
