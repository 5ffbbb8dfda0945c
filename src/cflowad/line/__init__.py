"""The line: the HTTP server and its batching, the model catalog, hot folders
(``watch``), video streams (``stream``) and the load generator.

The package map and what each package may import: docs/architecture.md.
"""
