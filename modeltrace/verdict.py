"""Combine per-slot evidence into the answer a person reads: relation, method, recipe, p-values, per-layer table."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from modeltrace.align.coverage import stack_summary
from modeltrace.align.layers import stack_map
from modeltrace.audit import AuditRun, SlotResult
from modeltrace.detectors.rounding import RESOLUTION, ROUNDED
from modeltrace.detectors.storage import is_block_quantized, is_lossy
from modeltrace.lineage_verdict import parent_entry, pooled, trained, upcycled
from modeltrace.methods import merge_method
from modeltrace.schema import SCHEMA_VERSION
from modeltrace.stats import fisher_log10, format_p, log10_sf, mean_interval, stouffer

#: A candidate is called related when its combined independence p-value is below this.
ALPHA = 1e-6


def _majority(results: list[SlotResult]) -> tuple[str, float]:
    """Numel-weighted most common method among slots, with its share. Whole-tensor copies do not vote when other
    methods are present: a SLERP at t = 0 or a linear weight of 1 copies a tensor too."""
    votes: Counter[str] = Counter()
    for r in results:
        votes[r.fit.method] += r.stats.numel
    if len(votes) > 1:
        votes.pop("copy", None)
    if not votes:
        return "none", 0.0
    method, n = votes.most_common(1)[0]
    return method, n / sum(votes.values())


def _p_values(run: AuditRun, matrix: list[SlotResult]) -> dict[int, float]:
    """Per candidate, log10 p of independence. Elementwise correlations (Stouffer) where tensors were compared as
    stored; where an alignment was searched for, also the permutation-invariant match test, and only that on
    tensors whose alignment was chosen by matching (maximising a correlation voids its null); Fisher over the two
    when nothing was re-aligned."""
    out = {}
    for i in range(1, len(run.views)):
        zs = [r.z[i] for r in matrix if i in r.z and i not in r.selected]
        elem = log10_sf(stouffer(zs)) if zs else None
        al = run.alignments[i - 1] if i - 1 < len(run.alignments) else None
        if al is None or not al.tests:
            out[i] = elem if elem is not None else 0.0
        elif al.selected_any or elem is None:
            out[i] = al.log10p
        else:  # both valid and computed from different statistics: Fisher keeps them calibrated together
            out[i] = fisher_log10([elem, al.log10p])
    return out


def _weights(results: list[SlotResult], key: str = "weights") -> dict[int, list[float]]:
    w: dict[int, list[float]] = defaultdict(list)
    for r in results:
        for c, v in getattr(r.fit, key).items():
            w[c].append(v)
    return w


def _ses(results: list[SlotResult]) -> dict[int, list[float]]:
    """Per candidate, the standard error of its weight on each slot, aligned with `_weights` (inf where the slot
    cannot tell the weights apart; nan where the fit gave none, so the pooled interval falls back to the spread)."""
    out: dict[int, list[float]] = defaultdict(list)
    for r in results:
        for c in r.fit.weights:
            out[c].append(r.fit.se.get(c, float("nan")))
    return out


def _layer_table(run: AuditRun, matrix: list[SlotResult]) -> list[dict[str, Any]]:
    by_layer: dict[int, list[SlotResult]] = defaultdict(list)
    for r in matrix:
        by_layer[r.slot.layer].append(r)
    names = {i: v.label for i, v in enumerate(run.views)}
    matches = {m.layer: m for m in run.layer_matches}
    rows = []
    for layer in sorted(by_layer):
        rs = by_layer[layer]
        method, share = _majority(rs)
        agree = [r for r in rs if r.fit.method == method]
        entry: dict[str, Any] = {"layer": layer, "method": method, "share": round(share, 4)}
        ses = _ses(agree)
        entry["weights"] = {names[c]: pooled(v, ses[c]) for c, v in _weights(agree).items()}
        entry["r2_min"] = round(float(min(1 - r.fit.rel_rss for r in agree)), 6) if agree else None
        ts = [r.fit.params["t"] for r in agree if "t" in r.fit.params]
        if ts and method == "slerp":
            entry["t"] = round(float(np.mean(ts)), 4)
        ds = [r.fit.params["density"] for r in agree if "density" in r.fit.params]
        if ds:
            entry["density"] = round(float(np.mean(ds)), 4)
        zs = {names[i]: stouffer([r.z[i] for r in rs if i in r.z]) for i in range(1, len(run.views))}
        entry["z"] = {k: round(v, 1) for k, v in zs.items()}
        m = matches.get(layer)
        if m is not None and m.exact and m.candidate is not None:
            entry["copy_of"] = {"model": names[m.candidate + 1], "layer": m.source_layer}
        rows.append(entry)
    return rows


def _role_table(run: AuditRun, matrix: list[SlotResult], method: str) -> dict[str, dict[str, float]]:
    names = {i: v.label for i, v in enumerate(run.views)}
    by_role: dict[str, list[SlotResult]] = defaultdict(list)
    for r in matrix:
        if r.fit.method == method:
            by_role[r.slot.role].append(r)
    return {role: {names[c]: round(float(np.mean(v)), 4) for c, v in _weights(rs).items()}
            for role, rs in sorted(by_role.items())}


def decide(run: AuditRun) -> dict[str, Any]:
    out = _decide(run)
    names = {i: v.label for i, v in enumerate(run.views)}
    lossy = sorted({names[c] for r in run.slots for k, c in enumerate(r.cands)
                    if k < len(r.stats.cand_dtypes) and is_lossy(r.stats.cand_dtypes[k])
                    and r.stats.cand_noise is not None and r.stats.cand_noise[k + 1] > 0})
    if lossy and out.get("relation") == "merge":
        out["warnings"].append(f"candidate(s) {', '.join(lossy)} are stored quantized: their rounding noise pulls "
                               "recipe weights toward each other (errors in variables); audit against "
                               "full-precision parents for exact weights")
    if getattr(run, "coverage", None) is not None:  # a sampled remote audit: what was and was not read
        out["coverage"] = run.coverage.as_dict()
    aligned = {names[i]: al.summary() for i, al in enumerate(run.alignments, 1) if al is not None}
    if aligned:
        out["alignment"] = aligned
        undone = [f"{n}: {'; '.join(a['undone'])}" for n, a in aligned.items() if a["undone"]]
        if undone:
            out["summary"] = out.get("summary", "") + " Disguise undone (" + " | ".join(undone) + ")."
    return out


def _decide(run: AuditRun) -> dict[str, Any]:
    names = {i: v.label for i, v in enumerate(run.views)}
    matrix = [r for r in run.slots if not r.structured]
    if not matrix:
        matrix = list(run.slots)
    logp = _p_values(run, matrix)
    related = [i for i, lp in logp.items() if lp < np.log10(ALPHA)]
    p_values = {names[i]: {"log10_p": round(lp, 2), "p": float(10 ** max(lp, -300)), "text": format_p(lp)}
                for i, lp in logp.items()}
    method, share = _majority(matrix)
    _absorb_copies(matrix, method)
    layers = _layer_table(run, matrix)
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suspect": names[0],
        "candidates": [names[i] for i in range(1, len(run.views))],
        "base": names[run.base] if run.base else None,
        "base_inferred": run.base_inferred,
        "relation": "independent",
        "method": None,
        "parents": [],
        "p_values": p_values,
        "layers": layers,
        "warnings": list(run.warnings),
        "bytes_read": run.bytes_read,
        "elapsed_s": round(run.elapsed, 3),
        "sample": run.sample,
        "sources": {v.label: v.spec for v in run.views},
        "suspect_dtype": _dominant_dtype(run, 0),
    }
    smap = stack_map(run.layer_matches)
    if any(r.cross for r in run.slots):  # experts compared with a dense candidate's MLP: upcycling?
        up = upcycled(out, run, related, logp)
        if up is not None:
            return up
    all_copy = all(r.fit.method == "copy" for r in run.slots)
    copy_srcs = {c for r in run.slots for c in r.fit.weights} if all_copy else set()

    if all_copy and len(copy_srcs) == 1 and (smap is None or _identity(smap)):
        c = copy_srcs.pop()
        same_dtype = all(run.views[0].dtype(r.slot) == run.views[c].dtype(r.slot) for r in run.slots
                         if r.slot in run.views[c].parts)
        exact = all(r.stats.equal[r.cands.index(c) + 1] == r.stats.numel for r in run.slots)
        out["relation"] = "copy" if (same_dtype and exact) else "recast"
        out["parents"] = [{"model": names[c], "weight": 1.0, "interval": [1.0, 1.0]}]
        sampled = run.sample is not None and run.sample < 1
        if out["relation"] == "copy" and sampled:
            out["summary"] = (f"{names[0]} is a copy of {names[c]}: identical in every sampled value of all "
                              f"{len(run.slots)} tensors (a sampled audit; `modeltrace inspect --hashes` compares "
                              "every byte).")
        elif out["relation"] == "copy":
            out["summary"] = (f"{names[0]} is a byte-identical copy of {names[c]}: every one of {len(run.slots)} "
                              "tensors matches.")
        else:
            sd, cd = _dominant_dtype(run, 0), _dominant_dtype(run, c)
            out["encoding"] = {"suspect": sd, "parent": cd}
            wider = _BITS.get(sd, 0) > _BITS.get(cd, 0)
            if wider and not exact:
                out["summary"] = (f"{names[0]} and {names[c]} are one model in two number formats: every one of "
                                  f"{len(run.slots)} tensors of {names[0]} ({_word(sd)}) equals {names[c]}'s up to "
                                  f"{names[c]}'s {_word(cd)} rounding ({names[0]}, the wider, is most likely the "
                                  "original).")
                out["direction"] = "suspect-to-parent"
            else:
                verified = all("rounded" in r.fit.params or r.fit.rel_rss == 0 for r in run.slots)
                out["summary"] = (f"{names[0]} is {_article(_word(sd))} {_word(sd)} re-encoding of {names[c]} "
                                  f"(stored {_word(cd)}): every one of {len(run.slots)} tensors "
                                  + ("holds the same values, widened." if wider else
                                     f"equals {names[c]}'s rounded to {_word(sd)}." if verified else
                                     f"matches {names[c]}'s up to {_word(sd)}'s rounding."))
        return out
    if smap is not None and not _identity(smap):
        out["relation"] = "stack"
        out["method"] = "passthrough"
        out["layer_map"] = [{"layer": sl, "model": names[c + 1], "source_layer": j} for sl, c, j in smap]
        used = sorted({c + 1 for _, c, _ in smap})
        out["parents"] = [{"model": names[c], "layers": sum(1 for _, cc, _ in smap if cc + 1 == c)} for c in used]
        out["summary"] = f"{names[0]} is a layer stack (passthrough): " + _ranges(smap, names) + "."
        return out
    if not related:
        best = min(logp, key=logp.get) if logp else None
        out["summary"] = (f"No evidence that {names[0]} derives from any candidate"
                          + (f" (smallest: {names[best]}, {format_p(logp[best])})" if best else "") + ".")
        return out
    # Some layers derived and others not: partial.
    layer_related = [max(e["z"].values()) > 5.3 for e in layers]  # z 5.3 ~ p 1e-7 per layer
    if any(layer_related) and not all(layer_related):
        out["relation"] = "partial"
        derived = [e["layer"] for e, rel in zip(layers, layer_related, strict=True) if rel]
        out["derived_layers"] = derived
        out["summary"] = (f"{names[0]} is partly derived: {len(derived)} of {len(layers)} layers come from "
                          f"{', '.join(names[i] for i in related)}; the others show no relation.")
        return out
    agree = [r for r in matrix if r.fit.method == method]
    ws = _weights(agree)
    # A merge involves no training: a linear-family recipe that leaves a residual above the storage rounding in most
    # tensors is training on top of something (a merge then trained, or a relative through a common ancestor).
    noisy = sum(r.stats.numel for r in agree if r.fit.params.get("noisy")) > 0.5 * sum(r.stats.numel for r in agree)
    merger = merge_method(method)
    if merger is not None and merger.family != "stack" and not noisy:
        parents = [c for c, v in ws.items() if abs(float(np.mean(v))) >= 0.02]
        if len(parents) >= 2 or merger.needs_base:
            out["relation"] = "merge"
            out["method"] = _method_name(method, agree)
            out["method_info"] = _info(out["method"])
            ses = _ses(agree)
            floor = RESOLUTION if out["suspect_dtype"] in ROUNDED else 2.0**-23
            out["parents"] = [parent_entry(names[c], ws[c], ses[c], floor) for c in parents]
            out["parameters"] = _params(agree, method)
            out["by_role"] = _role_table(run, matrix, method)
            out["method_share"] = round(share, 4)
            n_layers = sum(1 for e in layers if e["layer"] >= 0)
            out["summary"] = _merge_summary(out, names[0], agree, n_layers, logp, names)
            sd = out["suspect_dtype"]
            if is_block_quantized(sd):  # a GGUF of the merge (Rio's were IQ4_XS and Q6_K)
                out["encoding"] = {"suspect": sd}
                if any(r.fit.params.get("grid_cells") for r in agree):
                    how = f"its weights are estimated from the cells of {sd}'s grid"
                else:  # fingerprint samples, or a type without element-wise rounding: least squares, biased
                    how = (f"its weights are least squares through {sd}'s rounding, which biases them by up to "
                           "~0.01 for 4-bit types, so no interval is given; audit the weights for one")
                    for p in out["parents"]:
                        p["interval"] = None
                out["summary"] += f" {names[0]} is stored {sd}: a quantized copy of that merge ({how})."
            return out
    return trained(out, run, matrix, related, logp, ws if merger is not None and merger.family != "stack" else {})


#: storage dtype names as people say them, and their precision (mantissa bits) to tell widening from rounding
_WORDS = {"F32": "float32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8 (e4m3)", "F8_E5M2": "fp8 (e5m2)",
          "F64": "float64"}
_BITS = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7, "F8_E4M3": 3, "F8_E5M2": 2}


def _word(dtype: str) -> str:
    return _WORDS.get(dtype, dtype)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aefhilmnorsx" and not word.startswith("u") else "a"


def _dominant_dtype(run: AuditRun, model: int) -> str:
    """The storage dtype holding most of a model's compared elements."""
    count: Counter[str] = Counter()
    for r in run.slots:
        view = run.views[model]
        if r.slot in view.parts:
            count[view.dtype(r.slot)] += r.stats.numel
    return count.most_common(1)[0][0] if count else "?"


def _absorb_copies(results: list[SlotResult], method: str) -> None:
    """Re-express whole-tensor copies as endpoints of the winning method (SLERP t = 0/1, linear weight 1/0)."""
    if method not in ("slerp", "linear"):
        return
    fitted = [r for r in results if r.fit.method == method]
    if not fitted:
        return
    names = sorted({c for r in fitted for c in r.fit.weights})
    pair0 = None
    if method == "slerp":
        f = fitted[0].fit
        pair0 = next((c for c, w in f.weights.items() if abs(w - (1 - f.params["t"])) < 1e-9), names[0])
    for r in results:
        if r.fit.method != "copy" or len(r.fit.weights) != 1:
            continue
        (c,) = r.fit.weights
        if c not in names:
            continue
        r.fit.method = method
        r.fit.weights = {n: (1.0 if n == c else 0.0) for n in names}
        # a copy of c says w_c = 1 exactly where the others differ from c there, and nothing where they are equal;
        # in rounded storage (bf16, fp16, fp8) it says only that the parents' differences round away here
        e = r.stats.sqdist()
        lc = r.cands.index(c) + 1
        same = any(n in r.cands and e[lc, r.cands.index(n) + 1] == 0 for n in names if n != c)
        rounded = r.stats.suspect_dtype in ROUNDED or "rounded" in r.fit.params
        r.fit.se = {n: (float("inf") if same or rounded else 2.0**-23) for n in names}
        if method == "slerp":
            r.fit.params["t"] = 0.0 if c == pair0 else 1.0


def _identity(smap: list[tuple[int, int, int]]) -> bool:
    return len({c for _, c, _ in smap}) == 1 and all(sl == j for sl, _, j in smap)


def _ranges(smap: list[tuple[int, int, int]], names: dict[int, str]) -> str:
    return stack_summary(smap, names)


def _params(agree: list[SlotResult], method: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("t", "density", "zero_fraction", "top_zero_ratio", "sign_election", "delta_r2", "sum_weights"):
        vals = [r.fit.params[key] for r in agree if key in r.fit.params]
        if vals:
            m, lo, hi = mean_interval(vals)
            out[key] = {"value": round(m, 4), "interval": [round(lo, 4), round(hi, 4)]}
    r2 = [1 - r.fit.rel_rss for r in agree]
    if r2:
        out["r2_min"] = round(float(min(r2)), 6)
    return out


def _method_name(method: str, agree: list[SlotResult]) -> str:
    return method


def _info(method: str) -> dict[str, str] | None:
    m = merge_method(method)
    return None if m is None else m.info()


def _merge_summary(out: dict, suspect: str, agree: list[SlotResult], n_layers: int, logp: dict[int, float],
                   names: dict[int, str]) -> str:
    method = merge_method(out["method"])
    assert method is not None
    layers_hit = len({r.slot.layer for r in agree if r.slot.layer >= 0})
    worst = min(logp.values())
    pname = min(logp, key=logp.get)
    text = method.summarise(out, suspect)  # the method says what it found (modeltrace/methods)
    if method.family == "linear" and not method.needs_base:
        noisy = sum(1 for r in agree if r.fit.params.get("noisy"))
        if noisy:
            text += (f" (in {noisy} of {len(agree)} tensors a residual above storage rounding remains: noise or "
                     "further training after the merge)")
    return (f"{text}, in {layers_hit} of {n_layers} layers; independent of {names[pname]}: {format_p(worst)}.")
