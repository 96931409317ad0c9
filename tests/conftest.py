import os
from pathlib import Path

import pytest

try:
    from corpus import Corpus, build_corpus
except ImportError:  # tests/ imported as a package
    from tests.corpus import Corpus, build_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Tiny models with known provenance (see tests/corpus.py). Set MODELTRACE_TEST_CORPUS to a folder to keep and
    reuse the build between runs; the build is idempotent and locked, so xdist workers can share that folder."""
    env = os.environ.get("MODELTRACE_TEST_CORPUS")
    if env:
        root = Path(env)
    else:
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):  # workers' basetemps share this run's folder: build once there
            base = base.parent
        root = base / "modeltrace-corpus"
    return build_corpus(root)
