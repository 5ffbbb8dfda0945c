"""What every layer may use: the user-error type, progress output, the version and
the process's memory allocator settings. Imports nothing else of cflowad.

The package map and what each package may import: docs/architecture.md.
"""
