"""Inline SVG plots generated in Python: no JavaScript, no CDN, so an HTML report opens offline and prints as is.

Each function returns one `<svg class="plot" data-plot=KIND>` element sized by its viewBox (it scales to the page).
"""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f6fb4", "#d1495b", "#2a9d6f", "#8d5fd3", "#e08a1e", "#6b7a8f", "#c2549d", "#3aa6b9")
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif"


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _open(kind: str, w: int, h: int, label: str) -> str:
    return (f'<svg class="plot" data-plot="{kind}" role="img" aria-label="{escape(label)}" viewBox="0 0 {w} {h}" '
            f'width="100%" style="max-width:{w}px;{FONT}" xmlns="http://www.w3.org/2000/svg">'
            f"<title>{escape(label)}</title>")


def _text(x: float, y: float, s: object, size: int = 12, anchor: str = "middle", fill: str = "#222",
          extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" {extra}>'
            f"{escape(str(s))}</text>")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, t = [], start
    while t <= hi + 1e-9:
        out.append(round(t, 10))
        t += step
    return out


def _legend(items: list[tuple[str, str]], x: float, y: float) -> str:
    parts, cx = [], x
    for name, col in items:
        parts.append(f'<rect x="{cx:.1f}" y="{y - 9:.1f}" width="12" height="12" rx="2" fill="{col}"/>')
        parts.append(_text(cx + 17, y + 1, name, 12, "start"))
        cx += 30 + 7.2 * len(name)
    return "".join(parts)


def weights_plot(series: list[tuple[str, list[tuple[int, float | None, float | None, float | None]]]],
                 title: str = "Merge weight per layer") -> str:
    """Per-layer recipe weight of each parent with its 95% interval (error bars). Layer -1 is shown as emb/head."""
    layers = sorted({p[0] for _, pts in series for p in pts}, key=lambda x: (x >= 0, x))
    vals = [v for _, pts in series for p in pts for v in p[1:] if v is not None and math.isfinite(v)]
    if not layers or not vals:
        return ""
    lo, hi = min(0.0, min(vals)), max(1.0, max(vals))
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    w, h, ml, mr, mt, mb = 760, 320, 56, 16, 56, 48
    pw, ph = w - ml - mr, h - mt - mb
    step = pw / max(1, len(layers))

    def X(i: int, k: int) -> float:
        dodge = (k - (len(series) - 1) / 2) * min(10.0, step / (2 * max(1, len(series))))
        return ml + step * (i + 0.5) + dodge

    def Y(v: float) -> float:
        return mt + ph * (1 - (v - lo) / (hi - lo))

    out = [_open("weights", w, h, title), _text(ml, 20, title, 14, "start", extra='font-weight="600"')]
    for t in _ticks(lo, hi):
        out.append(f'<line x1="{ml}" x2="{w - mr}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e3e6ea"/>')
        out.append(_text(ml - 6, Y(t) + 4, f"{t:g}", 11, "end", "#555"))
    out.append(f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + ph}" stroke="#999"/>')
    for i, layer in enumerate(layers):
        out.append(_text(ml + step * (i + 0.5), mt + ph + 16, "emb/head" if layer < 0 else layer, 11, fill="#555"))
    out.append(_text(ml + pw / 2, h - 8, "layer", 12, fill="#444"))
    out.append(_text(14, mt + ph / 2, "weight", 12, fill="#444", extra=f'transform="rotate(-90 14 {mt + ph / 2})"'))
    for k, (name, pts) in enumerate(series):
        col = colour(k)
        idx = {layer: i for i, layer in enumerate(layers)}
        path = []
        for layer, m, a, b in sorted(pts, key=lambda p: idx[p[0]]):
            if m is None:
                continue
            x = X(idx[layer], k)
            if a is not None and b is not None:
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{Y(a):.1f}" y2="{Y(b):.1f}" stroke="{col}" '
                           'stroke-width="2"/>')
                for yy in (a, b):
                    out.append(f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{Y(yy):.1f}" y2="{Y(yy):.1f}" '
                               f'stroke="{col}" stroke-width="1.5"/>')
            if layer >= 0:
                path.append(f"{x:.1f},{Y(m):.1f}")
            ci = "" if a is None or b is None else f" [{a:.4f}, {b:.4f}]"
            out.append(f'<circle cx="{x:.1f}" cy="{Y(m):.1f}" r="4" fill="{col}"><title>{escape(name)}, layer '
                       f'{"emb/head" if layer < 0 else layer}: {m:.4f}{ci}</title></circle>')
        if len(path) > 1:
            out.append(f'<polyline points="{" ".join(path)}" fill="none" stroke="{col}" stroke-opacity="0.5"/>')
    out.append(_legend([(n, colour(k)) for k, (n, _) in enumerate(series)], ml, 40))
    out.append("</svg>")
    return "".join(out)


def _heat_colour(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "#f1f1f1"
    t = max(-1.0, min(1.0, v))
    lo = (247, 251, 255)
    hi = (8, 48, 107) if t >= 0 else (178, 24, 43)
    a = abs(t)
    r, g, b = (round(lo[j] + (hi[j] - lo[j]) * a) for j in range(3))
    return f"rgb({r},{g},{b})"


def heatmap(title: str, layers: list[int], roles: list[str], values: list[list[float | None]]) -> str:
    """Layer x tensor-role grid of a similarity in [-1, 1] (blue positive, red negative, grey not compared)."""
    if not layers or not roles:
        return ""
    cw = max(34, min(70, 640 // max(1, len(roles))))
    ch = max(14, min(26, 420 // max(1, len(layers))))
    ml, mt, mr, mb = 74, 40, 90, 70
    w, h = ml + cw * len(roles) + mr, mt + ch * len(layers) + mb
    out = [_open("heatmap", w, h, title), _text(8, 20, title, 14, "start", extra='font-weight="600"')]
    for i, layer in enumerate(layers):
        y = mt + i * ch
        out.append(_text(ml - 6, y + ch / 2 + 4, "emb/head" if layer < 0 else f"layer {layer}", 11, "end", "#444"))
        for j, v in enumerate(values[i]):
            x = ml + j * cw
            label = "not compared" if v is None else f"{v:.3f}"
            out.append(f'<rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{_heat_colour(v)}">'
                       f"<title>{escape(roles[j])}, {'emb/head' if layer < 0 else 'layer ' + str(layer)}: "
                       f"{label}</title></rect>")
            if v is not None and ch >= 14 and cw >= 34:
                out.append(_text(x + cw / 2, y + ch / 2 + 4, f"{0.0 if abs(v) < 0.005 else v:.2f}", 10,
                                 fill="#fff" if abs(v) > 0.55 else "#222"))
    for j, role in enumerate(roles):
        x = ml + j * cw + cw / 2
        y = mt + len(layers) * ch + 8
        out.append(_text(x, y, role, 10, "end", "#444", extra=f'transform="rotate(-40 {x:.1f} {y:.1f})"'))
    # colour bar
    bx, by, bh = w - mr + 20, mt, min(160, ch * len(layers))
    for k in range(20):
        v = 1 - 2 * k / 19
        out.append(f'<rect x="{bx}" y="{by + k * bh / 20:.1f}" width="14" height="{bh / 20 + 0.5:.1f}" '
                   f'fill="{_heat_colour(v)}"/>')
    for v, yy in ((1, by), (0, by + bh / 2), (-1, by + bh)):
        out.append(_text(bx + 20, yy + 4, f"{v:g}", 10, "start", "#444"))
    out.append("</svg>")
    return "".join(out)


def layer_map_plot(entries: list[tuple[int, str, int]], models: list[str], title: str = "Layer map") -> str:
    """One box per suspect layer, coloured by the model it was copied from, labelled with the source layer."""
    if not entries:
        return ""
    n = len(entries)
    bw = max(22, min(60, 700 // n))
    ml, mt = 16, 40
    w, h = ml * 2 + bw * n, 128
    cols = {m: colour(i) for i, m in enumerate(models)}
    out = [_open("layermap", max(w, 420), h, title), _text(ml, 20, title, 14, "start", extra='font-weight="600"')]
    for i, (layer, model, src) in enumerate(entries):
        x = ml + i * bw
        out.append(f'<rect x="{x}" y="{mt}" width="{bw - 2}" height="34" rx="3" fill="{cols.get(model, "#999")}">'
                   f"<title>suspect layer {layer} = {escape(model)} layer {src}</title></rect>")
        out.append(_text(x + bw / 2 - 1, mt + 21, src, 11, fill="#fff"))
        out.append(_text(x + bw / 2 - 1, mt + 50, layer, 10, fill="#555"))
    out.append(_text(ml, mt + 66, "box: source layer · below: suspect layer", 10, "start", "#666"))
    out.append(_legend([(m, cols[m]) for m in models], ml + 250, mt + 66))
    out.append("</svg>")
    return "".join(out)


def shares_plot(rows: list[tuple[str, float, float | None, float | None]], title: str) -> str:
    """Horizontal bars of shares (0-100%) with 95% interval whiskers, e.g. how often a model names each identity."""
    if not rows:
        return ""
    ml, mr, mt, rh = 150, 60, 40, 26
    w, h = 640, mt + rh * len(rows) + 34
    pw = w - ml - mr

    def X(v: float) -> float:
        return ml + pw * max(0.0, min(1.0, v))

    out = [_open("shares", w, h, title), _text(8, 20, title, 14, "start", extra='font-weight="600"')]
    for t in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{mt - 4}" y2="{mt + rh * len(rows)}" '
                   'stroke="#e3e6ea"/>')
        out.append(_text(X(t), mt + rh * len(rows) + 16, f"{100 * t:.0f}%", 11, fill="#555"))
    for i, (name, share, lo, hi) in enumerate(rows):
        y = mt + i * rh
        col = colour(i)
        out.append(_text(ml - 8, y + rh / 2 + 4, name, 12, "end"))
        out.append(f'<rect x="{ml}" y="{y + 5}" width="{X(share) - ml:.1f}" height="{rh - 10}" fill="{col}" '
                   f'opacity="0.85"><title>{escape(name)}: {100 * share:.1f}%</title></rect>')
        if lo is not None and hi is not None:
            ym = y + rh / 2
            out.append(f'<line x1="{X(lo):.1f}" x2="{X(hi):.1f}" y1="{ym}" y2="{ym}" stroke="#222"/>')
            for xx in (lo, hi):
                out.append(f'<line x1="{X(xx):.1f}" x2="{X(xx):.1f}" y1="{ym - 5}" y2="{ym + 5}" stroke="#222"/>')
        out.append(_text(X(hi if hi is not None else share) + 6, y + rh / 2 + 4, f"{100 * share:.1f}%", 11, "start"))
    out.append("</svg>")
    return "".join(out)
