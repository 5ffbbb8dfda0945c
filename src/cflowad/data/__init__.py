"""Images in and files out: decoding, resizing and batching images, data set layouts,
output folders that a failed run never destroys, and synthetic defects. Imports only
:mod:`cflowad.common`.

The package map and what each package may import: docs/architecture.md.
"""
