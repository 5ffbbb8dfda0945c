"""The package version: one source, read by pyproject.toml, model files and the server."""

__all__ = ["__version__"]

__version__ = "0.15.0"
