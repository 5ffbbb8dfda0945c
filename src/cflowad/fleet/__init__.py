"""Fleets: one model per category trained N at once (processes or Ray), and archives
scored into resumable Parquet shards.

The package map and what each package may import: docs/architecture.md.
"""
