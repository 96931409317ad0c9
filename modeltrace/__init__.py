"""modeltrace: establish where an open-weight model came from."""

__version__ = "0.1.0"
