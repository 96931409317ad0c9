"""Alignment: which layer (and later which unit, head or expert) of one model corresponds to which of another."""
