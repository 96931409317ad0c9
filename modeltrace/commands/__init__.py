"""CLI command modules, discovered automatically: each module here defines `register(app: typer.Typer)`.

A new command family (reports, index/identify, probes, ...) is one new module in this package; cli.py needs no edit.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
