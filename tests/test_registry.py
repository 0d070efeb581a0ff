"""The model registry on the default local store (SQLite): the same rules as on a team's server
(tests/test_team.py): one version per adapter content, @champion moved only by a lower perplexity."""

from __future__ import annotations

import json
from pathlib import Path

from baize import registry


def _adapter(folder: Path, content: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_text(content)
    return folder


def test_versions_and_champion_on_the_local_store(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    results = []
    for label, ppl in (("A", 3.0), ("B", None), ("C", 3.5), ("D", 2.0), ("C", 3.5)):
        run = client.create_run(exp).info.run_id
        reg = registry.register_adapter(_adapter(tmp_path / f"{label}{len(results)}", label), name="m",
                                        tracking_uri=uri, run_id=run, metrics={"ppl": ppl, "stop": 1.0})
        results.append((reg.version, reg.new, reg.promoted))
        assert reg.summary().startswith("registry: ")
    # B has no perplexity: registered, never champion; the second C is the first C's content: no new version.
    assert results == [("1", True, True), ("2", True, False), ("3", True, False), ("4", True, True),
                       ("3", False, False)]
    assert registry.champion("m", uri) == "4"
    assert client.get_model_version("m", "4").tags["metric.ppl"] == "2.0"
    # As a user's `baize chat --adapter models:/m@champion` would: a fresh process with only MLFLOW_TRACKING_URI
    # (in this process, other tests' MLflow calls leave global state behind).
    import subprocess
    import sys

    code = ("import sys; from baize import inference; "
            "print(inference.resolve_adapter('models:/m@champion', dst=sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dl")], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    local = Path(proc.stdout.strip().splitlines()[-1])
    assert (local / "adapter_model.safetensors").read_text() == "D"
