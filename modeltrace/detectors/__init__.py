"""Detectors: each turns streamed, aligned tensor groups into evidence about one relation or merge method.

Every method is registered with its name, a one-line description and its paper (see `registry.py`), in the spirit
of mergekit's merge-method registry, so that adding a method is one new module plus one registration.
"""
