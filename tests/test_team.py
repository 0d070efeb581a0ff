"""Team mode on real services, without a model: PostgreSQL (initdb / pg_ctl in a temporary folder), `mlflow server`
with the basic-auth app and proxied artifacts, and sshd for the DVC remote, all on 127.0.0.1 and all stopped at the
end. What a pipeline stage and the registry do against them: runs with their parent, tags and artifacts; a wrong
password and a read-only user refused in one line; the champion alias; `models:/name@champion`; a restart of the
server and of its database; `dvc push` over SSH from one clone and `dvc pull` into another.

The whole pipeline against the same services: tests/test_team_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from baize import registry, tracking
from baize.errors import BaizeError
from baize.team import TeamServices, _pg_bin, add_user

ROOT = Path(__file__).resolve().parents[1]


def _have_services() -> str | None:
    try:
        _pg_bin("initdb")
    except BaizeError:
        return "no PostgreSQL (apt-get install -y postgresql)"
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").is_file()):
        return "no sshd (apt-get install -y openssh-server)"
    try:
        import flask_wtf  # noqa: F401  (mlflow[auth])
        import psycopg  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} missing (pip install -e '.[team]')"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_have_services() is not None, reason=str(_have_services()))]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    svc = TeamServices(root=tmp_path_factory.mktemp("team"))
    svc.up()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield svc
    finally:
        svc.down(remove=True)
        # stage_run made the server this process's default store (mlflow.set_tracking_uri): undo it for later tests.
        import mlflow

        mlflow.set_tracking_uri(before)


@pytest.fixture
def admin_env(services, monkeypatch):
    for key, value in services.env().items():
        monkeypatch.setenv(key, value)
    # Fail fast when a test stops a server on purpose (the default retries for minutes, riding out a restart).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    return services.env()


def _fake_adapter(folder: Path, content: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_text(content)
    return folder


def _stage(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """A real stage entrypoint (the seed stage: no model) in a project folder with the micro profile."""
    return subprocess.run([sys.executable, "-m", "stages.seed", "--out", "data/seeds/seeds.jsonl", *args],
                          cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)


@pytest.fixture
def project(tmp_path):
    shutil.copy(ROOT / "profiles" / "micro.yaml", tmp_path / "params.yaml")
    return tmp_path


def _stage_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "BAIZE_"))}
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", **extra)
    return env


def test_stage_runs_with_parent_tags_and_proxied_artifacts(admin_env, services, tmp_path):
    from mlflow import MlflowClient

    uri = admin_env["MLFLOW_TRACKING_URI"]
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    ids = []
    for stage in ("a", "b"):
        with tracking.stage_run(stage, experiment="team-runs", tracking_uri=uri, params={"x": {"y": 1}},
                                tags={"dvc.dep.data/x": "abc"}, pipeline_id="pipe-1",
                                artifact_root=tmp_path / "never-used") as run:
            import mlflow

            mlflow.log_artifact(str(artifact))
            tracking.log_metrics({"m": {"n": 2.5}})
            ids.append(run.info.run_id)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("team-runs")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server stores them; clients need no keys
    runs = [client.get_run(i) for i in ids]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {runs[0].data.tags["mlflow.parentRunId"]}
    assert all(r.info.status == "FINISHED" and r.data.params["x.y"] == "1" and r.data.metrics["m.n"] == 2.5
               for r in runs)
    assert runs[1].data.tags["dvc.dep.data/x"] == "abc" and runs[1].data.tags["baize.stage"] == "b"
    import mlflow

    got = Path(mlflow.artifacts.download_artifacts(f"runs:/{ids[1]}/note.txt", dst_path=str(tmp_path / "dl")))
    assert got.read_text() == "hello"
    assert list((services.root / "mlflow-artifacts").rglob("note.txt"))  # stored by the server, not the client
    assert not (tmp_path / "never-used").exists()


def test_a_wrong_password_stops_the_stage_in_one_line(services, project):
    proc = _stage(project, _stage_env({**services.env(), "MLFLOW_TRACKING_PASSWORD": "not-the-password-1"}))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLflow server http://127.0.0.1:"), proc.stderr
    assert "not authenticated as 'admin'" in lines[0]
    assert "not-the-password-1" not in proc.stderr + proc.stdout
    assert not (project / "data" / "seeds" / "seeds.jsonl").exists()  # refused before any work


def test_a_read_only_user_can_neither_log_a_run_nor_move_the_alias(admin_env, services, project, tmp_path):
    from mlflow import MlflowClient

    uri = admin_env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    if client.get_experiment_by_name("baize-micro") is None:
        client.create_experiment("baize-micro")
    first_run = client.create_run(client.get_experiment_by_name("baize-micro").experiment_id).info.run_id
    reg = registry.register_adapter(_fake_adapter(tmp_path / "a", "A"), name="team-ro", tracking_uri=uri,
                                    run_id=first_run, metrics={"ppl": 5.0})
    add_user(uri, "reader", "reader-password-1")  # the server's default permission: READ

    env = _stage_env({"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "reader",
                      "MLFLOW_TRACKING_PASSWORD": "reader-password-1"})
    proc = _stage(project, env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "user 'reader' may not do this (/api/2.0/mlflow/runs/create)" in lines[0], proc.stderr
    assert "reader-password-1" not in proc.stderr + proc.stdout

    from mlflow.exceptions import MlflowException

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ[key] = env[key]
    try:
        with pytest.raises(BaizeError, match=r"^registry 'team-ro': MLflow server .*user 'reader' may not do this"):
            registry.register_adapter(_fake_adapter(tmp_path / "b", "B"), name="team-ro", tracking_uri=uri,
                                      run_id=first_run, source_run_id=first_run, metrics={"ppl": 1.0})
        with pytest.raises(MlflowException) as caught:
            MlflowClient(uri).set_registered_model_alias("team-ro", "champion", reg.version)
        line = str(tracking.explain(caught.value, uri))
        assert "user 'reader' may not do this" in line and "\n" not in line and "reader-password-1" not in line
    finally:
        for key, value in admin_env.items():
            os.environ[key] = value
    assert registry.champion("team-ro", uri) == reg.version


def test_the_champion_alias_moves_only_to_a_better_version(admin_env, tmp_path):
    from mlflow import MlflowClient

    from baize import inference

    uri = admin_env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("team-reg") or client.get_experiment(client.create_experiment("team-reg"))
    seen = []
    for label, ppl in (("A", 5.0), ("B", 6.0), ("C", 4.0), ("A", 5.0)):
        run = client.create_run(exp.experiment_id)
        adapter = _fake_adapter(tmp_path / label, label)
        train = None
        if label == "C":  # as the pipeline does: the train run logged the adapter, the version points at its files
            train = client.create_run(exp.experiment_id).info.run_id
            client.log_artifacts(train, str(adapter), "adapter")
        reg = registry.register_adapter(
            adapter, name="team-baize", tracking_uri=uri, run_id=run.info.run_id, source_run_id=train,
            metrics={"ppl": ppl, "stop": 0.5}, tags={"baize.base_model": "packaged:smollm2-135m-instruct",
                                                      "dvc.dep.data/tokenized": "d41d8c"},
        )
        if label == "C":
            assert client.get_model_version("team-baize", reg.version).run_id == train
            assert client.get_model_version("team-baize", reg.version).tags["baize.eval_run_id"] == run.info.run_id
            assert not client.list_artifacts(run.info.run_id)  # no second copy of the adapter
        seen.append((reg.version, reg.new, reg.promoted, registry.champion("team-baize", uri)))
    assert seen == [("1", True, True, "1"), ("2", True, False, "1"), ("3", True, True, "3"), ("1", False, False, "3")]
    version = client.get_model_version("team-baize", "3")
    assert version.tags["metric.ppl"] == "4.0" and version.tags["dvc.dep.data/tokenized"] == "d41d8c"
    assert version.tags["baize.base_model"] == "packaged:smollm2-135m-instruct"
    assert version.tags[tracking.ADAPTER_TAG] == tracking.folder_sha256(tmp_path / "C")
    # What `baize chat --adapter models:/team-baize@champion` and `baize export` resolve.
    local = inference.resolve_adapter("models:/team-baize@champion", dst=tmp_path / "dl")
    assert (local / "adapter_model.safetensors").read_text() == "C"


def test_a_restart_of_the_server_and_of_its_database_loses_no_run(admin_env, services, project):
    from mlflow import MlflowClient

    uri = admin_env["MLFLOW_TRACKING_URI"]
    with tracking.stage_run("before", experiment="team-restart", tracking_uri=uri, params={}, tags={}) as run:
        before = run.info.run_id
    env = _stage_env(services.env())

    services.pg_ctl("stop")  # the database goes away under a running server
    try:
        proc = _stage(project, env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: MLflow server") and "re-run `dvc repro`" in lines[0]
        services.stop_mlflow()  # and the server too
        proc = _stage(project, env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "unreachable" in lines[0], proc.stderr
    finally:
        services.pg_ctl("start")
        if not services.mlflow_pid:
            services.start_mlflow()
    proc = _stage(project, env)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri)
    assert client.get_run(before).info.status == "FINISHED"
    exp = client.get_experiment_by_name("baize-micro")
    seeds = client.search_runs([exp.experiment_id], filter_string="tags.`baize.stage` = 'seed'")
    assert [r.info.status for r in seeds] == ["FINISHED"]


def test_dvc_push_over_ssh_then_pull_into_another_clone(services, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")

    def run(cmd, cwd):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        return proc

    first = tmp_path / "first"
    first.mkdir()
    run(["git", "init", "-q", "-b", "main"], first)
    run(["dvc", "init", "-q"], first)
    for cmd in services.dvc_remote_commands():
        run(cmd, first)
    run(["dvc", "remote", "default", "team"], first)
    (first / "data").mkdir()
    (first / "data" / "blob.bin").write_bytes(os.urandom(300_000))
    run(["dvc", "add", "data/blob.bin"], first)
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "data"], first)
    run(["dvc", "push"], first)
    committed = (first / ".dvc" / "config").read_text()
    assert "ssh://127.0.0.1:" in committed and "keyfile" not in committed and str(services.ssh_key) not in committed
    assert run(["git", "ls-files"], first).stdout.count("config.local") == 0  # user and key stay local

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    assert not (second / "data" / "blob.bin").exists()
    pulled = subprocess.run(["dvc", "pull"], cwd=second, env=env, capture_output=True, text=True, timeout=300)
    assert pulled.returncode != 0  # no key in the clone: the remote refuses it
    run(["dvc", "remote", "modify", "--local", "team", "user", services.ssh_user], second)
    run(["dvc", "remote", "modify", "--local", "team", "keyfile", str(services.ssh_key)], second)
    run(["dvc", "pull"], second)
    assert (second / "data" / "blob.bin").read_bytes() == (first / "data" / "blob.bin").read_bytes()
    assert json.loads(run(["dvc", "status", "--json"], second).stdout) == {}
