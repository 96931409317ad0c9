"""Fixtures for report tests: carded copies of corpus models (the corpus has no cards) and audit reports built
in-process once per session, shared by every report test."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_helpers import NEX_CARD, QWEN_CARD, RIO_CARD, build_audit_report, carded_copy


@pytest.fixture(scope="session")
def rio_models(corpus, tmp_path_factory) -> dict[str, Path]:
    """rio = 0.6 nex + 0.4 qwen released as an original MIT model; nex and qwen are Apache-2.0."""
    root = tmp_path_factory.mktemp("rio-case")
    return {"rio": carded_copy(corpus, "m_linear_rio", root / "rio", RIO_CARD),
            "nex": carded_copy(corpus, "ft_a1", root / "nex", NEX_CARD),
            "qwen": carded_copy(corpus, "ft_a2", root / "qwen", QWEN_CARD)}


@pytest.fixture(scope="session")
def rio_report(rio_models):
    return build_audit_report(rio_models["rio"], [rio_models["nex"], rio_models["qwen"]])


@pytest.fixture(scope="session")
def stack_report(corpus):
    return build_audit_report(corpus.path("s_stack_2x2"), [corpus.path("ft_a1"), corpus.path("base_b")])
