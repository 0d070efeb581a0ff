"""The selfchat stage as a real process: kill -9 and resume, the key never leaks, one-line errors, MLflow run."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfchat_stub import StubServer

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "sk-test-SENTINEL-key-0123456789abcdef"

pytestmark = pytest.mark.timeout(180)


def setup(tmp_path: Path, url: str, n: int = 20, **selfchat) -> Path:
    params = {
        "tracking": {"experiment": "selfchat-test", "log_artifacts": True},
        "selfchat": {"backend": "openai", "model": "stub", "base_url": url, "mode": "turns", "max_rounds": 3,
                     "concurrency": 4, "timeout_s": 5, "max_retries": 2, **selfchat},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seeds = tmp_path / "data/seeds/seeds.jsonl"
    seeds.parent.mkdir(parents=True)
    seeds.write_text("".join(
        json.dumps({"id": f"seed{i:03d}", "text": f"topic {i}", "source": "test", "domain": "general"}) + "\n"
        for i in range(n)
    ))
    return tmp_path


def command() -> list[str]:
    return [sys.executable, "-m", "stages.selfchat", "--seeds", "data/seeds/seeds.jsonl", "--model", "models/base",
            "--out", "data/selfchat"]


def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": SENTINEL, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "BAIZE_PIPELINE_ID": "test"}


def stage(tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(), cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=timeout)


def journal_replies(path: Path) -> int:
    return sum(1 for line in path.read_bytes().split(b"\n") if line.startswith(b'{"key"') and line.endswith(b"}"))


def assert_no_secret(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert SENTINEL not in text
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert SENTINEL.encode() not in p.read_bytes(), f"API key found in {p}"


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_loses_nothing_and_pays_nothing_twice(tmp_path):
    with StubServer(latency_s=0.1, human_rounds=2) as stub:
        setup(tmp_path, stub.url, n=20)
        journal = tmp_path / "data/selfchat/journal.jsonl"
        proc = subprocess.Popen(command(), cwd=tmp_path, env=env(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (journal.exists() and journal_replies(journal) >= 30):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: 100 requests in all, some in flight right now
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        recorded = journal_replies(journal)
        assert 30 <= recorded < 100, "killed too late to test anything"
        requested_before = sum(stub.counts.values())
        assert not (tmp_path / "data/selfchat/transcripts.jsonl").exists()

        done = stage(tmp_path)
        assert done.returncode == 0, done.stderr
        # Every reply on disk at the kill was reused; only the rest (incl. those in flight) were requested again.
        assert sum(stub.counts.values()) - requested_before == 100 - recorded
        first = (tmp_path / "data/selfchat/transcripts.jsonl").read_bytes()

        again = stage(tmp_path)  # everything from the journal: no request, the same bytes
        assert again.returncode == 0, again.stderr
        assert sum(stub.counts.values()) - requested_before == 100 - recorded
    assert (tmp_path / "data/selfchat/transcripts.jsonl").read_bytes() == first
    ids = [json.loads(x)["seed_id"] for x in first.decode().splitlines()]
    assert ids == [f"seed{i:03d}" for i in range(20)]  # no duplicate, no missing seed, seed order
    assert (tmp_path / "data/selfchat/failures/failures.jsonl").read_text() == ""
    assert (tmp_path / "data/selfchat/failures/README.md").stat().st_size  # the DVC output is never empty
    assert json.loads((tmp_path / "reports/selfchat/report.json").read_text())["transcripts"] == 20
    assert not (tmp_path / "reports/selfchat/metrics.json").exists()  # no headline: `dvc exp show` fits 120 columns
    # The journal's share depends on the runs before, not on the inputs: in the untracked run.json only.
    run = json.loads((tmp_path / "reports/selfchat/run.json").read_text())
    assert run["replies_from_journal"] == 100 and run["new"]["replies"] == 0
    assert "replies_from_journal" not in json.loads((tmp_path / "reports/selfchat/report.json").read_text())
    assert_no_secret(tmp_path, done.stdout, done.stderr, again.stdout, again.stderr)


@pytest.mark.slow
def test_stage_outputs_metrics_and_mlflow_run_without_the_key(tmp_path):
    bad = lambda body, n: "malformed" if "topic 3'" in body["messages"][0]["content"] else "ok"  # noqa: E731
    with StubServer(script=bad) as stub:
        setup(tmp_path, stub.url, n=6, mode="transcript", prices={"stub": {"input_per_1m": 0.5, "output_per_1m": 1.5}})
        done = stage(tmp_path)
        assert any(SENTINEL in h for h in stub.state.auth_headers)
    assert done.returncode == 0, done.stderr
    assert "5/6 transcripts" in done.stdout
    failures = [json.loads(x) for x in (tmp_path / "data/selfchat/failures/failures.jsonl").read_text().splitlines()]
    assert [(f["seed_id"], f["reason"]) for f in failures] == [("seed003", "no_complete_pair")]
    metrics = json.loads((tmp_path / "reports/selfchat/report.json").read_text())
    assert metrics["transcripts"] == 5 and metrics["failures_by_reason"] == {"no_complete_pair": 1}
    assert metrics["turns_per_transcript"] == 4 and metrics["cost_usd"] > 0
    assert json.loads((tmp_path / "reports/selfchat/run.json").read_text())["requests"] == 6

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selfchat-test")
    run = client.search_runs([exp.experiment_id], "tags.`baize.stage` = 'selfchat'")[0]
    assert run.data.metrics["transcripts"] == 5 and run.data.params["selfchat.model"] == "stub"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"transcripts.jsonl", "failures.jsonl"}
    everything = json.dumps([run.data.params, run.data.tags, run.data.metrics])
    assert_no_secret(tmp_path, done.stdout, done.stderr, everything)


def test_401_stops_the_stage_with_one_line_and_no_key(tmp_path):
    with StubServer(script=lambda body, n: "401") as stub:
        setup(tmp_path, stub.url, n=30)
        done = stage(tmp_path)
        assert sum(stub.counts.values()) <= 4  # stopped at once, not one 401 per seed
    assert done.returncode == 1
    # Off a terminal the seed bar prints plain lines (baize.progress): the error is the one other line, the last.
    lines = [line for line in done.stderr.strip().splitlines() if not re.match(r"selfchat: +\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HTTP 401" in lines[0], done.stderr
    assert done.stderr.strip().splitlines()[-1] == lines[0]
    assert not (tmp_path / "data/selfchat/transcripts.jsonl").exists()
    assert_no_secret(tmp_path, done.stdout, done.stderr)


def test_bad_params_and_bad_seed_line_give_one_line(tmp_path):
    setup(tmp_path, "http://127.0.0.1:9/v1", n=2, temperature=5)
    done = stage(tmp_path)
    assert done.returncode == 2 and "selfchat.temperature" in done.stderr and "Traceback" not in done.stderr
    setup_dir = tmp_path / "b"
    setup_dir.mkdir()
    setup(setup_dir, "http://127.0.0.1:9/v1", n=2)
    with (setup_dir / "data/seeds/seeds.jsonl").open("a") as fh:
        fh.write('{"id": "x", "text": \n')
    done = stage(setup_dir)
    assert done.returncode == 1 and "data/seeds/seeds.jsonl:3: invalid JSON" in done.stderr
    assert "Traceback" not in done.stderr


def test_local_replies_are_keyed_by_model_files_and_dtype(tmp_path):
    """Journal keys name the local model by its files and compute dtype: another dtype regenerates."""
    from stages.selfchat import local_model_id

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    fp32, bf16 = local_model_id(tmp_path, "float32"), local_model_id(tmp_path, "bfloat16")
    assert fp32.startswith("local:") and fp32.endswith(":float32") and bf16.endswith(":bfloat16")
    assert fp32.rsplit(":", 1)[0] == bf16.rsplit(":", 1)[0]
    assert local_model_id(tmp_path, "auto") in (fp32, bf16)
    (tmp_path / "model.safetensors").write_bytes(b"weights v2")
    assert local_model_id(tmp_path, "float32") != fp32


def _wait_for_replies(journal: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (journal.exists() and journal_replies(journal) >= n):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_requests_in_flight_are_journaled_and_nothing_is_paid_twice(tmp_path, signum):
    """Ctrl-C / SIGTERM mid-run (4 requests on the wire, 0.4 s each): no new request starts, the ones in flight are
    answered and journaled, the stage exits 128+N with one summary line; the re-run pays for nothing twice."""
    slow = {"on": True}
    script = lambda body, n: (time.sleep(0.4) if slow["on"] else None) or "ok"  # noqa: E731
    with StubServer(script=script, human_rounds=2) as stub:
        setup(tmp_path, stub.url, n=20)
        journal = tmp_path / "data/selfchat/journal.jsonl"
        proc = subprocess.Popen(command(), cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _wait_for_replies(journal, 10, proc)
        os.kill(proc.pid, signum)
        started = time.monotonic()
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 5  # the 4 in flight finish, nothing new starts
        assert proc.returncode == 128 + signum, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: selfchat interrupted by {signum.name}: ") and "replies in flight" in last
        paid, recorded = sum(stub.state.ok_counts.values()), journal_replies(journal)
        assert paid == recorded < 100  # every reply paid for is on disk
        assert not (tmp_path / "data/selfchat/transcripts.jsonl").exists()

        slow["on"] = False
        done = stage(tmp_path)
        assert done.returncode == 0, done.stderr
        assert max(stub.state.ok_counts.values()) == 1 and sum(stub.state.ok_counts.values()) == 100  # 0 paid twice
    assert len((tmp_path / "data/selfchat/transcripts.jsonl").read_text().splitlines()) == 20


def test_a_second_ctrl_c_aborts_the_wait(tmp_path):
    script = lambda body, n: (time.sleep(20) if n == 1 else None) or "ok"  # noqa: E731  (every request hangs 20 s)
    with StubServer(script=script) as stub:
        setup(tmp_path, stub.url, n=8, stop_grace_s=60)
        proc = subprocess.Popen(command(), cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while sum(stub.counts.values()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting for the 4 in flight
        os.kill(proc.pid, signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 5
        stub.state.stopping.set()
    assert proc.returncode == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: selfchat interrupted by SIGINT: 0/8 seeds finished") and "aborted" in last


def test_the_local_judge_is_keyed_by_the_local_models_identity(tmp_path, monkeypatch):
    """The local judge answers with models/base, whatever `judge.model` says: its journal keys name that model's
    files and dtype, so another base model never reuses its verdicts."""
    from baize.config import EvaluateParams
    from baize.selfchat import local_backend
    from baize.selfchat.backend import Completion
    from stages import evaluate
    from stages.selfchat import local_model_id

    seen = []

    class FakeLocal:
        name = "local"

        def __init__(self, *args, **kwargs):
            pass

        async def complete(self, request):
            seen.append(request.model)
            return Completion("8 6", "stop", 1, 1, "fake")

        def close(self):
            pass

    monkeypatch.setattr(local_backend, "LocalBackend", FakeLocal)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    params = EvaluateParams.model_validate(
        {"judge": {"enabled": True, "backend": "local", "cache": str(tmp_path / "judge.jsonl")}}
    )
    rows = [{"id": "q0", "question": "Why?", "base": {"text": "b"}, "adapter": {"text": "a"}}]
    details = evaluate._judge(params, tmp_path, rows, ["adapter"], [])
    assert details["single"]["adapter"]["summary"]["judged"] == 1
    assert set(seen) == {local_model_id(tmp_path, params.dtype)} and "gpt-4o-mini" not in seen
