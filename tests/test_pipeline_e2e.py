"""End to end: `dvc repro` of the micro profile in a fresh git repo, through every stage, offline.

Then: the outputs, dvc.lock and the MLflow runs are checked; a second `dvc repro` does nothing; a colleague's
path: `dvc push`, `git clone`, `make setup`, `dvc pull`, and `dvc repro` has nothing to do and leaves dvc.lock
as it was; a from-scratch `dvc repro --force` in that clone (another path, another virtual environment) writes
the same dvc.lock again; `dvc exp run --temp` logs to the root store; the README's `dvc exp show` recipe shows
every headline metric in 120 columns; the README's `dvc plots diff` draws the training curves
with no network and leaves nothing for git to add. Python writes bytecode throughout (PYTHONDONTWRITEBYTECODE unset), as it
does by default on a user's machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from browser import count_color, needs_browser, screenshot

ROOT = Path(__file__).resolve().parents[1]
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _copy_project(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a clone of the branch being tested would hold."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    repo = work / "repo"
    repo.mkdir()
    _copy_project(repo)
    # A fresh run: no lock file and no stage outputs, whatever this checkout has produced.
    (repo / "dvc.lock").unlink(missing_ok=True)
    for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for item in entry.get("outs", []) + entry.get("metrics", []) + entry.get("plots", []):
            path = repo / (item if isinstance(item, str) else next(iter(item)))
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.copy(repo / "profiles" / "micro.yaml", repo / "params.yaml")
    # Without PYTHONDONTWRITEBYTECODE: importing the code must not change the code folders that stages depend on.
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "BAIZE_", "DVC_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
    )
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run(["dvc", "remote", "modify", "--local", "local", "url", str(work / "remote")], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "micro profile"], repo, env)
    started = time.monotonic()
    # At a load average of 10 from other jobs on 2 cores this took 13 minutes, and once over 20.
    repro = _run(["dvc", "repro"], repo, env, timeout=3000)
    elapsed = time.monotonic() - started
    print(f"dvc repro (micro profile): {elapsed:.0f} s")
    return {"repo": repo, "work": work, "env": env, "repro": repro}


def test_every_stage_ran_and_is_locked(pipeline):
    repo = pipeline["repo"]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in pipeline["repro"].stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage, entry in spec.items():
        for out in entry.get("outs", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert (repo / path).exists(), f"{stage}: {path} missing"
        for metric in entry.get("metrics", []):
            path = metric if isinstance(metric, str) else next(iter(metric))
            assert json.loads((repo / path).read_text()), f"{stage}: {path} empty"
    status = _run(["dvc", "status", "--json"], repo, pipeline["env"])
    assert json.loads(status.stdout) == {}
    # Outputs that may hold nothing (no failure, no reject) are folders with a file in them: no DVC warning.
    empty = [line for line in (pipeline["repro"].stdout + pipeline["repro"].stderr).splitlines() if "is empty" in line]
    assert not empty, sorted(set(empty))


def test_base_model_folder_and_provenance(pipeline):
    base = pipeline["repo"] / "models" / "base"
    source = json.loads((base / "source.json").read_text())
    assert source["kind"] == "packaged"
    assert list(base.glob("*.safetensors")) and (base / "config.json").is_file()
    assert (base / "tokenizer.json").is_file() or (base / "tokenizer.model").is_file()
    assert not list(base.glob("*.bin")) and not list(base.glob("*.pt"))
    for name, digest in source["files"].items():
        assert _sha256(base / name) == digest


def test_one_mlflow_run_per_stage_grouped_and_tagged(pipeline):
    from mlflow import MlflowClient

    repo = pipeline["repo"]
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(yaml.safe_load((repo / "params.yaml").read_text())["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`baize.kind` = 'stage'")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["baize.stage"], []).append(run)
    assert set(by_stage) == set(STAGES) - {"params"}  # the params check computes nothing: no run of its own
    assert all(len(r) == 1 for r in by_stage.values()), {k: len(v) for k, v in by_stage.items()}
    commit = _run(["git", "rev-parse", "HEAD"], repo, pipeline["env"]).stdout.strip()
    pipeline_ids = {run.data.tags["baize.pipeline_id"] for run in runs}
    assert len(pipeline_ids) == 1
    parents = {run.data.tags["mlflow.parentRunId"] for run in runs}
    assert len(parents) == 1
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    locked_outs = {o["path"]: o["md5"] for entry in lock.values() for o in entry.get("outs", [])}
    # The parent spans the pipeline: from the `dvc repro` command to the end of its last stage run.
    [parent] = [client.get_run(p) for p in parents]
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("pipeline · params ")
    assert parent.info.start_time <= min(r.info.start_time for r in runs)
    assert parent.info.end_time >= max(r.info.end_time for r in runs)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for stage, [run] in by_stage.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{stage} · {parent.info.run_name.removeprefix('pipeline · ')}"
        assert run.data.tags["mlflow.source.git.commit"] == commit
        for dep in lock[stage].get("deps", []):
            if dep["path"] in locked_outs:
                assert run.data.tags[f"dvc.dep.{dep['path']}"] == dep["md5"], (stage, dep["path"])


def test_second_repro_does_nothing(pipeline):
    started = time.monotonic()
    proc = _run(["dvc", "repro"], pipeline["repo"], pipeline["env"])
    elapsed = time.monotonic() - started
    assert "Running stage" not in proc.stdout
    assert "up to date" in proc.stdout
    print(f"no-op dvc repro: {elapsed:.1f} s")


@pytest.fixture(scope="module")
def clone(pipeline):
    """What a colleague does: `git clone` of the pushed commit, `make setup`, `dvc pull`, with their own .venv."""
    repo, work, env = pipeline["repo"], pipeline["work"], pipeline["env"]
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "pipeline outputs"], repo, env)
    _run(["dvc", "push"], repo, env)
    path = work / "clone"
    _run(["git", "clone", "-q", str(repo), str(path)], work, env)
    # The clone's own environment: nothing of this test's virtual environment on PATH.
    ours = str(Path(sys.executable).parent)
    clone_env = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"}
    clone_env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != ours)
    started = time.monotonic()
    _run(["make", "setup"], path, clone_env, timeout=2400)
    print(f"make setup in the clone: {time.monotonic() - started:.0f} s")
    clone_env["PATH"] = f"{path / '.venv' / 'bin'}{os.pathsep}{clone_env['PATH']}"
    _run(["dvc", "remote", "modify", "--local", "local", "url", str(work / "remote")], path, clone_env)
    assert not (path / "models" / "base").exists()
    _run(["dvc", "pull"], path, clone_env)
    return {"path": path, "env": clone_env}


def test_clone_setup_pull_then_repro_has_nothing_to_do(clone):
    path, env = clone["path"], clone["env"]
    source = json.loads((path / "models" / "base" / "source.json").read_text())
    for name, digest in source["files"].items():
        assert _sha256(path / "models" / "base" / name) == digest
    # The clone's venv runs the clone's code, and importing it writes bytecode next to the stages' code deps.
    which = _run(["python", "-c", "import baize, stages.selfchat; print(baize.__file__)"], path, env).stdout
    assert Path(which.strip()).is_relative_to(path), which
    _run(["python", "-c", "import baize.selfchat.engine, baize.validation, baize.tokenization, baize.evaluation"], path, env)
    assert (path / "src" / "baize" / "selfchat" / "__pycache__").is_dir()
    assert json.loads(_run(["dvc", "status", "--json"], path, env).stdout) == {}
    proc = _run(["dvc", "repro"], path, env)
    assert "Running stage" not in proc.stdout, proc.stdout
    # dvc.lock and every tracked file as pushed; nothing new that git would pick up with `git add -A`.
    assert _run(["git", "status", "--porcelain", "--untracked-files=all"], path, env).stdout == ""


def test_a_from_scratch_run_in_the_clone_writes_the_same_lock(clone):
    """No output holds a path, a time, a run id or a library version: another directory, another venv and a
    fresh journal give the very dvc.lock that was committed (the default profile's promise, on the micro one)."""
    path, env = clone["path"], clone["env"]
    (path / "data" / "selfchat" / "journal.jsonl").unlink()  # no reply reused: self-chat from scratch too
    started = time.monotonic()
    proc = _run(["dvc", "repro", "--force"], path, env, timeout=2400)
    print(f"dvc repro --force in the clone: {time.monotonic() - started:.0f} s")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in proc.stdout
    diff = _run(["git", "diff", "--stat"], path, env).stdout
    assert diff == "", diff + _run(["git", "diff", "dvc.lock"], path, env).stdout[-3000:]
    assert _run(["git", "status", "--porcelain", "--untracked-files=all"], path, env).stdout == ""
    assert json.loads(_run(["dvc", "status", "--json"], path, env).stdout) == {}
    for stage in ("seed", "selfchat", "train", "evaluate"):  # the clock-dependent part is there, untracked
        assert json.loads((path / "reports" / ("eval" if stage == "evaluate" else stage) / "run.json").read_text())


def test_exp_run_temp_logs_to_the_root_store(pipeline):
    from mlflow import MlflowClient

    repo, env = pipeline["repo"], pipeline["env"]
    _run(["git", "add", "-A"], repo, env)
    subprocess.run(["git", "commit", "-qm", "state"], cwd=repo, env=env, capture_output=True)
    _run(["dvc", "exp", "run", "--temp", "-n", "tmp-exp", "-S", "model.dtype=float32", "base_model"], repo, env)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.`dvc.exp_name` = 'tmp-exp' and tags.`baize.kind` = 'stage'",
    )
    assert [r.data.tags["baize.stage"] for r in exp_runs] == ["base_model"]
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def test_mlflow_ui_serves_the_runs_with_their_tags(pipeline):
    """`mlflow ui` on the default store (as the README shows) lists the stage runs and their tags."""
    import socket
    import urllib.request

    repo, env = pipeline["repo"], pipeline["env"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/", timeout=10) as resp:
            assert "<html" in resp.read().decode("utf-8", "replace").lower()
        name = yaml.safe_load((repo / "params.yaml").read_text())["tracking"]["experiment"]
        with urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}", timeout=10
        ) as resp:
            exp_id = json.load(resp)["experiment"]["experiment_id"]
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [exp_id], "max_results": 100}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            runs = json.load(resp)["runs"]
        stages = {}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            if tags.get("baize.kind") == "stage":
                stages[tags["baize.stage"]] = tags
        assert set(STAGES) - {"params"} <= set(stages)  # the params check logs no run
        assert all("mlflow.source.git.commit" in tags and "baize.pipeline_id" in tags for tags in stages.values())
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_sdf_adapter_is_stacked_loadable_and_compared(pipeline):
    """Baize v2: the SDF adapter stacks on the v1.5 one, `baize chat` loads it, evaluate compares the models, and
    the SDF runs link to the v1.5 training run in MLflow."""
    from mlflow import MlflowClient

    repo, env = pipeline["repo"], pipeline["env"]
    v2 = repo / "models" / "adapter_v2"
    meta = json.loads((v2 / "baize_adapter.json").read_text())
    assert meta["stacked_on"] == "sft" and (v2 / "adapter_model.safetensors").is_file()
    first = repo / "models" / "adapter"
    assert (v2 / "sft" / "adapter_model.safetensors").read_bytes() == (first / "adapter_model.safetensors").read_bytes()
    assert "mlflow_run_id" not in meta and "stacked_on_mlflow_run_id" not in meta  # a DVC output: no run ids

    samples = [json.loads(line) for line in (repo / "data/sdf/samples.jsonl").read_text().splitlines()]
    seeds = {json.loads(line)["text"] for line in (repo / "data/seeds/seeds.jsonl").read_text().splitlines()}
    assert len(samples) == 4 and not {s["prompt"] for s in samples} & seeds
    judge_metrics = json.loads((repo / "reports/sdf_judge/report.json").read_text())
    assert judge_metrics["samples"] == 4 and judge_metrics["kept"] + judge_metrics["dropped_all_failed"] == 2

    metrics = json.loads((repo / "reports/eval/report.json").read_text())
    assert {"base", "adapter", "v2"} <= set(metrics["perplexity"])
    assert set(metrics["perplexity_sdf_best"]) == {"base", "adapter", "v2"}
    assert set(metrics["generation"]) == {"base", "base_chat", "adapter", "v2"}
    assert set(metrics["judge"]) == {"base", "base_chat", "adapter", "v2"}
    assert set(metrics["pairwise"]) == {"v2_vs_adapter", "adapter_vs_base"}
    assert "| v2 |" in (repo / "reports/eval/report.md").read_text()

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(yaml.safe_load((repo / "params.yaml").read_text())["tracking"]["experiment"])
    [train] = client.search_runs([exp.experiment_id], filter_string="tags.`baize.stage` = 'train'")
    train_run = train.info.run_id
    [sdf_train] = client.search_runs([exp.experiment_id], filter_string="tags.`baize.stage` = 'sdf_train'")
    [evaluate] = client.search_runs([exp.experiment_id], filter_string="tags.`baize.stage` = 'evaluate'")
    assert evaluate.data.tags["baize.train_run_id"] == train_run
    assert evaluate.data.tags["baize.sdf_train_run_id"] == sdf_train.info.run_id
    for stage in ("sdf_sample", "sdf_judge", "sdf_train"):
        [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`baize.stage` = '{stage}'")
        assert run.data.tags["baize.train_run_id"] == train_run, stage

    chat = subprocess.run(["baize", "chat", "--adapter", "models/adapter_v2", "--max-new-tokens", "4", "--seed", "1"],
                          cwd=repo, env=env, input="Hello!\n/quit\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "Baize: " in chat.stdout


@needs_browser
def test_plots_diff_draws_the_training_curves_offline(pipeline):
    """The README's command, then a screenshot of its page: the loss curve is drawn (Vega inlined by the
    project's template), and git sees no new file (the page's folder is ignored)."""
    repo, env = pipeline["repo"], pipeline["env"]
    _run(["dvc", "plots", "diff"], repo, env)
    page = repo / "dvc_plots" / "index.html"
    shot = screenshot(page, pipeline["work"] / "screenshots" / "plots_diff.png", size=(1000, 700))
    # dvc-render's colours of the first two revisions (workspace, HEAD: equal curves, one over the other);
    # a blank page has none.
    drawn = count_color(shot, (0x94, 0x5D, 0xD6)) + count_color(shot, (0x13, 0xAD, 0xC7))
    assert drawn > 400, f"{drawn} pixels of the curves' colour: no marks ({pipeline['work'] / 'screenshots'})"
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo, env).stdout
    assert "dvc_plots" not in status, status


def _readme_exp_show() -> list[str]:
    """The README's `dvc exp show` recipe for the headline metrics (the line that starts with `dvc exp show --drop`)."""
    import shlex

    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("dvc exp show --drop"):
            return shlex.split(line.split("#", 1)[0])
    raise AssertionError("README.md: no line starting with `dvc exp show --drop`")


def test_exp_show_recipe_fits_120_columns_with_every_headline_metric(pipeline):
    """`COLUMNS=120 dvc exp show` with the README's options: every headline metric of every stage, as numbers,
    for the workspace, the commit and an experiment (`tmp-exp`, if the test before ran), no cell cut to `…`."""
    repo, env = pipeline["repo"], pipeline["env"]
    headline = {}
    for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for metric in entry.get("metrics", []):
            path = metric if isinstance(metric, str) else next(iter(metric))
            names = json.loads((repo / path).read_text())
            assert not set(names) & set(headline), f"{path}: a name another stage uses"
            headline.update(names)
    assert 8 <= len(headline) <= 12, headline
    proc = _run(_readme_exp_show(), repo, {**env, "COLUMNS": "120"})
    print(proc.stdout)
    lines = proc.stdout.rstrip("\n").splitlines()
    assert "…" not in proc.stdout, proc.stdout
    # Room to spare for the names `dvc exp run` makes up ("sappy-hiss"): up to 12 characters, 5 more than "tmp-exp".
    assert all(len(line) <= 115 for line in lines), proc.stdout
    header = next(line for line in lines if "Experiment" in line).split()
    assert header == ["Experiment", *headline], header  # the headline columns only, in stage order
    rows = [line for line in lines if line.strip() and not line.strip().startswith(("─", "Experiment"))]
    assert len(rows) >= 2, proc.stdout  # workspace and the commit (and the experiment)
    for row in rows:
        cells = row.split()[-len(headline):]
        assert all(float(cell) >= 0 for cell in cells), row
