"""Self-chat engine + openai/openai-batch backends against the stub server: every error path, budget, journal."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from baize.selfchat import prompts
from baize.selfchat.backend import ChatRequest, Completion, PermanentError
from baize.selfchat.batch_backend import OpenAIBatchBackend
from baize.selfchat.engine import Engine, EngineConfig, Seed
from baize.selfchat.journal import Journal
from baize.selfchat.openai_backend import OpenAIBackend
from baize.selfchat.ratelimit import TokenBucket
from baize.errors import InputError
from selfchat_stub import StubServer

pytestmark = pytest.mark.timeout(60)

SENTINEL = "sk-test-SENTINEL-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)


def seeds(n: int) -> list[Seed]:
    return [Seed(f"s{i:03d}", f"topic {i}", "test", "general") for i in range(n)]


def run(stub, tmp_path, n=6, *, journal="j.jsonl", backend_kw=None, **cfg):
    """Run the engine over n seeds with a fresh backend; returns (result, backend)."""
    kw = {"concurrency": 4, "backoff_base_s": 0.01, "timeout_s": 5, **(backend_kw or {})}

    async def go():
        backend = OpenAIBackend(base_url=stub.url, **kw)
        try:
            with Journal(tmp_path / journal) as j:
                engine = Engine(backend, j, EngineConfig(model="stub", **{"mode": "transcript", **cfg}), progress=False)
                return await engine.run(seeds(n)), backend
        finally:
            await backend.aclose()

    return asyncio.run(go())


def test_template_is_the_papers_verbatim():
    text = prompts.transcript_messages("how do vaccines work?")
    assert len(text) == 1 and text[0]["role"] == "user"  # one user message, no system message
    content = text[0]["content"]
    assert content.startswith("Forget the instruction you have previously received. The following is a conversation")
    assert "chatting about the topic: 'how do vaccines work?'. Human statements start with [Human]" in content
    assert content.endswith("Complete the transcript in exactly that format.\n[Human] Hello!\n[AI] Hi! How can I help you?")
    assert prompts.selfchat_prompt("costs $5 ${SEED}").count("costs $5 ${SEED}") == 1  # seeds go in unchanged
    human = prompts.human_turn_messages("x", [])[0]["content"]
    assert human.endswith("[AI] Hi! How can I help you?\n[Human] ")


def test_transcript_mode_keeps_pairs_raw_and_seed_order(tmp_path):
    with StubServer(latency_s=0.02) as stub:
        result, backend = run(stub, tmp_path, n=8)
    assert [t.seed_id for t in result.transcripts] == [s.id for s in seeds(8)]
    t = result.transcripts[0]
    assert [x.role for x in t.turns] == ["human", "ai", "human", "ai"]
    assert t.meta["raw"][0]["text"].endswith("[Human] Thanks")  # raw reply kept beside the parsed turns
    assert [d["reason"] for d in t.meta["dropped"]] == ["trailing_incomplete"]
    assert t.meta["backend"] == "openai" and t.meta["model"] == "stub" and t.meta["usage"]["requests"] == 1
    assert result.failures == [] and result.metrics["requests"] == 8 and result.metrics["retries"] == 0
    assert any(SENTINEL in h for h in stub.state.auth_headers)  # the key from the environment was used


def test_turns_mode_stops_when_the_human_is_done(tmp_path):
    with StubServer(human_rounds=2) as stub:
        result, _ = run(stub, tmp_path, n=3, mode="turns", max_rounds=3)
        assert sum(stub.counts.values()) == 3 * 5  # 2 rounds of (human, ai) + the human call that ends it
    t = result.transcripts[0]
    assert [x.text for x in t.turns] == [
        "Question 1 about topic 0?", "Answer to: Question 1 about topic 0?",
        "Question 2 about topic 0?", "Answer to: Question 2 about topic 0?",
    ]
    assert t.meta["ended"] == "human_done" and len(t.meta["raw"]) == 5
    with StubServer(human_rounds=5) as stub:
        result, _ = run(stub, tmp_path, n=2, journal="j2.jsonl", mode="turns", max_rounds=1)
    assert [len(t.turns) for t in result.transcripts] == [2, 2]
    assert result.transcripts[0].meta["ended"] == "max_rounds"


def test_429_with_retry_after_is_retried_not_sooner(tmp_path):
    with StubServer(script=lambda body, n: "429" if n == 1 else "ok") as stub:
        start = time.monotonic()
        result, backend = run(stub, tmp_path, n=4)
        elapsed = time.monotonic() - start
    assert len(result.transcripts) == 4 and result.failures == []
    assert backend.stats.retries == 4 and backend.stats.errors == {"429": 4}
    assert elapsed >= 1.0  # Retry-After: 1 honoured although our own backoff (10 ms) is shorter


def test_500_and_dropped_connection_are_retried(tmp_path):
    with StubServer(script=lambda body, n: "500" if n <= 2 else "ok") as stub:
        result, backend = run(stub, tmp_path, n=3)
    assert len(result.transcripts) == 3 and backend.stats.errors == {"500": 6}
    # A server that is not there at all: connection errors, retried, then a recorded failure per seed.
    with StubServer() as stub:
        url = stub.url
    result, backend = run(type("Gone", (), {"url": url})(), tmp_path, n=2, journal="j2.jsonl",
                          backend_kw={"max_retries": 2})
    assert [f["reason"] for f in result.failures] == ["transient_error"] * 2
    assert backend.stats.errors == {"connection": 6}


def test_hang_past_the_timeout_is_retried(tmp_path):
    with StubServer(script=lambda body, n: "hang" if n == 1 else "ok", hang_s=10) as stub:
        start = time.monotonic()
        result, backend = run(stub, tmp_path, n=2, backend_kw={"timeout_s": 0.5})
        assert time.monotonic() - start < 5
    assert len(result.transcripts) == 2 and backend.stats.errors == {"timeout": 2}


def test_retries_exhausted_is_a_failure_and_a_rerun_pays_only_for_it(tmp_path):
    bad = {"topic 1"}
    script = lambda body, n: "500" if any(b in body["messages"][0]["content"] for b in bad) else "ok"  # noqa: E731
    with StubServer(script=script) as stub:
        result, _ = run(stub, tmp_path, n=3, backend_kw={"max_retries": 2})
        assert [(f["seed_id"], f["reason"]) for f in result.failures] == [("s001", "transient_error")]
        assert "500" in result.failures[0]["detail"]
        bad.clear()  # the server recovers
        before = sum(stub.counts.values())
        result, _ = run(stub, tmp_path, n=3)
        assert sum(stub.counts.values()) - before == 1  # only the failed seed is requested again
    assert len(result.transcripts) == 3 and result.metrics["replies_from_journal"] == 2


def test_malformed_and_empty_replies_are_recorded_failures(tmp_path):
    def script(body, n):
        content = body["messages"][0]["content"]
        return "malformed" if "topic 1'" in content else "empty_choices" if "topic 2'" in content else "ok"

    with StubServer(script=script) as stub:
        result, _ = run(stub, tmp_path, n=4)
    reasons = {f["seed_id"]: f["reason"] for f in result.failures}
    assert reasons == {"s001": "no_complete_pair", "s002": "bad_response"}
    assert "I am sorry" in result.failures[0]["detail"]  # the reply is shown, so the cause is visible
    assert len(result.transcripts) == 2 and set(result.failures[0]) == {"seed_id", "seed", "reason", "detail"}


@pytest.mark.parametrize("status", ["401", "403", "404", "quota"])
def test_permanent_errors_stop_at_once_without_leaking_the_key(tmp_path, status):
    with StubServer(latency_s=0.05, script=lambda body, n: status) as stub:
        with pytest.raises(PermanentError) as info:
            run(stub, tmp_path, n=50)
        assert sum(stub.counts.values()) <= 4  # at most the requests already in flight, not one per seed
    message = str(info.value)
    assert f"HTTP {429 if status == 'quota' else status}" in message
    assert SENTINEL not in message and "SENTINEL" not in message and "\n" not in message


def test_budget_stops_cleanly_and_a_bigger_budget_resumes(tmp_path):
    with StubServer() as stub:
        result, _ = run(stub, tmp_path, n=10, concurrency=1, max_total_tokens=400)
        done = len(result.transcripts)
        assert 0 < done < 10 and result.metrics["budget_exhausted"]
        assert {f["reason"] for f in result.failures} == {"budget_exhausted"} and len(result.failures) == 10 - done
        assert "budget reached" in result.budget_message and "max_total_tokens" in result.budget_message
        before = sum(stub.counts.values())
        result, _ = run(stub, tmp_path, n=10, concurrency=1, max_total_tokens=10_000)
        assert sum(stub.counts.values()) - before == 10 - done  # kept replies are not paid again
    assert len(result.transcripts) == 10 and not result.metrics["budget_exhausted"]


def test_cost_from_the_price_table(tmp_path):
    with StubServer() as stub:
        result, _ = run(stub, tmp_path, n=2, price_in_per_1m=1.0, price_out_per_1m=2.0)
    tok = result.metrics["tokens"]
    assert result.metrics["cost_usd"] == pytest.approx((tok["prompt"] * 1 + tok["completion"] * 2) / 1e6)


def test_a_new_model_or_sampling_is_not_served_from_the_journal(tmp_path):
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], model="a")
    assert req.key("openai") != ChatRequest(messages=req.messages, model="b").key("openai")
    assert req.key("openai") != ChatRequest(messages=req.messages, model="a", temperature=0.1).key("openai")
    assert req.key("openai") != req.key("openai-batch")
    with StubServer() as stub:
        run(stub, tmp_path, n=2)
        run(stub, tmp_path, n=2, temperature=0.2)
        assert sum(stub.counts.values()) == 4


def test_journal_tolerates_a_torn_last_line_and_refuses_corruption(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        j.record("k1", Completion("a", "stop", 1, 2, "m"))
        j.record("k2", Completion("b", "stop", 1, 2, "m"))
    with path.open("ab") as fh:
        fh.write(b'{"key":"k3","reply":{"te')  # kill -9 in the middle of a write
    with Journal(path) as j:
        assert set(j.replies) == {"k1", "k2"} and j.torn_bytes > 0
        j.record("k3", Completion("c", "stop", 1, 2, "m"))
    with Journal(path) as j:
        assert j.get("k3").text == "c" and j.torn_bytes == 0
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], b"garbage", *lines[1:]]) + b"\n")
    with pytest.raises(InputError, match=r"j.jsonl:2: corrupt journal line"):
        Journal(path).open()


def test_one_writer_per_journal(tmp_path):
    with Journal(tmp_path / "j.jsonl"):
        with pytest.raises(Exception, match="another selfchat run"):
            Journal(tmp_path / "j.jsonl").open()


def test_token_bucket_paces_requests():
    async def go():
        bucket = TokenBucket.per_minute(1200)  # 20/s, 20 saved up
        start = time.monotonic()
        for _ in range(40):
            await bucket.acquire()
        return time.monotonic() - start

    assert 0.9 <= asyncio.run(go()) < 2.0


def test_openai_batch_resumes_the_recorded_batch_instead_of_resubmitting(tmp_path):
    async def go(stub, wait_s):
        backend = OpenAIBatchBackend(base_url=stub.url, poll_interval_s=0.05)
        try:
            with Journal(tmp_path / "j.jsonl") as j:
                engine = Engine(backend, j, EngineConfig(model="stub", mode="transcript"), progress=False)
                return await asyncio.wait_for(engine.run(seeds(5)), wait_s)
        finally:
            await backend.aclose()

    with StubServer() as stub:
        with pytest.raises(TimeoutError):  # interrupted while the batch is still in progress
            asyncio.run(go(stub, 1.0))
        entries = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
        assert entries == [{"batch": "batch_1", "keys": entries[0]["keys"]}] and len(entries[0]["keys"]) == 5
        stub.state.batch_release.set()
        result = asyncio.run(go(stub, 20))
        assert stub.state.batch_creates == 1  # polled the recorded batch, paid once
        assert max(stub.counts.values()) == 1
        again = asyncio.run(go(stub, 20))  # everything from the journal now
        assert stub.state.batch_creates == 1
    assert [t.seed_id for t in result.transcripts] == [s.id for s in seeds(5)]
    assert result.transcripts[0].meta["backend"] == "openai-batch"
    assert [t.model_dump() for t in again.transcripts] == [t.model_dump() for t in result.transcripts]


def test_turns_mode_can_ask_the_seed_as_the_first_question(tmp_path):
    with StubServer(human_rounds=2) as stub:
        result, _ = run(stub, tmp_path, n=2, mode="turns", max_rounds=2, first_human="seed")
        assert sum(stub.counts.values()) == 2 * 3  # AI answer, then one generated human turn and its answer
    t = result.transcripts[1]
    assert t.turns[0].text == "topic 1" and t.turns[1].text == "Answer to: topic 1"
    assert t.turns[2].text.startswith("Question 2 about topic 1") and t.meta["ended"] == "max_rounds"
    assert t.meta["raw"][0] == {"role": "human", "text": "topic 1", "finish_reason": "seed"}


# ---------------------------------------------------------------- issue 14: every failure ends as a recorded outcome


def _seed_of(body) -> int:
    """The seed number of a transcript-mode request ("... about the topic: 'topic 7'. Human ...")."""
    return int(body["messages"][0]["content"].split("about the topic: 'topic ")[1].split("'")[0])


@pytest.mark.parametrize("status", ["400", "413", "422"])
def test_a_refused_request_is_that_seeds_failure_and_the_run_goes_on(tmp_path, status):
    """A 4xx about one request (context length, too large, unprocessable) fails that seed only, with its status;
    nothing in flight is lost, and a re-run pays only for the refused one."""
    bad = {"on": True}
    script = lambda body, n: status if bad["on"] and _seed_of(body) == 3 else "ok"  # noqa: E731
    with StubServer(latency_s=0.05, script=script) as stub:
        result, _ = run(stub, tmp_path, n=8)
        assert [t.seed_id for t in result.transcripts] == [f"s{i:03d}" for i in range(8) if i != 3]
        [failure] = result.failures
        assert failure["seed_id"] == "s003" and failure["reason"] == "request_rejected"
        assert failure["status"] == int(status) and f"HTTP {status}" in failure["detail"]
        assert result.metrics["failures_by_reason"] == {"request_rejected": 1}
        bad["on"] = False
        again, _ = run(stub, tmp_path, n=8)
        assert len(again.transcripts) == 8 and again.metrics["new"]["replies"] == 1
        assert sum(stub.state.ok_counts.values()) == 8 and max(stub.state.ok_counts.values()) == 1  # 0 paid twice


@pytest.mark.parametrize("status", ["401", "404", "quota"])
def test_a_run_wide_error_stops_only_after_the_requests_in_flight_are_journaled(tmp_path, status):
    """Seed 0 gets the error at once while seeds 1-3 are on the wire (0.5 s): their replies are paid, so they must
    be journaled before the run stops; the next run pays for none of them again."""
    bad = {"on": True}

    def script(body, n):
        if bad["on"] and _seed_of(body) == 0:
            return status
        time.sleep(0.5)
        return "ok"

    with StubServer(script=script) as stub:
        started = time.monotonic()
        with pytest.raises(PermanentError) as info:
            run(stub, tmp_path, n=20)
        assert time.monotonic() - started < 5
        paid = sum(stub.state.ok_counts.values())
        assert paid == 3  # seeds 1-3 were in flight; no new request started after the error
        with Journal(tmp_path / "j.jsonl") as j:
            assert len(j.replies) == paid  # every paid reply is on disk
        assert "3 replies in flight at the stop were journaled" in str(info.value)
        bad["on"] = False
        result, _ = run(stub, tmp_path, n=20, backend_kw={"concurrency": 8}, concurrency=8)
        assert len(result.transcripts) == 20 and result.metrics["replies_from_journal"] == 3
        assert max(stub.state.ok_counts.values()) == 1  # 0 requests paid twice


def test_retry_after_over_the_cap_is_a_recorded_failure_not_a_sleep(tmp_path):
    script = lambda body, n: "429_long" if _seed_of(body) == 2 else "ok"  # noqa: E731  (Retry-After: 7200)
    with StubServer(script=script) as stub:
        started = time.monotonic()
        result, _ = run(stub, tmp_path, n=4, backend_kw={"max_retry_after_s": 30})
        assert time.monotonic() - started < 10
    [failure] = result.failures
    assert failure["seed_id"] == "s002" and failure["reason"] == "retry_after_too_long" and failure["status"] == 429
    assert "7200 s" in failure["detail"] and len(result.transcripts) == 3


def test_the_journal_key_holds_the_endpoint(tmp_path):
    """Two OpenAI-compatible servers with the same model name never answer each other's requests; the default
    endpoint (api.openai.com) and the local model keep the keys they always had."""
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], model="a")
    # Computed before this change: journals of the default API and of the local backend stay valid.
    assert req.key("openai") == "5da6a20bc86fa87d2efd34724001b0c0062805f409c15e0369bd0bb2b68d35fc"
    local = ChatRequest(messages=req.messages, model="local:abc:float32", seed=1)
    assert local.key("local") == "8e93396955809d9d202aa591af51aa2518b97cad5cc12feeb76d52c40114ed7c"
    assert req.key("openai", "http://a/v1") != req.key("openai", "http://b/v1") != req.key("openai")
    with StubServer() as one, StubServer() as two:
        run(one, tmp_path, n=3)
        run(two, tmp_path, n=3)  # same journal, same model name "stub", another server
        assert sum(one.counts.values()) == 3 and sum(two.counts.values()) == 3
        from baize.selfchat.backend import journal_key

        backend = OpenAIBackend(base_url=one.url + "/")
        assert journal_key(req, backend) == req.key("openai", one.url)  # a trailing slash is the same endpoint


def test_openai_batch_submits_only_what_the_budget_allows(tmp_path):
    async def go(stub, **cfg):
        backend = OpenAIBatchBackend(base_url=stub.url, poll_interval_s=0.05)
        try:
            with Journal(tmp_path / "j.jsonl") as j:
                engine = Engine(backend, j, EngineConfig(model="stub", mode="transcript", max_tokens=100, **cfg),
                                progress=False)
                return await asyncio.wait_for(engine.run(seeds(10)), 20)
        finally:
            await backend.aclose()

    with StubServer() as stub:
        stub.state.batch_release.set()
        result = asyncio.run(go(stub, max_total_tokens=1200))
        submitted = [json.loads(x) for x in stub.state.files["file-1"].decode().splitlines()]
        assert 0 < len(submitted) < 10 and stub.state.batch_creates == 1
        estimate = sum(sum(len(m["content"]) for m in x["body"]["messages"]) // 4 + 1 + 100 for x in submitted)
        assert estimate <= 1200  # the estimate (prompt chars / 4 + max_tokens) fits the budget
        assert sum(stub.state.ok_counts.values()) == len(submitted)  # only what was submitted was paid
        assert len(result.transcripts) == len(submitted)
        assert {f["reason"] for f in result.failures} == {"budget_exhausted"}
        assert len(result.failures) == 10 - len(submitted) == result.metrics["batch_not_submitted"]
        assert "not submitted" in result.failures[0]["detail"] and "max_total_tokens" in result.budget_message
        # A bigger budget submits the rest, in a second batch; nothing is paid twice.
        more = asyncio.run(go(stub, max_total_tokens=100_000))
        assert stub.state.batch_creates == 2 and len(more.transcripts) == 10
        assert max(stub.state.ok_counts.values()) == 1


@pytest.mark.parametrize("line", [
    b'{"key":"k9","reply":"just text"}',
    b'[1, 2, 3]',
    b'{"key":["k9"],"reply":{"text":"a","finish_reason":"stop"}}',
    b'{"key":"k9","reply":{"text":5}}',
    b'{"batch":"b1","keys":5}',
    b'{"something":"else"}',
])
@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_journal_line_that_is_json_but_no_record_is_one_line_naming_file_and_line(tmp_path, line, where):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        j.record("k1", Completion("a", "stop", 1, 2, "m"))
        j.record("k2", Completion("b", "stop", 1, 2, "m"))
    good = path.read_bytes().splitlines()
    lines = [good[0], line, good[1]] if where == "middle" else [*good, line]
    path.write_bytes(b"\n".join(lines) + b"\n")
    lineno = 2 if where == "middle" else 3
    with pytest.raises(InputError, match=rf"j.jsonl:{lineno}: not a journal record \(") as info:
        Journal(path).open()
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"\n".join(lines) + b"\n"  # nothing cut off: it is no torn write


def test_the_judge_records_a_refused_request_and_stops_on_a_run_wide_error_after_journaling(tmp_path):
    """The LLM judge shares the rules: a 400 leaves that row unjudged with its error and status, the others are
    judged; a 401 stops it only after the verdicts in flight are journaled (0 paid twice on the re-run)."""
    from baize import judge

    rows = [{"id": f"q{i}", "question": f"Question {i}?", "base": {"text": "b"}, "adapter": {"text": f"a{i}"}}
            for i in range(6)]
    mode = {"status": "400"}

    def script(body, n):
        content = body["messages"][-1]["content"]
        if mode["status"] == "400" and "Question 2?" in content:
            return "400"
        if mode["status"] == "401":
            if "Question 0?" in content:
                return "401"
            time.sleep(0.5)
        return "ok"

    async def go(stub):
        backend = OpenAIBackend(base_url=stub.url, concurrency=4, max_retries=0)
        try:
            with Journal(tmp_path / "judge.jsonl") as j:
                return await judge.judge_rows(backend, j, rows, model="stub", reference="base")
        finally:
            await backend.aclose()

    with StubServer(script=script) as stub:
        judged, summary = asyncio.run(go(stub))
        assert judged[2]["error"]["status"] == 400 and judged[2]["error"]["reason"] == "request_rejected"
        assert summary["failed"] == 1 and all("error" not in j for i, j in enumerate(judged) if i != 2)
        rows += [{"id": f"q{i}", "question": f"Question {i}?", "base": {"text": "b"}, "adapter": {"text": f"a{i}"}}
                 for i in range(6, 10)]
        rows[0] = {**rows[0], "adapter": {"text": "another answer"}}  # a new verdict for q0
        mode["status"] = "401"
        with pytest.raises(PermanentError) as info:
            asyncio.run(go(stub))
        with Journal(tmp_path / "judge.jsonl") as j:
            assert len(j.replies) == sum(stub.state.ok_counts.values())  # every paid verdict is journaled
        assert "replies in flight at the stop were journaled" in str(info.value)
        mode["status"] = "ok"
        judged, summary = asyncio.run(go(stub))
        assert summary["failed"] == 0 and len(judged) == 10
        assert max(stub.state.ok_counts.values()) == 1  # 0 paid twice
