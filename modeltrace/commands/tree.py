"""`modeltrace tree`: the family tree of every model in the index (or one model's ancestors and descendants), as text,
JSON, DOT, CycloneDX or an interactive HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modeltrace.commands.index import IndexOpt, _open
from modeltrace.console import err, guarded, out
from modeltrace.errors import InputError

FORMAT_HELP = "html | json | dot | cyclonedx (default: from the -o suffix, else a text listing on stdout)."


def _format(fmt: str | None, output: Path | None) -> str | None:
    from modeltrace.tree.formats import FORMATS, SUFFIXES

    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    if output is not None:
        name = output.name.lower()
        for suffix in sorted(SUFFIXES, key=len, reverse=True):
            if name.endswith(suffix):
                return SUFFIXES[suffix]
        raise InputError(f"{output}: cannot tell the format from the name; pass --format")
    return None


def _text(tree) -> None:
    roots = sorted((n for n, a in tree.nodes.items() if not tree.parents(n)),
                   key=lambda n: (-tree.nodes[n]["family_size"], n))
    shown: set[str] = set()

    def walk(n: str, depth: int) -> None:
        a = tree.nodes[n]
        again = n in shown
        out.print(f"{'  ' * depth}{n}  [{a['role']}]  {'(see above)' if again else a['summary']}",
                  markup=False, highlight=False, soft_wrap=True)
        if again:
            return
        shown.add(n)
        for e in sorted(tree.children(n), key=lambda e: e["child"]):
            walk(e["child"], depth + 1)

    for r in roots:
        walk(r, 0)
    s = tree.stats
    err.print(f"{s.get('models')} models, {len(tree.edges)} relations, {s.get('families')} families; "
              f"{s.get('seconds')} s ({s.get('pairs_computed')} pairs computed, {s.get('families_reused')} "
              f"families from the cache)", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("tree")
    @guarded
    def tree_cmd(
        index: IndexOpt = None,
        fmt: Annotated[str | None, typer.Option("--format", "-f", help=FORMAT_HELP, show_default=False)] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to FILE instead of stdout.",
                                                    show_default=False)] = None,
        model: Annotated[str | None, typer.Option("--model", help="Only NAME's ancestors and descendants.",
                                                  show_default=False)] = None,
    ) -> None:
        """The family tree of every indexed model: roots, fine-tunes (with the evidence for their direction), merges
        with method and weights, stacks with their layer map, re-encoded and quantized copies.

        Pair evidence and solved families are cached in the index file, so after `index add` only the new model's
        pairs and its family are worked out again.

        Examples: modeltrace tree -o tree.html;  modeltrace tree --model my-merge --format json
        """
        from modeltrace.tree import build_tree
        from modeltrace.tree.formats import render

        kind = _format(fmt, output)
        with _open(index) as ix:
            if ix.count() == 0:
                raise InputError(f"{ix.path}: the index is empty; add models with `modeltrace index add MODEL`")
            tree = build_tree(ix)
        if model is not None:
            if model not in tree.nodes:
                raise InputError(f"{model!r} is not in the index (see `modeltrace index list`)")
            tree = tree.subtree(model)
        if kind is None:
            _text(tree)
            return
        text = render(tree, kind)
        if output is None:
            out.file.write(text)
            return
        try:
            output.write_text(text)
        except OSError as exc:
            raise InputError(f"{output}: cannot write ({exc.strerror})") from None
        err.print(f"wrote {kind} tree of {len(tree.nodes)} models to {output}", markup=False, highlight=False)
