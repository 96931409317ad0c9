"""The fingerprint index (SQLite, no server): add, remove, list, and the ranking queries identify needs."""

from modeltrace.index.store import FORMAT_VERSION, AddResult, Entry, Index, default_index_path

__all__ = ["FORMAT_VERSION", "AddResult", "Entry", "Index", "default_index_path"]
