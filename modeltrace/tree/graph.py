"""The family tree of an index: every model, its direct parents and how it was made, as one lineage graph.

Data flow: index entries and summary vectors -> candidate pairs (summary-vector cosine >= SKETCH_MIN, as identify's
first ranking; each model is compared once with every model indexed before it and the result kept) -> pair evidence
(tree/evidence.py, cached in the index by tree/cache.py) -> families (connected components of significant pairs,
Bonferroni over all pairs an index of this size could hold) -> each family solved by tree/family.py (cached by its
members, so one `index add` re-solves one family) -> `Tree` (tree/describe.py): nodes and edges by model name, with a
networkx view for ancestors, descendants and subtrees, and plain-words summaries that name chains ("fine-tune of
t_mc_lin = 0.60 × c2 + 0.40 × c3").
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from modeltrace.fingerprint.core import Fingerprint
from modeltrace.index.store import Index
from modeltrace.tree import cache as tree_cache
from modeltrace.tree.describe import Tree, assemble
from modeltrace.tree.evidence import Pair, Record, pair_evidence, pair_evidence_many, record
from modeltrace.tree.family import solve_family

__all__ = ["SKETCH_MIN", "Tree", "ancestry", "build_tree", "tree_built", "update_tree"]

#: Pairs whose summary vectors' cosine reaches this are compared (unrelated models score 0 +- 0.03; a stack or a
#: merge with a far parent still scores ~0.45 against it).
SKETCH_MIN = 0.2
#: Decoded fingerprints kept while pairs are computed (pairs are worked through in index order).
FP_CACHE = 64
#: Tree records kept (about 8 bytes per sampled coordinate each).
RECORD_CACHE = 2048
#: New pairs computed per batch (in index order; both records of every pair of a batch stay in the record cache).
PAIR_CHUNK = 512
#: Up to this many indexed models each merge's method and weight intervals come from the audit's detectors on the
#: fingerprints (~0.1 s a merge); above, from the exact fit alone (linear or task arithmetic, no intervals).
AUDIT_RECIPES_UP_TO = 1000


class _Fps:
    """Decoded fingerprints (a small LRU) and their tree records (a larger one) by content hash, from the index."""

    def __init__(self, index: Index, ids: dict[str, int]) -> None:
        self.index, self.ids = index, ids
        self.lru: OrderedDict[str, Fingerprint] = OrderedDict()
        self.records: OrderedDict[str, Record] = OrderedDict()
        self.loaded = 0
        self.on_record: Callable[[str, Fingerprint, Record], Any] | None = None

    def __call__(self, h: str) -> Fingerprint:
        fp = self.lru.get(h)
        if fp is None:
            (_, fp), = self.index.load([self.ids[h]])
            self.loaded += 1
            self.lru[h] = fp
            if len(self.lru) > FP_CACHE:
                self.lru.popitem(last=False)
        else:
            self.lru.move_to_end(h)
        return fp

    def record(self, h: str) -> Record:
        r = self.records.get(h)
        if r is None:
            fp = self(h)
            r = self.records[h] = record(fp)
            if self.on_record is not None:
                self.on_record(h, fp, r)
            if len(self.records) > RECORD_CACHE:
                self.records.popitem(last=False)
        else:
            self.records.move_to_end(h)
        return r

    def prefetch(self, hashes: list[str]) -> None:
        """Records of `hashes` not yet made, their fingerprints read in one query (not one per model)."""
        todo = [h for h in dict.fromkeys(hashes) if h not in self.records]
        for start in range(0, len(todo), FP_CACHE):
            part = todo[start:start + FP_CACHE]
            got = self.index.load([self.ids[h] for h in part])
            by_hash = {fp.content_hash: fp for _, fp in got}
            for h in part:
                fp = by_hash.get(h)
                if fp is None:
                    continue  # damaged or removed: record() reads it (and reports it) as before
                self.loaded += 1
                self.lru[h] = fp
                if len(self.lru) > FP_CACHE:
                    self.lru.popitem(last=False)
                self.record(h)

    def pair(self, a: str, b: str) -> Pair:
        return pair_evidence(self.record(a), self.record(b), self)


def _info(fp: Fingerprint, r: Record, spec: str) -> dict[str, Any]:
    card = fp.model.get("card") or {}
    declared = card.get("base_model") or []
    return {"dtype": r.dtype, "grid": r.grid, "n_layers": r.n_layers, "keys": r.keys,
            "floors": dict(zip(r.keys, (float(x) for x in r.floors), strict=True)),
            "declared": [declared] if isinstance(declared, str) else list(declared),
            "uploaded": fp.model.get("last_modified") or fp.model.get("uploaded_at"),
            "format": "gguf" if spec.lower().endswith(".gguf") else "safetensors",
            "architecture": fp.model.get("model_type") or fp.model.get("family")}


def _alpha_log10(n: int) -> float:
    """Significance for a pair: ALPHA, Bonferroni over every pair an index of n models holds (rounded to a power
    of ten, so one more model rarely changes it and cached families stay valid)."""
    from modeltrace.verdict import ALPHA

    return math.log10(ALPHA) - math.ceil(math.log10(max(n, 2) * (max(n, 2) - 1) / 2))


def build_tree(index: Index) -> Tree:
    """The family tree of every model in `index`, reusing and extending the cache kept in the index file."""
    t0 = time.perf_counter()
    entries = {e.content_hash: e for e in index.entries()}
    ids, names, mat, _ = index.sketches()
    by_name = {e.name: h for h, e in entries.items()}
    hashes = [by_name[n] for n in names if n in by_name]
    tc = tree_cache.TreeCache(index)
    fps = _Fps(index, {h: e.id for h, e in entries.items()})
    known = tc.model_infos()
    infos = {h: i for h, (i, _) in known.items() if h in entries}
    scanned = {h for h, (_, s) in known.items() if s}
    fresh: dict[str, dict[str, Any]] = {}
    # a model's summary is taken when its record is first made for a pair (each fingerprint decoded once)
    fps.on_record = lambda h, fp, r: fresh.setdefault(h, _info(fp, r, entries[h].spec)) if h not in infos else None
    # candidate pairs: each model not yet scanned against every model indexed
    todo = [i for i, h in enumerate(hashes) if h not in scanned]
    cached = tc.pairs(set(hashes))
    need: set[tuple[str, str]] = set()
    for start in range(0, len(todo), 1024):
        rows = todo[start:start + 1024]
        sim = mat[rows] @ mat.T
        for k, j in zip(*np.nonzero(sim >= SKETCH_MIN), strict=True):
            i = rows[k]
            if j != i:
                a, b = (hashes[i], hashes[j]) if hashes[i] < hashes[j] else (hashes[j], hashes[i])
                if (a, b) not in cached:
                    need.add((a, b))
    pos = {h: i for i, h in enumerate(hashes)}
    need_order = sorted(need, key=lambda p: (min(pos[p[0]], pos[p[1]]), p))  # index order: the LRU stays warm
    new_pairs: list[Pair] = []
    for start in range(0, len(need_order), PAIR_CHUNK):  # batched: array products over many pairs at once
        chunk = need_order[start:start + PAIR_CHUNK]
        fps.prefetch([h for p in chunk for h in p])
        new_pairs += pair_evidence_many([(fps.record(a), fps.record(b)) for a, b in chunk], fps)
    fps.on_record = None
    fresh.update({h: _info(fps(h), fps.record(h), entries[h].spec)
                  for h in hashes if h not in infos and h not in fresh})
    tc.put_models(fresh)
    infos.update(fresh)
    tc.put_pairs(new_pairs)
    tc.mark_scanned(hashes[i] for i in todo)
    for p in new_pairs:
        cached[(p.a, p.b)] = p
    t_pairs = time.perf_counter()
    alpha = _alpha_log10(len(hashes))
    fams = _families(hashes, cached.lp, alpha)
    name_of = {h: entries[h].name for h in hashes}
    spec_of = {h: entries[h].spec for h in hashes}
    for info in infos.values():
        info["declared_hashes"] = _resolve(info.get("declared", []), name_of, spec_of)
    extra: list[Pair] = []

    def get_pair(a: str, b: str) -> Pair:
        p = fps.pair(a, b)
        extra.append(p)
        return p

    audit = len(hashes) <= AUDIT_RECIPES_UP_TO
    solved_now: dict[str, dict] = {}
    solutions: list[dict] = []
    reused = 0
    fam_of = {h: i for i, fam in enumerate(fams) for h in fam}
    keys_of: dict[int, list[tuple[str, str]]] = {}
    for ab in cached.lp:  # each family's pairs, in one pass over all pairs
        if ab[0] in fam_of and fam_of[ab[0]] == fam_of.get(ab[1]):
            keys_of.setdefault(fam_of[ab[0]], []).append(ab)
    for i, fam in enumerate(fams):
        if len(fam) == 1:
            continue
        members = [{"hash": h, "name": name_of[h], "added_at": entries[h].added_at, **infos[h]} for h in fam]
        key = [(m["hash"], m["name"], m["added_at"], m["declared_hashes"]) for m in members]  # the rest follows
        digest = hashlib.sha256(json.dumps([tree_cache.VERSION, alpha, audit, key]).encode()).hexdigest()
        sol = tc.family(digest)
        if sol is None:
            sol = solve_family(members, {ab: cached[ab] for ab in keys_of.get(i, [])}, alpha, get_pair, fps, audit)
            solved_now[digest] = sol
        else:
            reused += 1
        solutions.append(sol)
    tc.put_pairs(extra)
    tc.put_families(solved_now)
    tree = assemble(str(index.path), hashes, entries, infos, fams, solutions, name_of)
    tree.stats.update({"models": len(hashes), "pairs": len(cached), "pairs_computed": len(new_pairs) + len(extra),
                       "families": sum(len(f) > 1 for f in fams), "families_solved": len(solved_now),
                       "families_reused": reused, "fingerprints_decoded": fps.loaded,
                       "alpha_log10": alpha, "audit_recipes": audit, "seconds_pairs": round(t_pairs - t0, 3),
                       "seconds": round(time.perf_counter() - t0, 3)})
    return tree


def _families(hashes: list[str], log10_p: dict[tuple[str, str], float], alpha: float) -> list[list[str]]:
    """Connected components of significant pair evidence (scipy's sparse-graph components): no edge ever joins two
    families."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pos = {h: i for i, h in enumerate(hashes)}
    edges = np.array([(pos[a], pos[b]) for (a, b), lp in log10_p.items() if lp < alpha and a in pos and b in pos],
                     dtype=np.int64).reshape(-1, 2)
    n = len(hashes)
    g = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(g, directed=False)
    comps: dict[int, list[str]] = {}
    for h, c in zip(hashes, label, strict=True):
        comps.setdefault(int(c), []).append(h)
    return sorted((sorted(c) for c in comps.values()), key=lambda c: (-len(c), c))


def _resolve(declared: list[str], name_of: dict[str, str], spec_of: dict[str, str]) -> list[str]:
    """Index models a card's base_model names (by index name, or by the repository its spec points at)."""
    out = []
    for d in declared:
        d = str(d).strip().rstrip("/")
        for h, n in name_of.items():
            spec = spec_of[h]
            if d and (d == n or spec.rstrip("/").endswith("/" + d) or spec == d or spec.startswith(f"hf://{d}@")):
                out.append(h)
    return out


def tree_built(index: Index) -> bool:
    """Whether `modeltrace tree` (or an update) has built the family tree's cache in this index file."""
    with index._errors():
        return index.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tree_families'").fetchone() is not None


def update_tree(index: Index) -> Tree | None:
    """After `index add` / `scan --add`: bring a family tree already built for this index up to date (only the new
    models' pairs are computed and only the families they join re-solved); None, doing nothing, when no tree was
    ever built (the first `modeltrace tree` builds it)."""
    return build_tree(index) if tree_built(index) else None


def ancestry(index: Index, names: list[str]) -> dict[str, list[dict[str, str]]] | None:
    """Ancestors of `names` (indexed models, e.g. identify's parents), nearest first, from the family tree; None when
    the tree was never built for this index (`modeltrace tree` builds it; identify then keeps it up to date)."""
    if not names or not tree_built(index):
        return None
    tree = build_tree(index)
    return {n: [{"model": a, "summary": tree.nodes[a]["summary"]} for a in tree.ancestors(n)]
            for n in names if n in tree.nodes}
