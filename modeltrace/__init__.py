"""modeltrace: establish where an open-weight model came from.

    import modeltrace
    result = modeltrace.audit("./rio", ["./nex", "./qwen"], options=modeltrace.AuditOptions(sample=0.05))
    result.relation, result.method, [(p.model, p.weight, p.interval) for p in result.parents]

The public names are those in `__all__` (documented in docs/api.md); every other module is private to the package
even where its name has no underscore. They are imported on first use, so `import modeltrace` costs no more than
this file: a command or a caller pays only for what it uses.

`modeltrace.audit` and `modeltrace.identify` are functions although modeltrace/audit.py and modeltrace/identify.py
are modules: the package object keeps its public functions when the import system binds those submodules to it
(`from modeltrace.audit import run_audit` still reaches the module; `import modeltrace.audit as m` gives the function).
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat the name alike)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "inspect": "modeltrace.api",
    "audit": "modeltrace.api",
    "identify": "modeltrace.api",
    "fingerprint": "modeltrace.api",
    "probe_identity": "modeltrace.api",
    "probe_compare": "modeltrace.api",
    "load_report": "modeltrace.api",
    "render": "modeltrace.api",
    "save": "modeltrace.api",
    "verify": "modeltrace.api",
    "verify_attestation": "modeltrace.api",
    "Index": "modeltrace.index.store",
    "AuditOptions": "modeltrace.options",
    "ReadOptions": "modeltrace.options",
    "ProbeOptions": "modeltrace.options",
    "AuditResult": "modeltrace.results",
    "InspectResult": "modeltrace.results",
    "IdentifyResult": "modeltrace.results",
    "IdentityProbe": "modeltrace.results",
    "CompareProbe": "modeltrace.results",
    "Verdict": "modeltrace.results",
    "Parent": "modeltrace.results",
    "PValue": "modeltrace.results",
    "LayerRow": "modeltrace.results",
    "Recipe": "modeltrace.results",
    "Replay": "modeltrace.results",
    "Hit": "modeltrace.results",
    "Report": "modeltrace.results",
    "Finding": "modeltrace.results",
    "Relation": "modeltrace.results",
    "RELATIONS": "modeltrace.results",
    "MergeMethod": "modeltrace.methods",
    "merge_methods": "modeltrace.methods",
    "register_method": "modeltrace.methods",
    "SCHEMA_VERSION": "modeltrace.schema",
    "ModelTraceError": "modeltrace.errors",
    "InputError": "modeltrace.errors",
    "RemoteError": "modeltrace.errors",
}

__all__ = [
    "AuditOptions", "AuditResult", "CompareProbe", "Finding", "Hit", "IdentifyResult", "IdentityProbe", "Index",
    "InputError", "InspectResult", "LayerRow", "MergeMethod", "ModelTraceError", "PValue", "Parent", "ProbeOptions",
    "RELATIONS", "ReadOptions", "Recipe", "Relation", "RemoteError", "Replay", "Report", "SCHEMA_VERSION", "Verdict",
    "audit", "fingerprint", "identify", "inspect", "load_report", "merge_methods", "probe_compare", "probe_identity",
    "register_method", "render", "save", "verify", "verify_attestation",
]


class _Package(types.ModuleType):
    """The package module: public names resolved on first use, and never replaced by a submodule of that name."""

    def __getattr__(self, name: str) -> Any:
        target = _EXPORTS.get(name)
        if target is None:
            raise AttributeError(f"module 'modeltrace' has no attribute {name!r}")
        value = getattr(importlib.import_module(target), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return  # the import system binding modeltrace/audit.py or identify.py: keep the public function
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from modeltrace.api import (
        audit,
        fingerprint,
        identify,
        inspect,
        load_report,
        probe_compare,
        probe_identity,
        render,
        save,
    )
    from modeltrace.errors import InputError, ModelTraceError, RemoteError
    from modeltrace.index.store import Index
    from modeltrace.methods import MergeMethod, merge_methods, register_method
    from modeltrace.options import AuditOptions, ProbeOptions, ReadOptions
    from modeltrace.results import (
        RELATIONS,
        AuditResult,
        CompareProbe,
        Finding,
        Hit,
        IdentifyResult,
        IdentityProbe,
        InspectResult,
        LayerRow,
        Parent,
        PValue,
        Recipe,
        Relation,
        Replay,
        Report,
        Verdict,
    )
    from modeltrace.schema import SCHEMA_VERSION
