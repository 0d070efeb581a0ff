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


def _runs(uri, experiment="t"):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("baize.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("baize.kind") == "stage"]
    return client, exp, parents, stages


def test_experiment_opens_in_the_model_training_view(mlflow_uri):
    """MLflow 3's UI picks the experiment's view from `mlflow.experimentKind`: without it a new store opens on the
    GenAI traces overview (or asks); an experiment made earlier gets the tag, a kind a user chose is kept."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    client.create_experiment("old")  # made before the tag existed
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("t", "old", "chosen"):
        with tracking.stage_run("seed", experiment=name, tracking_uri=mlflow_uri, params={}, tags={}):
            pass
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind") for name in ("t", "old", "chosen")}
    assert kinds == {"t": "custom_model_development", "old": "custom_model_development", "chosen": "genai_development"}


def test_parent_run_spans_the_pipeline_and_stage_runs_time_the_work(mlflow_uri):
    import time

    now = int(time.time() * 1000)
    pipeline_start = now - 60_000
    for i, stage in enumerate(("seed", "selfchat")):
        with tracking.stage_run(
            stage, experiment="t", tracking_uri=mlflow_uri, params={}, tags={}, pipeline_id="pipe-1",
            run_name=f"{stage} · exp-a", started_ms=now - 30_000 + i * 10_000,
            pipeline_name="exp-a", pipeline_started_ms=pipeline_start,
        ):
            time.sleep(0.05)
    _, _, [parent], stages = _runs(mlflow_uri)
    by_name = {r.info.run_name: r for r in stages}
    assert set(by_name) == {"seed · exp-a", "selfchat · exp-a"}
    # A stage that opens its run after its work still shows the work's duration (the run starts with the stage).
    assert by_name["seed · exp-a"].info.start_time == now - 30_000
    assert by_name["selfchat · exp-a"].info.start_time == now - 20_000
    assert parent.info.run_name == "exp-a"
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time == pipeline_start
    assert parent.info.end_time >= max(r.info.end_time for r in stages)
    assert parent.info.end_time - parent.info.start_time >= 60_000


def test_failed_stage_fails_the_parent_and_a_later_stage_keeps_it_failed(mlflow_uri):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("train", experiment="t", tracking_uri=mlflow_uri, params={}, tags={}, pipeline_id="p"):
            raise RuntimeError("boom")
    _, _, [parent], _ = _runs(mlflow_uri)
    assert parent.info.status == "FAILED"
    with tracking.stage_run("evaluate", experiment="t", tracking_uri=mlflow_uri, params={}, tags={}, pipeline_id="p"):
        pass
    _, _, [parent], stages = _runs(mlflow_uri)
    assert parent.info.status == "FAILED" and len(stages) == 2


def test_a_killed_stage_leaves_the_parent_finished_up_to_its_start(tmp_path, mlflow_uri):
    """kill -9 runs no handler: the parent must already be whole (not RUNNING forever) when the stage's run opens."""
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "from baize import tracking\n"
        f"with tracking.stage_run('train', experiment='t', tracking_uri={mlflow_uri!r}, params={{}}, tags={{}},"
        " pipeline_id='p'):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr
    _, _, [parent], [stage] = _runs(mlflow_uri)
    assert stage.info.status == "RUNNING"  # MLflow's own record of a killed run
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= stage.info.start_time


def _project(tmp_path, monkeypatch, params: str):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "params.yaml").write_text(params)
    return tmp_path


def test_run_names_tell_experiments_apart(tmp_path, monkeypatch, mlflow_uri):
    from baize.config import TrackingParams

    monkeypatch.setenv("BAIZE_PIPELINE_ID", "pipe-a")
    monkeypatch.setenv("DVC_EXP_NAME", "raspy-aril")
    _project(tmp_path, monkeypatch, "train:\n  lr: 1\n")
    with _common.mlflow_run("train", TrackingParams(experiment="t"), ("train",)):
        pass
    monkeypatch.delenv("DVC_EXP_NAME")
    for pid, lr in (("pipe-b", 2), ("pipe-c", 3)):
        monkeypatch.setenv("BAIZE_PIPELINE_ID", pid)
        (tmp_path / "params.yaml").write_text(f"train:\n  lr: {lr}\n")
        with _common.mlflow_run("train", TrackingParams(experiment="t"), ("train",)):
            pass
    _, _, parents, stages = _runs(mlflow_uri)
    names = sorted(r.info.run_name for r in stages)
    assert "train · raspy-aril" in names
    assert len(set(names)) == 3 and all(n.startswith("train · ") for n in names)
    assert {p.info.run_name for p in parents} >= {"raspy-aril"}
    assert len({p.info.run_name for p in parents}) == 3
    exp_run = next(r for r in stages if r.info.run_name == "train · raspy-aril")
    assert exp_run.data.tags["dvc.exp_name"] == "raspy-aril"
    # The stage run starts when the stage's process did (pytest's here), not when the run was opened.
    import psutil

    assert exp_run.info.start_time == int(psutil.Process().create_time() * 1000)
