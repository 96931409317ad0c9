"""Moved to modeltrace/align/match_test.py (the alignment search uses it; align never imports detectors)."""

from modeltrace.align.match_test import UnitTest, unit_test

__all__ = ["UnitTest", "unit_test"]
