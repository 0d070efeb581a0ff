"""MLflow tracking: store location, one run per stage with its tags, runs of one pipeline grouped."""

from __future__ import annotations

import hashlib
import pytest
import yaml

from baize import tracking
from stages import _common


def test_default_store_is_sqlite_at_root_unless_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


@pytest.mark.parametrize("sub", [".dvc/tmp/exps/tmp/abc123", ".dvc/tmp/exps/run/xyz/workspace/sub"])
def test_project_root_escapes_dvc_exp_temp_workspaces(tmp_path, monkeypatch, sub):
    work = tmp_path / sub
    work.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(work)
    assert _common.project_root() == tmp_path.resolve()
    monkeypatch.setenv("DVC_ROOT", str(work))
    assert _common.project_root() == tmp_path.resolve()


def test_project_root_is_cwd_in_a_normal_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _common.project_root() == tmp_path.resolve()


def test_flatten_params():
    flat = tracking.flatten({"train": {"lora_r": 8, "target_modules": ["q", "v"], "x": None}, "a": "s"})
    assert flat == {"train.lora_r": "8", "train.target_modules": '["q", "v"]', "train.x": "null", "a": "s"}


def test_input_hashes_come_from_dvc_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code.py").write_text("print(1)\n")
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"b": {"cmd": "x", "deps": ["data/a.jsonl", "code.py"], "outs": ["out"]}}})
    )
    (tmp_path / "dvc.lock").write_text(
        yaml.safe_dump({"schema": "2.0", "stages": {"a": {"outs": [{"path": "data/a.jsonl", "md5": "abc"}]}}})
    )
    hashes = _common.input_hashes("b")
    assert hashes["dvc.dep.data/a.jsonl"] == "abc"
    assert hashes["dvc.dep.code.py"] == hashlib.md5(b"print(1)\n").hexdigest()


def test_pipeline_id_env_wins_and_is_stable(monkeypatch):
    monkeypatch.setenv("BAIZE_PIPELINE_ID", "p-1")
    assert _common.pipeline_id() == "p-1"
    monkeypatch.delenv("BAIZE_PIPELINE_ID")
    assert _common.pipeline_id() == _common.pipeline_id()


def test_stage_runs_share_one_parent_per_pipeline(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    tags = {"mlflow.source.git.commit": "deadbeef", "dvc.exp_name": "exp-1", "dvc.dep.data/x": "abc"}
    for stage in ("seed", "selfchat"):
        with tracking.stage_run(
            stage, experiment="t", tracking_uri=mlflow_uri, params={"s": {"k": 1}}, tags=tags,
            pipeline_id="pipe-1", artifact_root=tmp_path / "art",
        ):
            tracking.log_metrics({"n": 3, "by_reason": {"x": 1}, "label": "skip"})
    with tracking.stage_run("seed", experiment="t", tracking_uri=mlflow_uri, params={}, tags={}, pipeline_id="pipe-2"):
        pass

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("t")
    assert exp.artifact_location == (tmp_path / "art").resolve().as_uri()
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`baize.pipeline_id` = 'pipe-1'")
    parents = [r for r in runs if r.data.tags["baize.kind"] == "pipeline"]
    children = [r for r in runs if r.data.tags["baize.kind"] == "stage"]
    assert len(parents) == 1 and len(children) == 2
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["mlflow.source.git.commit"] == "deadbeef"
        assert run.data.tags["dvc.exp_name"] == "exp-1"
        assert run.data.tags["dvc.dep.data/x"] == "abc"
        assert run.data.params == {"s.k": "1"}
        assert run.data.metrics == {"n": 3.0, "by_reason.x": 1.0}
        assert run.info.status == "FINISHED"
    assert {r.data.tags["baize.stage"] for r in children} == {"seed", "selfchat"}


def test_failed_stage_marks_run_failed(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    with pytest.raises(RuntimeError):
        with tracking.stage_run("train", experiment="t", tracking_uri=mlflow_uri, params={}, tags={}):
            raise RuntimeError("boom")
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    assert run.info.status == "FAILED"


def test_input_hashes_resolve_dvc_templating(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("validate:\n  input: data/in.jsonl\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"v": {"cmd": "x", "deps": ["${validate.input}"]}}}))
    (tmp_path / "dvc.lock").write_text(
        yaml.safe_dump({"schema": "2.0", "stages": {"s": {"outs": [{"path": "data/in.jsonl", "md5": "f00"}]}}})
    )
    assert _common.input_hashes("v") == {"dvc.dep.data/in.jsonl": "f00"}
