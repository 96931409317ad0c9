"""How one candidate's tensors map onto the suspect's (`Alignment`), and how a suspect slot is read in the candidate
through it (`Alignment.transform`).

Data flow: align/disguise.py fills an Alignment (residual map, vocabulary map, layer map, head, unit and expert
permutations, folded gains, the match tests); the audit's streaming pass asks it, slot by slot, for a `SlotTransform`.
Which map applies to which axis of a stored tensor follows from the role's declared spaces (align/roles.py), so any
family that declares them is read the same way. Memory: the integer maps (one int per unit, head, expert and
token), the candidate's norm gains when folded, and an H x H rotation when the residual stream is rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modeltrace.align.core import ResidualMap
from modeltrace.align.match_test import UnitTest
from modeltrace.align.roles import UNIT_SPACES, Roles, roles_named, roles_of
from modeltrace.align.transform import SlotTransform
from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot
from modeltrace.stats import fisher_log10, z_from_log10p

__all__ = ["Alignment", "head_blocks"]


@dataclass
class Alignment:
    """How one candidate's tensors map onto the suspect's; empty maps mean identity."""

    candidate: int  # index into the audit's views
    residual: ResidualMap = field(default_factory=ResidualMap)
    residual_selected: bool = False
    fold: bool = False
    vocab: np.ndarray | None = None  # candidate token per suspect token (-1: none)
    vocab_selected: bool = False
    layers: dict[int, int] = field(default_factory=dict)  # suspect layer -> candidate layer, where not identity
    layers_selected: set[int] = field(default_factory=set)
    q_heads: dict[int, np.ndarray] = field(default_factory=dict)
    kv_heads: dict[int, np.ndarray] = field(default_factory=dict)
    head_dim: tuple[int, int] = (0, 0)  # suspect, candidate
    cand_heads: tuple[int, int] = (0, 0)  # the candidate's query and KV heads (to map a fused qkv matrix)
    mlp: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (mlp|shared, layer) -> unit map
    experts: dict[int, np.ndarray] = field(default_factory=dict)
    expert_units: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    tests: list[UnitTest] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gains: dict[Slot, np.ndarray] = field(default_factory=dict)  # candidate norm gains (folded on read)
    roles: Roles | None = None  # the suspect family's role semantics (None: llama's)

    # ---- evidence ------------------------------------------------------------------------------------------
    @property
    def log10p(self) -> float:
        return fisher_log10([t.log10p for t in self.tests]) if self.tests else 0.0

    def layer_z(self, layer: int) -> float | None:
        lp = [t.log10p for t in self.tests if t.layer == layer]
        return z_from_log10p(fisher_log10(lp)) if lp else None

    @property
    def selected_any(self) -> bool:
        return bool(self.residual_selected or self.vocab_selected or self.layers_selected or self.q_heads
                    or self.kv_heads or self.mlp or self.experts or self.expert_units)

    def summary(self) -> dict:
        return {"undone": list(self.notes), "residual": self.residual.kind, "folded_gains": self.fold,
                "layer_map": {str(k): v for k, v in sorted(self.layers.items())},
                "match_test": {"log10_p": round(self.log10p, 2), "groups": len(self.tests),
                               "agreements": sum(t.agree for t in self.tests),
                               "units": sum(t.n_s for t in self.tests)}}

    # ---- reading -------------------------------------------------------------------------------------------
    def _roles(self, view: ModelView | None = None) -> Roles:
        if self.roles is not None:
            return self.roles
        return roles_of(view.family) if view is not None else roles_named("llama")

    def skip(self, slot: Slot) -> bool:
        """Slots with no counterpart by construction: norm gains in a rotated (or folded) residual basis."""
        return self._roles().is_gain(slot.role) and (self.residual.rot is not None or self.fold)

    def cand_layer(self, layer: int) -> int:
        return self.layers.get(layer, layer)

    def _space_map(self, space: str, slot: Slot) -> tuple[np.ndarray | None, bool]:
        """(candidate index per suspect index along `space`, chosen by matching) for a slot, or (None, False)."""
        layer = slot.layer
        if space == "vocab":
            return self.vocab, self.vocab_selected
        if space == "heads" and layer in self.q_heads:
            return head_blocks(self.q_heads[layer], self.head_dim[1]), True
        if space == "kv_heads" and layer in self.kv_heads:
            return head_blocks(self.kv_heads[layer], self.head_dim[1]), True
        if space == "qkv" and (layer in self.q_heads or layer in self.kv_heads):
            return self._qkv(layer), True
        if space in UNIT_SPACES and (space, layer) in self.mlp:
            return self.mlp[(space, layer)], True
        if space == "expert" and (layer, slot.expert) in self.expert_units:
            return self.expert_units[(layer, slot.expert)], True
        if space == "experts" and layer in self.experts:
            return self.experts[layer], True
        return None, False

    def _qkv(self, layer: int) -> np.ndarray:
        """Candidate row per suspect row of a fused [q; k; v] output (query heads, then KV heads twice)."""
        nq, nkv = self.cand_heads
        hd = self.head_dim[1]
        q = self.q_heads.get(layer, np.arange(nq))
        kv = self.kv_heads.get(layer, np.arange(nkv))
        return np.concatenate([head_blocks(q, hd), nq * hd + head_blocks(kv, hd),
                               (nq + nkv) * hd + head_blocks(kv, hd)])

    def transform(self, slot: Slot, cview: ModelView) -> SlotTransform | None:
        """Where suspect slot `slot` sits in the candidate and how to read it there; None if nowhere."""
        layer = self.cand_layer(slot.layer) if slot.layer >= 0 else -1
        expert = slot.expert
        if expert >= 0 and slot.layer in self.experts:
            expert = int(self.experts[slot.layer][expert])
        cs = Slot(slot.role, layer, expert)
        if cs not in cview.parts:
            return None
        roles = self._roles(cview)
        tf = SlotTransform(cs)
        sel = slot.layer in self.layers_selected or (expert != slot.expert)
        res = self.residual
        row_space, col_space = roles.axes(slot.role)
        vector = col_space == ""
        if row_space == "residual":
            if res.rot is not None:
                if roles.is_gain(slot.role):
                    return None  # a gain vector has no counterpart in a rotated basis
                tf.row_mat = res.rot.T
            elif res.perm is not None:
                tf.rows = res.perm
            sel |= res.kind != "identity" and self.residual_selected
        else:
            rows, chosen = self._space_map(row_space, slot)
            if rows is not None:
                tf.rows = np.asarray(rows, dtype=np.int64)
                sel |= chosen
        if vector:
            tf.selected = sel
            return tf
        if col_space == "residual":
            gain = roles.gain_slot(Slot(slot.role, layer)) if self.fold else None
            if gain is not None and gain in self.gains:
                tf.col_scale = self.gains[gain]
            if res.rot is not None:
                tf.col_mat = res.rot
            elif res.perm is not None:
                tf.cols = res.perm
            sel |= res.kind != "identity" and self.residual_selected
        else:
            cols, chosen = self._space_map(col_space, slot)
            if cols is not None:
                tf.cols = np.asarray(cols, dtype=np.int64)
                sel |= chosen
        tf.selected = sel
        return tf


def head_blocks(heads: np.ndarray, hd: int) -> np.ndarray:
    """Row indices of whole heads of `hd` rows each, in the order `heads` lists them."""
    return (np.asarray(heads, dtype=np.int64)[:, None] * hd + np.arange(hd)[None, :]).ravel()
