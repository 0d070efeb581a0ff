"""The `openai` backend against a real OpenAI-compatible server: `transformers serve` on models/base (127.0.0.1)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from baize.selfchat.engine import Engine, EngineConfig, Seed
from baize.selfchat.journal import Journal
from baize.selfchat.openai_backend import OpenAIBackend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(base_model_dir):
    """`transformers serve` pinned to the base model folder; yields (base_url, model name)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = _free_port()
    cli = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen(
        [str(cli), "serve", str(base_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(base_model_dir)  # the server is pinned to this model name
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run(url, model, tmp_path, seeds, **cfg):
    async def go():
        backend = OpenAIBackend(base_url=url, concurrency=2, timeout_s=240, max_retries=1)
        try:
            with Journal(tmp_path / "journal.jsonl") as journal:
                engine = Engine(backend, journal, EngineConfig(model=model, **cfg), progress=False)
                return await engine.run(seeds), backend
        finally:
            await backend.aclose()

    return asyncio.run(go())


def test_turns_mode_through_transformers_serve(served, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    url, model = served
    seeds = [Seed("a", "How do I learn to cook rice?"), Seed("b", "What is a prime number?")]
    cfg = dict(mode="turns", max_rounds=1, max_tokens=12, human_max_tokens=12, keep_truncated=True, temperature=0.7)
    result, backend = _run(url, model, tmp_path, seeds, **cfg)
    assert len(result.transcripts) + len(result.failures) == 2  # every seed accounted for
    assert backend.stats.requests >= 2 and result.metrics["tokens"]["completion"] > 0
    for t in result.transcripts:
        assert [x.role for x in t.turns] == ["human", "ai"] and all(x.text for x in t.turns)
        assert t.meta["served_model"] == model and t.meta["raw"][0]["finish_reason"] in {"stop", "length"}
    for f in result.failures:  # a tiny model may end the chat at once; that is a recorded reason, not a crash
        assert f["reason"] == "no_complete_pair"
    before = backend.stats.requests
    again, backend2 = _run(url, model, tmp_path, seeds, **cfg)  # the journal answers everything
    assert backend2.stats.requests == 0 and [t.id for t in again.transcripts] == [t.id for t in result.transcripts]
    assert before > 0


def test_a_wrong_model_name_is_each_seeds_recorded_failure(served, tmp_path):
    """`transformers serve` answers an unknown model with a 400, which looks like one bad request (a 404, as
    OpenAI sends, stops the run): every seed ends as a recorded failure with the status, and nothing crashes."""
    url, _ = served
    result, _ = _run(url, "no-such-model", tmp_path, [Seed("a", "hi there"), Seed("b", "why?")], mode="transcript",
                     max_tokens=4)
    assert not result.transcripts
    assert [(f["seed_id"], f["reason"], f.get("status")) for f in result.failures] == [
        ("a", "request_rejected", 400), ("b", "request_rejected", 400)]
