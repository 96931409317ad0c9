"""What each tensor role means for alignment, read from the architecture family's data (`[roles]` in
architectures/families/*.toml): the space it reads, the space it writes, the norm gain that scales its input.

Data flow: `Family.roles` (parsed by architectures.get_family) -> `Roles` (here, one per family, cached) -> the audit's
alignment (align/disguise.py and the modules it uses) and identify's fingerprints (fingerprint/robust.py,
fingerprint/undisguise.py), which ask it which axis of a stored tensor is the residual stream, which map (residual,
vocabulary, heads, units, experts) applies to each axis, and which gain to fold. A family that declares the
semantics (`Roles.ready`) gets disguise checks without code. Holds nothing but the family's small tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from modeltrace.architectures import Family, RoleSemantics, Slot, family_names, get_family

__all__ = ["UNIT_SPACES", "Roles", "roles_named", "roles_of"]

#: Spaces whose indices are units that a function-preserving disguise may permute (per layer).
UNIT_SPACES = ("mlp", "shared")


@dataclass(frozen=True)
class Roles:
    """A family's role semantics, with the questions alignment asks of them."""

    family: str
    sem: dict[str, RoleSemantics] = field(default_factory=dict, hash=False)
    transposed: frozenset[str] = frozenset()

    def of(self, role: str) -> RoleSemantics | None:
        """Semantics of a role (a bias has its matrix's)."""
        return self.sem.get(role[:-5] if role.endswith("_bias") else role)

    def axes(self, role: str) -> tuple[str, str]:
        """(space along the stored part's rows, along its columns); "" where undeclared. A vector (bias or gain)
        lies along its rows, in the space its matrix writes (a gain: the space it scales)."""
        sem = self.of(role)
        if sem is None:
            return "", ""
        if sem.scales:
            return sem.scales, ""
        if role.endswith("_bias"):
            return sem.writes, ""
        rows, cols = (sem.reads, sem.writes) if sem.table else (sem.writes, sem.reads)
        return (cols, rows) if role in self.transposed else (rows, cols)

    def residual_axis(self, role: str) -> int | None:
        """0 when the stored part's rows are the residual stream, 1 when its columns are, else None."""
        rows, cols = self.axes(role)
        return 0 if rows == "residual" else 1 if cols == "residual" else None

    def is_gain(self, role: str) -> bool:
        sem = self.sem.get(role)
        return sem is not None and bool(sem.scales)

    @property
    def gains(self) -> tuple[str, ...]:
        """Norm roles (their gains scale the residual stream)."""
        return tuple(r for r, s in self.sem.items() if s.scales)

    def reading(self, space: str) -> tuple[str, ...]:
        return tuple(r for r, s in self.sem.items() if s.reads == space and not s.table)

    def writing(self, space: str) -> tuple[str, ...]:
        return tuple(r for r, s in self.sem.items() if s.writes == space and not s.table)

    def gain_slot(self, slot: Slot) -> Slot | None:
        """The norm slot whose gain scales what `slot` reads (None when none is declared)."""
        sem = self.of(slot.role)
        if sem is None or not sem.gain or slot.role.endswith("_bias"):
            return None
        if slot.layer < 0:
            return Slot(sem.gain)
        layer = slot.layer + sem.gain_layer
        if layer < 0:
            return Slot(sem.gain_first) if sem.gain_first else None
        return Slot(sem.gain, layer)

    @property
    def readers(self) -> frozenset[str]:
        """Matrices that read the normalised residual stream along their stored columns, inside layers (the reader
        products of fingerprint/robust.py): a declared gain, not a vocabulary head, not stored transposed."""
        return frozenset(r for r, s in self.sem.items() if s.reads == "residual" and s.gain and not s.table
                         and s.writes != "vocab" and r not in self.transposed)

    @property
    def ready(self) -> bool:
        """Enough is declared to look for disguises: the embedding writes the residual stream, and some matrix
        reads it and some writes it."""
        emb = self.sem.get("embed")
        return (emb is not None and emb.writes == "residual" and bool(self.reading("residual"))
                and bool(self.writing("residual")))


@cache
def _roles(name: str) -> Roles:
    fam = get_family(name)
    return Roles(fam.name, dict(fam.roles), fam.transposed)


def roles_of(family: Family) -> Roles:
    return _roles(family.name)


def roles_named(name: str | None) -> Roles:
    """Roles of a family by name (as fingerprints record it); an unknown or missing name reads as llama's."""
    return _roles(name if name in family_names() else "llama")
