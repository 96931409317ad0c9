"""Fingerprints: a small deterministic sample of every canonical tensor, enough to rank an index of models and to
recover relation and recipe without the weights (see sampling.py for which coordinates, core.py for the format)."""

from modeltrace.fingerprint.core import FORMAT_VERSION, SKETCH_DIM, Fingerprint, SlotSample, make_fingerprint

__all__ = ["FORMAT_VERSION", "SKETCH_DIM", "Fingerprint", "SlotSample", "make_fingerprint"]
