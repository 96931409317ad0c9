"""The provenance service for real: `modeltrace serve` (uvicorn) as a subprocess on 127.0.0.1 and a free port, against
the local Hub stand-in (tests/hubserver.py) serving corpus models, with an index seeded with known models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sqlalchemy")

from hubserver import serve  # noqa: E402

from tests.service.harness import Service  # noqa: E402
from tests.service.pg import find_pg_bin, postgres_cluster  # noqa: E402

#: the index every service starts from: a team's library of known models (local folders)
KNOWN = ("base_a", "ft_a1", "ft_a2", "base_b")


@pytest.fixture(scope="module")
def seeded_index(corpus, tmp_path_factory) -> Path:
    """An index holding the team's known models (fingerprinted from local folders), copied per service."""
    from modeltrace.fingerprint import make_fingerprint
    from modeltrace.index import Index

    path = tmp_path_factory.mktemp("index") / "known.sqlite"
    with Index(path, create=True) as ix:
        for name in KNOWN:
            ix.add(make_fingerprint(str(corpus.path(name))), name)
    return path


def corpus_repos(corpus, tmp: Path) -> dict[str, Any]:
    """Repositories the Hub stand-in serves: uploads made of corpus models (with and without model cards)."""
    evil = tmp / "evil"
    if not evil.exists():
        shutil.copytree(corpus.path("ft_a1"), evil)
        (evil / "README.md").write_text(
            "---\nlicense: \"<img src=http://example.invalid/x.png onerror=window.__pwned=1>\"\n"
            "base_model: \"<script>window.__pwned=1</script>\"\n---\n"
            "# Our own model <script>window.__pwned=2</script>\nTrained from scratch.\n")
    return {"org/rio": corpus.path("m_linear_rio"), "org/ft": corpus.path("ft_b1"),
            "org/indep": corpus.path("indep_00"), "org/evil": evil,
            "org/history": {"r1": corpus.path("ft_a1"), "r2": corpus.path("m_linear_unnorm")}}


@pytest.fixture(scope="module")
def hub(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hubrepos")
    with serve(corpus_repos(corpus, tmp)) as srv:
        yield srv


@pytest.fixture
def make_service(tmp_path, hub, seeded_index):
    """Factory: a started service on a fresh SQLite database (or `db`) and a copy of the seeded index."""
    started: list[Service] = []

    def make(db: str | None = None, args: list[str] | None = None, env: dict[str, str] | None = None,
             index: Path | None = None) -> Service:
        if index is None:
            index = tmp_path / "index.sqlite"
            if not index.exists():
                shutil.copy(seeded_index, index)
        svc = Service(tmp_path, hub, db or f"sqlite:///{tmp_path / 'service.sqlite'}", index, args, env)
        started.append(svc)
        return svc.start()

    yield make
    for s in started:
        s.stop()



@pytest.fixture(scope="module")
def shared_service(tmp_path_factory, hub, seeded_index):
    """Factory for one service per test module (started once with the given arguments)."""
    started: list[Service] = []

    def make(args: list[str] | None = None, env: dict[str, str] | None = None) -> Service:
        tmp = tmp_path_factory.mktemp("service")
        index = tmp / "index.sqlite"
        shutil.copy(seeded_index, index)
        svc = Service(tmp, hub, f"sqlite:///{tmp / 'service.sqlite'}", index, args, env)
        started.append(svc)
        return svc.start()

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL cluster (tests/service/pg.py); skipped when the server is not installed, unless
    MODELTRACE_REQUIRE_POSTGRES=1 (CI installs it)."""
    import os

    if find_pg_bin() is None:
        if os.environ.get("MODELTRACE_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required (apt-get install postgresql) but was not found")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres_cluster() as url:
        yield url
