"""Shared fixtures: the project root, the shared Baize fixtures, and one materialized base model per checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures" / "baize-original"

# No test may reach a hub or phone home; the machine has no network anyway, this makes failures fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def baize_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("../shared/fixtures/baize-original is not present")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once per checkout (~20 s) and reused.

    Kept under .pytest_cache (git-ignored) so repeated test sessions skip the conversion; a folder
    without its provenance file (interrupted conversion) is redone.
    """
    from filelock import FileLock

    from baize.base_model import materialize

    out = ROOT / ".pytest_cache" / "baize-base-model"
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):  # pytest-xdist workers: one converts, the others wait for it
        if not (out / "source.json").is_file():
            materialize("packaged:smollm2-135m-instruct", out)
    return out


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private SQLite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# The end-to-end modules run several pipelines each (minutes); collected first, so that under pytest-xdist
# (`make test`: one module per process) they start at once and the short modules fill the other process.
LONG_FIRST = ("test_team_e2e.py", "test_pipeline_e2e.py", "test_sdf.py", "test_evaluate.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the order within a module is kept
