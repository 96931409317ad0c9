"""The fingerprint index (SQLite, no server): add, remove, list, check, repair, and the ranking queries identify
needs."""

from modeltrace.index.integrity import Problem
from modeltrace.index.store import FORMAT_VERSION, AddResult, CheckResult, Entry, Index, default_index_path

__all__ = ["FORMAT_VERSION", "AddResult", "CheckResult", "Entry", "Index", "Problem", "default_index_path"]
