import os
from pathlib import Path

import pytest

try:
    from chromium import Chromium, find_chromium
    from corpus import Corpus, build_corpus
except ImportError:  # tests/ imported as a package
    from tests.chromium import Chromium, find_chromium
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


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance (Ray 2.60 has no local mode), started per test module and shut down after it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for page tests; skipped without it unless MODELTRACE_REQUIRE_CHROMIUM is set (CI)."""
    binary = find_chromium()
    if binary is None:
        if os.environ.get("MODELTRACE_REQUIRE_CHROMIUM"):
            pytest.fail("Chromium is required (apt-get install chromium) but was not found")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    b = Chromium(binary)
    yield b
    b.close()
