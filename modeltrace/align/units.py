"""Per-layer alignment for the audit's disguise search: which candidate layer each suspect layer is (`layer_map`),
and, within a layer, KV groups and query heads (`heads`), MLP and shared-expert units (`mlp`), experts and each
expert's units (`experts`).

Data flow: align/disguise.py's `align_pair` calls these with Sketchers of both models (align/sketch.py) and fills the
Alignment (align/alignment.py). Which roles play q, k, v and o, which read and write an MLP's units and which are
experts comes from the family's role semantics (align/roles.py), so a family that declares them needs no code here.
Memory: for the layer being aligned, units x 3 x RES_SAMPLE float32 features per model (a 20k-unit layer: ~30 MB
each); layer signatures are (k^2 / 2) floats per layer and model.
"""

from __future__ import annotations

import numpy as np

from modeltrace.align.alignment import Alignment
from modeltrace.align.core import ACCEPT_LOG10P, LAYER_MARGIN, LAYER_MIN_SIM, SMALL_MIN_COS, Z_IDENTITY
from modeltrace.align.layers import LayerMatch
from modeltrace.align.match import standardize
from modeltrace.align.match_test import UnitTest, unit_test
from modeltrace.align.roles import Roles, roles_of
from modeltrace.align.sketch import RES_SAMPLE_WIDE, WIDE_LAYER, Sketcher
from modeltrace.align.view import ModelView
from modeltrace.architectures import RoleSemantics, Slot

__all__ = ["experts", "head_dims", "heads", "layer_map", "mlp", "unit_features"]

#: Spaces of units that a residual writer may read (its per-layer signature sums over them).
_INNER = ("heads", "mlp", "shared", "expert")
_NONE = RoleSemantics()


def _units_of(sk: Sketcher, slot: Slot) -> int:
    """Units of a residual reader or writer (its axis that is not the residual stream)."""
    part = sk.view.parts[slot]
    return part.cols if sk.roles.residual_axis(slot.role) == 0 else part.rows


# ---- layers -------------------------------------------------------------------------------------------------


def _layer_signature(sk: Sketcher, layer: int, coords: np.ndarray) -> np.ndarray | None:
    """Cosine Gram of sampled residual rows of the matrices that write the residual stream from heads or units
    (o_proj, down_proj; summed over experts): unchanged by any permutation of heads, units or experts. Off-diagonal
    entries, each part standardized, concatenated."""
    parts = []
    view = sk.view
    writers = [r for r in sk.roles.writing("residual") if (sk.roles.of(r) or _NONE).reads in _INNER]
    groups: dict[str, list[Slot]] = {}
    for sl in view.parts:
        if sl.layer == layer and sl.role in writers:
            groups.setdefault("experts" if sl.expert >= 0 else sl.role, []).append(sl)
    for key in [*writers, "experts"]:
        if key not in groups:
            continue
        g = np.zeros((len(coords), len(coords)))
        for sl in groups[key]:
            x: np.ndarray = sk.rows(sl, coords).astype(np.float64)
            g += x @ x.T
        d = np.sqrt(np.maximum(np.diag(g), 1e-300))
        cg = g / d[:, None] / d[None, :]
        v = cg[np.triu_indices(len(coords), 1)]
        v = v - v.mean()
        nv = np.linalg.norm(v)
        parts.append(v / nv if nv > 0 else v)
    return np.concatenate(parts) / np.sqrt(len(parts)) if parts else None


def layer_map(al: Alignment, s: ModelView, c: ModelView, sk_s: Sketcher, sk_c: Sketcher, coords: np.ndarray,
               ci: int, matches: list[LayerMatch]) -> None:
    exact = {m.layer: m.source_layer for m in matches
             if m.exact and m.candidate == ci - 1 and m.source_layer is not None}
    s_layers = sorted({sl.layer for sl in s.parts if sl.layer >= 0})
    c_layers = sorted({sl.layer for sl in c.parts if sl.layer >= 0})
    sig_s = {layer: _layer_signature(sk_s, layer, coords) for layer in s_layers}
    sig_c = {layer: _layer_signature(sk_c, layer, coords) for layer in c_layers}
    moved, dup = [], []
    for layer in s_layers:
        if layer in exact:
            if exact[layer] != layer:
                al.layers[layer] = exact[layer]
            continue
        a = sig_s[layer]
        if a is None:
            continue
        sims = {m: float(a @ b) for m, b in sig_c.items() if b is not None and b.shape == a.shape}
        if not sims:
            continue
        order = sorted(sims, key=lambda m: sims[m], reverse=True)
        best = order[0]
        second = sims[order[1]] if len(order) > 1 else 0.0
        if best != layer and sims[best] >= LAYER_MIN_SIM and sims[best] - max(second, sims.get(layer, -1)) \
                >= LAYER_MARGIN - 1e-12:
            al.layers[layer] = best
            al.layers_selected.add(layer)
            moved.append(f"{layer}←{best}")
        elif layer not in sims and sims[best] >= LAYER_MIN_SIM and sims[best] - second >= LAYER_MARGIN:
            al.layers[layer] = best
            al.layers_selected.add(layer)
            moved.append(f"{layer}←{best}")
    if moved:
        al.notes.append("layers re-mapped (suspect←candidate): " + ", ".join(moved))
    used = [al.cand_layer(x) for x in s_layers]
    dups = sorted({x for x in used if used.count(x) > 1})
    if dups:
        dup.append(", ".join(map(str, dups)))
        al.notes.append(f"candidate layers used more than once (duplicated): {dup[0]}")
    missing = [x for x in c_layers if x not in used]
    if missing and len(s_layers) < len(c_layers):
        al.notes.append(f"candidate layers absent from the suspect (dropped): {', '.join(map(str, missing))}")


# ---- attention heads ----------------------------------------------------------------------------------------


def head_dims(view: ModelView) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from the config and the q/k shapes; zeros when unknown."""
    cfg = view.config
    nh = cfg.get("num_attention_heads") or cfg.get("n_head")
    nkv = cfg.get("num_key_value_heads") or nh
    rs = roles_of(view.family)
    qr = rs.writing("heads") or rs.writing("qkv")
    q = next((sl for sl in view.parts if sl.role in qr), None)
    if not isinstance(nh, int) or not isinstance(nkv, int) or q is None or nh <= 0:
        return 0, 0, 0
    rows = view.parts[q].cols if rs.residual_axis(q.role) == 0 else view.parts[q].rows
    if not rs.writing("heads"):  # fused q, k and v (GPT-2's c_attn): the query heads' share of the rows
        rows = rows * nh // (nh + 2 * nkv) if rows % (nh + 2 * nkv) == 0 else 0
    hd_cfg = cfg.get("head_dim")
    hd = hd_cfg if isinstance(hd_cfg, int) else rows // nh
    if hd <= 0 or rows % hd:
        return 0, 0, 0
    return nh, nkv, hd


def _small_match(fs: np.ndarray, fc: np.ndarray) -> tuple[np.ndarray | None, float, float]:
    """Exact assignment for a handful of units (heads, groups, experts) by centred cosine: (perm or None when the
    identity is as good, matched mean cosine, identity mean cosine)."""
    a = _rownorm(fs)
    b = _rownorm(fc)
    sim = a @ b.T
    n = min(sim.shape)
    ident = float(np.mean(np.diag(sim[:n, :n]))) if sim.shape[0] <= sim.shape[1] else -1.0
    from scipy.optimize import linear_sum_assignment  # 0.5 s to import: only audits that search for a disguise

    r, cidx = linear_sum_assignment(sim, maximize=True)
    matched = float(sim[r, cidx].mean())
    perm = np.full(sim.shape[0], -1)
    perm[r] = cidx
    if matched < SMALL_MIN_COS or (sim.shape[0] == sim.shape[1] and np.array_equal(perm, np.arange(len(perm)))):
        return None, matched, ident
    if matched - ident < 0.05 and sim.shape[0] == sim.shape[1]:
        return None, matched, ident
    return perm, matched, ident


def _rownorm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _attention_roles(roles: Roles) -> tuple[str, str, str, str] | None:
    """(q, k, v, o): the roles writing query heads, KV heads (two) and reading heads; None unless declared."""
    q, kv, o = roles.writing("heads"), roles.writing("kv_heads"), roles.reading("heads")
    return (q[0], kv[0], kv[1], o[0]) if len(q) == 1 and len(kv) == 2 and len(o) == 1 else None


def _attention(sk: Sketcher, layer: int, coords: np.ndarray, dims: tuple[int, int, int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(q, k, v: units x k, o: k x units) of one layer at the sampled residual coordinates; q, k and v cut out of a
    fused matrix (GPT-2's c_attn, writing the "qkv" space) where the family declares one."""
    nh, nkv, hd = dims
    names, fused = _attention_roles(sk.roles), sk.roles.writing("qkv")
    o_role = sk.roles.reading("heads")
    if nh <= 0 or nkv <= 0 or len(o_role) != 1 or not sk.has(o := Slot(o_role[0], layer)):
        return None
    if names is not None:
        q, k, v = (Slot(r, layer) for r in names[:3])
        if not all(sk.has(x) for x in (q, k, v)) or _units_of(sk, q) != nh * hd:
            return None
        return sk.cols(q, coords), sk.cols(k, coords), sk.cols(v, coords), sk.rows(o, coords)
    if len(fused) != 1 or not sk.has(f := Slot(fused[0], layer)) or _units_of(sk, f) != (nh + 2 * nkv) * hd:
        return None
    x = sk.cols(f, coords)
    return x[:nh * hd], x[nh * hd:(nh + nkv) * hd], x[(nh + nkv) * hd:], sk.rows(o, coords)


def heads(al: Alignment, s: ModelView, c: ModelView, sk_s: Sketcher, sk_c: Sketcher, coords: np.ndarray,
          layer: int, cl: int, hs: tuple[int, int, int], hc: tuple[int, int, int], counts: dict) -> None:
    nh_s, nkv_s, hd = hs
    nh_c, nkv_c, _ = hc
    got_s = _attention(sk_s, layer, coords, hs)
    got_c = _attention(sk_c, cl, coords, hc) if got_s is not None else None
    if got_s is None or got_c is None:
        return
    qs_, ks, vs, os_ = got_s
    qc_, kcand, vcand, oc_ = got_c
    gs = np.concatenate([ks.reshape(nkv_s, -1), vs.reshape(nkv_s, -1)], axis=1)
    gc = np.concatenate([kcand.reshape(nkv_c, -1), vcand.reshape(nkv_c, -1)], axis=1)
    gperm, _, _ = _small_match(gs, gc)
    groups = np.arange(nkv_s) if gperm is None else gperm
    if gperm is not None:
        al.kv_heads[layer] = gperm
        if np.any(np.diff(gperm) < 0):  # kept groups in their order are pruning, not a permutation
            counts["kv"] += 1
    fs = np.concatenate([qs_.reshape(nh_s, -1), os_.reshape(len(coords), nh_s, hd).transpose(1, 0, 2)
                         .reshape(nh_s, -1)], axis=1)
    fc = np.concatenate([qc_.reshape(nh_c, -1), oc_.reshape(len(coords), nh_c, hd).transpose(1, 0, 2)
                         .reshape(nh_c, -1)], axis=1)
    per_s, per_c = nh_s // nkv_s, nh_c // nkv_c
    qmap = np.arange(nh_s)
    changed = False
    for g in range(nkv_s):
        gc_ = int(groups[g])
        if gc_ < 0:
            continue
        ids_s = np.arange(g * per_s, (g + 1) * per_s)
        ids_c = np.arange(gc_ * per_c, (gc_ + 1) * per_c)
        perm, _, _ = _small_match(fs[ids_s], fc[ids_c])
        if perm is None:
            qmap[ids_s] = ids_c[: len(ids_s)]
        else:
            qmap[ids_s] = ids_c[perm]
        if not np.array_equal(qmap[ids_s], ids_s):
            changed = True
    pruned = nh_s < nh_c
    if changed or pruned:
        al.q_heads[layer] = qmap
        if gperm is None and nkv_s < nkv_c:
            al.kv_heads[layer] = groups
        if pruned:
            counts["heads_pruned"] = f"{nh_s} of {nh_c}"
            counts["heads_pruned_layers"] += 1
        if np.any(np.diff(qmap) < 0):
            counts["heads"] += 1


# ---- MLP units and experts ----------------------------------------------------------------------------------


def unit_features(sk: Sketcher, slots: list[Slot], coords: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Features of a group's units: each reader's units at the sampled residual coordinates (gate, up), then the
    writer's (down, last in `slots`)."""
    fin = [standardize(sk.cols(r, coords)) for r in slots[:-1]]
    fout = [standardize(sk.rows(slots[-1], coords).T)]
    return fin, fout


def _units(al: Alignment, sk_s: Sketcher, sk_c: Sketcher, coords: np.ndarray, roles: tuple[str, ...],
           layer: int, cl: int, expert: int, cexpert: int, kind: str) -> tuple[np.ndarray | None, UnitTest] | None:
    ss = [Slot(r, layer, expert) for r in roles]
    cs = [Slot(r, cl, cexpert) for r in roles]
    if not all(sk_s.has(x) for x in ss) or not all(sk_c.has(x) for x in cs):
        return None
    n_s, n_c = _units_of(sk_s, ss[0]), _units_of(sk_c, cs[0])
    if n_s > n_c or n_s < 2:
        return None
    if n_c > WIDE_LAYER:
        coords = coords[np.linspace(0, len(coords) - 1, min(len(coords), RES_SAMPLE_WIDE)).astype(np.int64)]
    in_s, out_s = unit_features(sk_s, ss, coords)
    in_c, out_c = unit_features(sk_c, cs, coords)
    t = unit_test(in_s, in_c, out_s, out_c, layer, expert, kind)
    al.tests.append(t)
    if n_s == n_c and t.identity_z >= Z_IDENTITY:
        return None, t
    if t.log10p <= ACCEPT_LOG10P:
        perm = t.alignment()
        if n_s == n_c and np.array_equal(perm, np.arange(n_s)):
            return None, t
        return perm, t
    return None, t


def _group_roles(roles: Roles, space: str) -> tuple[str, ...] | None:
    """(readers..., writer) of a unit space (gate and up, then down), or None unless declared."""
    readers, writer = roles.writing(space), roles.reading(space)
    return (*readers, writer[0]) if readers and len(writer) == 1 else None


def mlp(al: Alignment, sk_s: Sketcher, sk_c: Sketcher, coords: np.ndarray, layer: int, cl: int, kind: str,
        counts: dict) -> None:
    roles = _group_roles(sk_s.roles, kind)
    if roles is None or _group_roles(sk_c.roles, kind) != roles:
        return
    got = _units(al, sk_s, sk_c, coords, roles, layer, cl, -1, -1, kind)
    if got is None or got[0] is None:
        return
    al.mlp[(kind, layer)] = got[0]
    if got[1].n_s < got[1].n_c:
        counts["pruned"] += 1
        counts["pruned_units"] = f"{got[1].n_s} of {got[1].n_c}"
    if np.any(np.diff(got[0]) < 0):  # survivors of pruning keep their order; a permutation does not
        counts["mlp"] += 1


def experts(al: Alignment, s: ModelView, c: ModelView, sk_s: Sketcher, sk_c: Sketcher, coords: np.ndarray,
             layer: int, cl: int, counts: dict) -> None:
    roles = _group_roles(sk_s.roles, "expert")
    if roles is None or _group_roles(sk_c.roles, "expert") != roles:
        return
    down = roles[-1]
    es = sorted({sl.expert for sl in s.parts if sl.layer == layer and sl.role == down})
    ec = sorted({sl.expert for sl in c.parts if sl.layer == cl and sl.role == down})
    if not es or not ec:
        return
    emap = np.array(es)
    if len(es) > 1:
        fs = _expert_summary(sk_s, layer, es, coords, down)
        fc = _expert_summary(sk_c, cl, ec, coords, down)
        perm, _, _ = _small_match(fs, fc)
        if perm is not None:
            emap = np.array([ec[p] for p in perm])
            al.experts[layer] = emap
            counts["experts"] += 1
    for e, ce in zip(es, emap, strict=True):
        got = _units(al, sk_s, sk_c, coords, roles, layer, cl, e, int(ce), "expert")
        if got is not None and got[0] is not None:
            al.expert_units[(layer, e)] = got[0]
            counts["expert_units"] += 1


def _expert_summary(sk: Sketcher, layer: int, experts: list[int], coords: np.ndarray, down: str) -> np.ndarray:
    """Per expert, features unchanged by permuting its units: router row, sampled down rows summed over units,
    and their cosine Gram."""
    feats = []
    routers = [Slot(r, layer) for r in sk.roles.writing("experts")]
    rr = sk.cols(routers[0], coords) if routers and sk.has(routers[0]) else None
    iu = np.triu_indices(len(coords), 1)
    for j, e in enumerate(experts):
        x: np.ndarray = sk.rows(Slot(down, layer, e), coords).astype(np.float64)
        g = x @ x.T
        d = np.sqrt(np.maximum(np.diag(g), 1e-300))
        parts = [_unit(x.sum(axis=1)), _unit((g / d[:, None] / d[None, :])[iu])]
        if rr is not None and j < rr.shape[0]:
            parts.append(_unit(rr[e]))
        feats.append(np.concatenate(parts))
    return np.stack(feats)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64) - np.mean(v)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v
