"""Team mode end to end: the micro profile through real team services on 127.0.0.1 (PostgreSQL, `mlflow server` with
basic auth and proxied artifacts, sshd for the DVC remote), all started and stopped here.

In order: `dvc repro` up to tokenize; PostgreSQL, then the MLflow server, stopped mid-pipeline: `dvc repro` stops
in one line each time; both back: `dvc repro` completes and logs normally, no run lost; `dvc push` over SSH, a
second clone `dvc pull`s the exact outputs and has nothing to reproduce; two parameter variants queued and run two
at a time (`dvc exp run --queue`, `dvc queue start -j 2`) land in MLflow under their DVC experiment names with the
metrics `dvc exp show` gives; the registry's @champion is the best version; `baize chat` and `baize export` take
`models:/<name>@champion`; the credentials are in no file, output or MLflow run; a screenshot of MLflow's compare
view of the two experiments (headless Chromium, the real UI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from browser import auth_proxy, browser, screenshot
from test_pipeline_e2e import _copy_project
from test_team import _have_services

from baize.team import TeamServices

ROOT = Path(__file__).resolve().parents[1]
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
VARIANTS = {"lr-high": "0.003", "lr-low": "0.0003"}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(_have_services() is not None, reason=str(_have_services()))]


class Log:
    """Every command's output, kept to check that no credential was printed."""

    def __init__(self):
        self.text = []

    def run(self, cmd, cwd, env, timeout=2400, check=True, stdin=None):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)
        self.text.append(proc.stdout + proc.stderr)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)} ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _exp_metrics(node, names, found):
    """{experiment name: eval metrics} from `dvc exp show --json` (nested lists and dicts)."""
    if isinstance(node, dict):
        if node.get("name") in names and isinstance(node.get("data"), dict):
            metrics = (node["data"].get("metrics") or {}).get("reports/eval/metrics.json", {}).get("data")
            if metrics:
                found[node["name"]] = metrics
        for value in node.values():
            _exp_metrics(value, names, found)
    elif isinstance(node, list):
        for value in node:
            _exp_metrics(value, names, found)
    return found


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    work = tmp_path_factory.mktemp("team-e2e")
    services = TeamServices(root=work / "services")
    services.up()
    log = Log()
    repo = work / "repo"
    repo.mkdir()
    _copy_project(repo)
    (repo / "dvc.lock").unlink(missing_ok=True)
    for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for item in entry.get("outs", []) + entry.get("metrics", []) + entry.get("plots", []):
            path = repo / (item if isinstance(item, str) else next(iter(item)))
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.copy(repo / "profiles" / "micro.yaml", repo / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BAIZE_", "DVC_"))}
    env.update(
        services.env(),
        # Two tries a second apart: the stopped servers below fail fast (the default rides out minutes of restart).
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
    )
    state = {"work": work, "repo": repo, "env": env, "services": services, "log": log, "timings": {}}
    try:
        log.run(["git", "init", "-q", "-b", "main"], repo, env)
        for cmd in services.dvc_remote_commands():
            log.run(cmd, repo, env)
        log.run(["dvc", "remote", "default", "team"], repo, env)
        log.run(["git", "add", "-A"], repo, env)
        log.run(["git", "commit", "-qm", "micro profile, team remote"], repo, env)

        started = time.monotonic()
        log.run(["dvc", "repro", "tokenize"], repo, env)
        # Mid-pipeline: the database goes away under the server, then the server too.
        services.pg_ctl("stop")
        state["pg_down"] = log.run(["dvc", "repro"], repo, env, check=False)
        services.stop_mlflow()
        state["mlflow_down"] = log.run(["dvc", "repro"], repo, env, check=False)
        services.pg_ctl("start")
        services.start_mlflow()
        state["repro"] = log.run(["dvc", "repro"], repo, env)
        state["timings"]["pipeline_s"] = time.monotonic() - started

        log.run(["git", "add", "-A"], repo, env)
        log.run(["git", "commit", "-qm", "pipeline outputs"], repo, env)
        log.run(["dvc", "push"], repo, env)
        clone = work / "clone"
        log.run(["git", "clone", "-q", str(repo), str(clone)], work, env)
        log.run(["dvc", "remote", "modify", "--local", "team", "user", services.ssh_user], clone, env)
        log.run(["dvc", "remote", "modify", "--local", "team", "keyfile", str(services.ssh_key)], clone, env)
        log.run(["dvc", "pull"], clone, env)
        state["clone"] = clone
        state["clone_status"] = log.run(["dvc", "status", "--json"], clone, env)
        state["clone_repro"] = log.run(["dvc", "repro"], clone, env)

        started = time.monotonic()
        for name, lr in VARIANTS.items():
            log.run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={lr}"], repo, env)
        log.run(["dvc", "queue", "start", "-j", "2"], repo, env)
        deadline = time.monotonic() + 2400
        while True:
            status = log.run(["dvc", "queue", "status"], repo, env).stdout
            if not any(word in status for word in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, status
            time.sleep(10)
        state["timings"]["queue_s"] = time.monotonic() - started
        state["queue_status"] = status
        state["exp_show"] = json.loads(log.run(["dvc", "exp", "show", "--json"], repo, env).stdout)
        yield state
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)
        services.down(remove=True)
        print(f"team e2e timings: {state['timings']}")


@pytest.fixture(autouse=True)
def _as_admin(team, monkeypatch):
    """The MLflow client of these tests reads the admin's credentials from the environment (restored after)."""
    for key, value in team["services"].env().items():
        monkeypatch.setenv(key, value)


def _client(team):
    from mlflow import MlflowClient

    return MlflowClient(team["services"].tracking_uri)


def test_a_restart_mid_pipeline_stops_in_one_line_and_the_next_repro_completes(team):
    for key in ("pg_down", "mlflow_down"):
        proc = team[key]
        assert proc.returncode != 0
        lines = _error_lines(proc)
        print(f"{key}: {lines}")
        assert len(lines) == 1 and lines[0].startswith("error: MLflow server http://127.0.0.1:"), proc.stderr[-3000:]
        assert "re-run `dvc repro`" in lines[0]
    assert "unreachable" in _error_lines(team["mlflow_down"])[0]
    out = team["repro"].stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out


def test_every_stage_logged_once_to_the_server_with_parent_tags_and_artifacts(team):
    client = _client(team)
    repo = team["repo"]
    exp = client.get_experiment_by_name("baize-micro")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`baize.kind` = 'stage'",
                              max_results=1000)
    main = [r for r in runs if "dvc.exp_name" not in r.data.tags]
    by_stage = {}
    for run in main:
        by_stage.setdefault(run.data.tags["baize.stage"], []).append(run)
    assert set(by_stage) == set(STAGES) - {"params"}
    assert all(len(v) == 1 and v[0].info.status == "FINISHED" for v in by_stage.values()), by_stage
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    locked = {o["path"]: o["md5"] for entry in lock.values() for o in entry.get("outs", [])}
    for stage, [run] in by_stage.items():
        assert run.data.tags.get("mlflow.parentRunId")
        for dep in lock[stage].get("deps", []):
            if dep["path"] in locked:
                assert run.data.tags[f"dvc.dep.{dep['path']}"] == dep["md5"], (stage, dep["path"])
    [train] = by_stage["train"]
    assert {a.path for a in client.list_artifacts(train.info.run_id, "adapter")} >= {"adapter/adapter_config.json"}
    stored = team["services"].root / "mlflow-artifacts"
    assert list(stored.rglob("adapter_model.safetensors"))  # the server holds the files, not the client


def test_a_second_clone_pulls_the_exact_outputs_over_ssh_and_has_nothing_to_do(team):
    repo, clone = team["repo"], team["clone"]
    assert json.loads(team["clone_status"].stdout) == {}
    assert "Running stage" not in team["clone_repro"].stdout
    assert (clone / "dvc.lock").read_text() == (repo / "dvc.lock").read_text()
    for path in ("data/tokenized", "data/selfchat/journal.jsonl", "models/adapter", "data/validated/transcripts.jsonl"):
        a, b = repo / path, clone / path
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else [Path()]
        for rel in files:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), path


def test_queued_experiments_land_in_mlflow_under_their_names_with_the_same_metrics(team):
    assert "Success" in team["queue_status"] and "Failed" not in team["queue_status"], team["queue_status"]
    shown = _exp_metrics(team["exp_show"], set(VARIANTS), {})
    assert set(shown) == set(VARIANTS), team["exp_show"]
    client = _client(team)
    exp = client.get_experiment_by_name("baize-micro")
    for name, lr in VARIANTS.items():
        runs = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`dvc.exp_name` = '{name}' and tags.`baize.kind` = 'stage'")
        stages = {r.data.tags["baize.stage"]: r for r in runs}
        assert {"train", "evaluate"} <= set(stages), (name, sorted(stages))
        assert stages["train"].data.params["train.learning_rate"] == lr
        evaluate = stages["evaluate"].data.metrics
        assert abs(evaluate["perplexity.adapter"] - shown[name]["ppl1"]) < 1e-3
        assert abs(evaluate["perplexity.base"] - shown[name]["ppl0"]) < 1e-3


def test_the_registry_holds_every_adapter_and_champion_is_the_best(team):
    client = _client(team)
    versions = client.search_model_versions("name = 'baize-micro'")
    assert len(versions) == 3, [(v.version, v.tags) for v in versions]  # the pipeline's and the two variants'
    for v in versions:
        assert v.tags["baize.base_model"] == "packaged:smollm2-135m-instruct"
        assert v.tags["dvc.dep.data/tokenized"] and v.tags["metric.ppl"] and v.tags["baize.adapter.sha256"]
    best = min(versions, key=lambda v: float(v.tags["metric.ppl"]))
    assert client.get_model_version_by_alias("baize-micro", "champion").version == best.version


def test_chat_and_export_take_a_models_uri(team):
    repo, env, log = team["repo"], team["env"], team["log"]
    uri = "models:/baize-micro@champion"
    chat = log.run(["baize", "chat", "--adapter", uri, "--max-new-tokens", "4", "--seed", "1"], repo, env,
                   timeout=600, stdin="Hello\n/quit\n")
    assert "Baize:" in chat.stdout and f"+ {uri}" in chat.stderr
    out = team["work"] / "merged"
    log.run(["baize", "export", "--adapter", uri, "--out", str(out), "--dtype", "float32"], repo, env, timeout=600)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


def test_no_credential_in_any_file_output_or_run(team):
    services = team["services"]
    secrets = [services.admin_password, services.pg_password]
    for folder in (team["repo"], team["clone"]):
        for path in folder.rglob("*"):
            if path.is_file() and ".git/objects" not in str(path) and "/cache/" not in str(path) \
                    and path.stat().st_size < 20_000_000:
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), path
    text = "\n".join(team["log"].text)
    assert not any(s in text for s in secrets)
    client = _client(team)
    exp = client.get_experiment_by_name("baize-micro")
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        blob = json.dumps([run.data.params, run.data.tags])
        assert not any(s in blob for s in secrets), run.info.run_id
    committed = (team["repo"] / ".dvc" / "config").read_text()
    assert "keyfile" not in committed and "password" not in committed


@pytest.mark.skipif(browser() is None, reason="no Chromium")
def test_mlflow_compare_view_of_the_two_experiments(team):
    client = _client(team)
    exp = client.get_experiment_by_name("baize-micro")
    ids = []
    for name in VARIANTS:
        [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}' and "
                                   "tags.`baize.stage` = 'evaluate'")
        ids.append(run.info.run_id)
    services = team["services"]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
    out = team["work"] / "mlflow-compare.png"
    # The proxy logs the browser in as the admin (a headless browser cannot answer the login prompt).
    with auth_proxy(services.tracking_uri, services.admin_user, services.admin_password) as base:
        image = screenshot(f"{base}/#/compare-runs?{query}", out, size=(1400, 1500), budget_ms=20000)
    print(f"compare view: {out}")
    # Drawn, not blank: the page holds a good share of non-white pixels (the run table and the charts).
    import numpy as np

    pixels = np.asarray(image)
    assert (pixels < 235).any(axis=-1).mean() > 0.02
