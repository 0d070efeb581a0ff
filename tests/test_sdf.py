"""Baize v2 (SDF): prompt choice, strict judge parsing (a judge stub on 127.0.0.1 with broken replies), best-of-N
and its tie rule, constrained decoding of the local judge, and journaled resume of sampling and judging (real
stage subprocesses killed with SIGKILL mid-run).

The stage tests run in a temporary project with a tiny random LLaMA (2 layers, hidden 64) and the real SmolLM2
tokenizer, so a run takes seconds; the stacked adapters are tested in tests/test_sdf_stack.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from baize import judge, sdf
from baize.config import SdfSampleParams, SeedSource
from baize.selfchat.backend import ChatRequest
from baize.selfchat.journal import Journal
from selfchat_stub import StubServer

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- best of N


def _judged(prompt_id: str, scores: list[int | None]) -> list[dict]:
    return [{"prompt_id": prompt_id, "prompt": f"q {prompt_id}", "sample": i, "text": f"a{i}", "score": s,
             "failure": None if s is not None else "not JSON"} for i, s in enumerate(scores)]


def test_best_of_n_highest_score_and_earlier_sample_on_ties():
    judged = [*_judged("p1", [40, 90, 90, 10]), *_judged("p2", [None, 55, None, 70]), *_judged("p3", [None] * 4),
              *_judged("p4", [80, 80, 80, 80])]
    # The judging order must not matter: shuffle the records.
    best, m = sdf.select_best(list(reversed(judged)))
    by_prompt = {b["prompt_id"]: b for b in best}
    assert set(by_prompt) == {"p1", "p2", "p4"}
    assert (by_prompt["p1"]["sample"], by_prompt["p1"]["score"], by_prompt["p1"]["tied_with"]) == (1, 90, [2])
    assert (by_prompt["p2"]["sample"], by_prompt["p2"]["score"], by_prompt["p2"]["tied_with"]) == (3, 70, [])
    assert (by_prompt["p4"]["sample"], by_prompt["p4"]["tied_with"]) == (0, [1, 2, 3])
    assert m["prompts"] == 4 and m["kept"] == 3 and m["dropped_all_failed"] == 1 and m["ties"] == 2
    assert m["score_max"] == 90 and m["score_min"] == 10
    assert m["within_prompt_spread_mean"] == pytest.approx((80 + 15 + 0) / 3)


def test_best_answers_become_baize_transcripts_with_cut_answers_marked():
    best, _ = sdf.select_best([
        {**_judged("p1", [60])[0], "finish_reason": "stop"},
        {**_judged("p2", [70])[0], "finish_reason": "length"},
    ])
    t1, t2 = sdf.best_transcripts(best, "judge-x")
    assert [t.role for t in t1.turns] == ["human", "ai"] and t1.turns[0].text == "q p1"
    assert t1.meta["truncated_turns"] == [] and t2.meta["truncated_turns"] == [1]
    assert t1.meta["sdf"]["score"] == 60 and t1.meta["sdf"]["judge"] == "judge-x"


# --------------------------------------------------------------------------- strict parsing


@pytest.mark.parametrize(
    ("reply", "score", "failure"),
    [
        ('{"score": 73}', 73, None),
        ('{"rationale": "Clear and correct.", "score": 100}', 100, None),
        ('```json\n{"score": 1}\n```', 1, None),
        ('  {"score": 42}\n', 42, None),
        ("", None, "empty reply"),
        ("Score: 8/10", None, "not JSON"),
        ('{"score": 73', None, "not JSON"),
        ('{"score": 0}', None, "outside 1-100"),
        ('{"score": 101}', None, "outside 1-100"),
        ('{"score": -5}', None, "outside 1-100"),
        ('{"score": 7.5}', None, "not an integer"),
        ('{"score": "80"}', None, "not an integer"),
        ('{"score": true}', None, "not an integer"),
        ('{"score": null}', None, "not an integer"),
        ('{"rating": 80}', None, "no 'score' key"),
        ("[80]", None, "not a JSON object"),
        ('{"score": 80, "rationale": 5}', None, "rationale is not a string"),
        ('{"score": 80} and some more', None, "not JSON"),
    ],
)
def test_parse_score_is_strict(reply, score, failure):
    parsed = judge.parse_score(reply)
    assert parsed.score == score
    if failure is None:
        assert parsed.failure is None
    else:
        assert failure in parsed.failure


def _lp(probs: dict[str, float]) -> dict[str, float]:
    return {token: math.log(p) for token, p in probs.items()}


def test_expected_score_weighs_every_number_the_judge_could_have_written():
    # Digit by digit (SmolLM2, LLaMA): the first digit's alternatives, completed with the digits written after it.
    steps = [_lp({'{"': 1}), _lp({"score": 1}), _lp({'":': 1}), _lp({" ": 1}),
             _lp({"3": 0.5, "7": 0.25, "x": 0.25}), _lp({"0": 1}), _lp({"}": 1})]
    assert judge.expected_score('{"score": 30}', steps) == pytest.approx((0.5 * 30 + 0.25 * 70) / 0.75)
    # Whole-number tokens (GPT-4o's tokenizer): each alternative is a score; out-of-range ones are left out.
    steps = [_lp({'{"score": ': 1}), _lp({"87": 0.5, "90": 0.3, "250": 0.2}), _lp({"}": 1})]
    assert judge.expected_score('{"score": 87}', steps) == pytest.approx((0.5 * 87 + 0.3 * 90) / 0.8)
    assert judge.expected_score('{"score": 87}', None) is None
    assert judge.expected_score('{"score": 87}', [_lp({"{": 1}), _lp({"}": 1})]) is None  # no number: no estimate


def test_a_reply_cut_at_max_tokens_says_so():
    assert "cut at max_tokens" in judge.parse_score('{"rationale": "The answ', "length").failure


def test_packaged_judge_prompt_is_versioned_and_has_its_placeholders(tmp_path):
    text = judge.load_judge_prompt("packaged:sdf_judge_v1")
    assert "{question}" in text and "{answer}" in text and "1 to 100" in text
    bad = tmp_path / "p.txt"
    bad.write_text("Rate {answer}.")
    with pytest.raises(Exception, match=r"lacks \{question\}"):
        judge.load_judge_prompt(str(bad))
    with pytest.raises(Exception, match="no such packaged prompt"):
        judge.load_judge_prompt("packaged:sdf_judge_v0")


BROKEN = {
    "a-good": '{"rationale": "Accurate and detailed.", "score": 88}',
    "a-prose": "I would give this answer 7 out of 10.",
    "a-range": '{"rationale": "ok", "score": 250}',
    "a-float": '{"rationale": "ok", "score": 61.5}',
    "a-fenced": '```json\n{"rationale": "fine", "score": 64}\n```',
}


def _judge_reply(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    return next(text for key, text in BROKEN.items() if f"answer {key}." in prompt)


def test_openai_judge_against_a_stub_records_each_broken_reply_and_pays_once(tmp_path):
    from baize.selfchat.openai_backend import OpenAIBackend

    template = judge.load_judge_prompt("packaged:sdf_judge_v1")
    items = [{"question": "What is RAM?", "answer": f"This is answer {key}."} for key in BROKEN]

    async def run(url: str, journal_path: Path):
        backend = OpenAIBackend(base_url=url, concurrency=4)
        try:
            with Journal(journal_path) as journal:
                return await judge.judge_answers(backend, journal, items, template=template, model="judge-1",
                                                 max_tokens=64, constraint="schema")
        finally:
            await backend.aclose()

    with StubServer(reply=_judge_reply) as stub:
        judged, stats = asyncio.run(run(stub.url, tmp_path / "j.jsonl"))
        assert stats == {"requests": len(BROKEN), "cached": 0}
        # Structured output was asked for: the JSON schema with a 1-100 integer score.
        formats = [b["response_format"] for b in stub.state.bodies]
        assert all(f["type"] == "json_schema" for f in formats)
        assert formats[0]["json_schema"]["schema"]["properties"]["score"] == {
            "type": "integer", "minimum": 1, "maximum": 100}
        by_answer = dict(zip(BROKEN, judged, strict=True))
        assert by_answer["a-good"]["score"] == 88 and by_answer["a-good"]["rationale"] == "Accurate and detailed."
        assert by_answer["a-fenced"]["score"] == 64
        for key in ("a-prose", "a-range", "a-float"):
            assert by_answer[key]["score"] is None and by_answer[key]["failure"], key
            assert by_answer[key]["reply"] == BROKEN[key]  # the raw reply is kept for the record
        assert "outside 1-100" in by_answer["a-range"]["failure"]
        # A re-run is answered from the journal: nothing requested twice.
        again, stats = asyncio.run(run(stub.url, tmp_path / "j.jsonl"))
        assert stats == {"requests": 0, "cached": len(BROKEN)}
        assert [j["score"] for j in again] == [j["score"] for j in judged]
        assert max(stub.counts.values()) == 1
        # Another endpoint is another judge: the journal does not answer for it.
        request = judge.score_request("q", "a", template=template, model="judge-1", max_tokens=64,
                                      constraint="schema")
        from baize.selfchat.journal import request_key

        assert request_key(request, "openai", stub.url) != request_key(request, "openai", "http://other/v1")


# --------------------------------------------------------------------------- prompts


def test_sdf_prompts_never_repeat_what_the_first_adapter_saw():
    params = SdfSampleParams(prompts=[SeedSource(type="packaged", name="general")], num_prompts=30, random_seed=3)
    first, _ = sdf.choose_prompts(params, [])
    seen = [p["text"] for p in first[:10]] + [first[10]["text"].upper() + "!!"]  # a near duplicate too
    prompts, m = sdf.choose_prompts(params, seen)
    assert len(prompts) == 30 and m["excluded_as_seen"] == 11
    texts = {p["text"] for p in prompts}
    assert not texts & {p["text"] for p in first[:11]}
    # Deterministic, and the same order as without the exclusion.
    assert prompts == sdf.choose_prompts(params, seen)[0]
    assert [p["text"] for p in prompts][:19] == [p["text"] for p in first[11:30]]


# --------------------------------------------------------------------------- stage subprocesses: kill -9 + resume


def _tiny_adapter(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True)


@pytest.fixture(scope="module")
def sdf_project(base_model_dir, tmp_path_factory) -> Path:
    """models/base (tiny random LLaMA + real tokenizer), models/adapter, seeds and validated transcripts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("sdf-project")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "models/base", safe_serialization=True)
    tokenizer.save_pretrained(root / "models/base")
    _tiny_adapter(root / "models/base", root / "models/adapter")
    (root / "data/seeds").mkdir(parents=True)
    (root / "data/seeds/seeds.jsonl").write_text(json.dumps({"id": "s1", "text": "How do I learn Python?"}) + "\n")
    (root / "data/validated").mkdir(parents=True)
    t = {"id": "t1", "seed": "How do I learn Python?", "source": "x", "turns": [
        {"role": "human", "text": "How do I learn Python?"}, {"role": "ai", "text": "Practice."}]}
    (root / "data/validated/transcripts.jsonl").write_text(json.dumps(t) + "\n")
    return root


def _project(sdf_project: Path, tmp_path: Path, **sections) -> Path:
    project = tmp_path / "p"
    project.mkdir()
    for sub in ("models", "data/seeds", "data/validated"):
        (project / sub).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(sdf_project / sub, project / sub)
    _project_params(project, **sections)
    return project


def _project_params(project: Path, **sections) -> None:
    params = {"tracking": {"experiment": "baize-test", "log_artifacts": False}, **sections}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src"), str(ROOT / "tests")]),
               MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", BAIZE_PIPELINE_ID="test-sdf",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _kill_when(proc: subprocess.Popen, path: Path, at_least: int, timeout: float = 120) -> int:
    """SIGKILL the stage once `path` holds `at_least` records; returns how many it held then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(_lines(path))
        if n >= at_least:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return n
        assert proc.poll() is None, f"the stage ended before it was killed: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("the stage wrote too little before the timeout")


def _run(project: Path, module: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", module], cwd=project, env=_env(project), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = project / "reports" / module.split(".")[-1]
    # report.json: what the inputs decide; run.json: journal reuse and seconds
    return {**json.loads((reports / "report.json").read_text()), **json.loads((reports / "run.json").read_text())}


SAMPLE = {"prompts": [{"type": "packaged", "name": "general"}], "num_prompts": 4, "num_samples": 4,
          "max_tokens": 96, "batch_size": 1, "temperature": 1.0}


def _without(records: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != key} for r in records]


@pytest.mark.slow
def test_sampling_killed_mid_run_resamples_nothing(sdf_project, tmp_path):
    project = _project(sdf_project, tmp_path, sdf_sample=SAMPLE)
    journal = project / "data/sdf/sample_journal.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "stages.sdf_sample"], cwd=project, env=_env(project),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_at = _kill_when(proc, journal, 2)  # one answer at a time: killed with most still to sample
    assert killed_at < 16
    recorded = {e["key"] for e in _lines(journal)}
    # The batch size is not part of a request: the re-run batches the rest and still reuses the journal.
    _project_params(project, sdf_sample={**SAMPLE, "batch_size": 8})
    m = _run(project, "stages.sdf_sample")
    assert m["samples"] == 16 and m["failed"] == 0
    assert m["from_journal"] == len(recorded) and m["sampled_now"] == 16 - len(recorded)
    keys = [e["key"] for e in _lines(journal)]
    assert len(keys) == len(set(keys)) == 16  # every answer journaled once
    samples = _lines(project / "data/sdf/samples.jsonl")
    assert [(s["prompt_id"], s["sample"]) for s in samples] == [
        (p["id"], i) for p in _lines(project / "data/sdf/prompts.jsonl") for i in range(4)]
    assert "How do I learn Python?" not in {s["prompt"] for s in samples}  # the first adapter's seed
    assert _run(project, "stages.sdf_sample")["sampled_now"] == 0  # a third run samples nothing
    assert _without(_lines(project / "data/sdf/samples.jsonl"), "cached") == _without(samples, "cached")


@pytest.mark.slow
def test_judging_killed_mid_run_pays_nothing_twice(sdf_project, tmp_path):
    """The judge is an OpenAI-compatible stub (300 ms per reply, one at a time) that counts requests per body."""
    samples = [{"prompt_id": f"p{i // 3}", "prompt": f"Question {i // 3}?", "sample": i % 3,
                "text": f"This is answer a-{['good', 'prose', 'range'][i % 3]}.", "finish_reason": "stop",
                "failure": None, "cached": False, "completion_tokens": 5} for i in range(15)]
    samples[4] = {**samples[4], "text": "", "failure": "empty_answer"}  # not worth a judge call

    def reply(body):
        return BROKEN[next(k for k in BROKEN if f"answer {k}." in body["messages"][-1]["content"])]

    with StubServer(reply=reply, latency_s=0.3) as stub:
        project = _project(sdf_project, tmp_path, sdf_judge={
            "backend": "openai", "model": "judge-1", "base_url": stub.url, "concurrency": 1, "max_tokens": 64})
        (project / "data/sdf").mkdir(parents=True)
        sdf.write_jsonl(project / "data/sdf/samples.jsonl", samples)
        journal = project / "data/sdf/judge_journal.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "stages.sdf_judge"], cwd=project, env=_env(project),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        killed_at = _kill_when(proc, journal, 3)
        assert killed_at < 14
        m = _run(project, "stages.sdf_judge")
        # Every body was paid for once; a request in flight at the kill may have reached the server unrecorded.
        assert sum(stub.state.ok_counts.values()) <= 14 + 1 and len(stub.state.ok_counts) == 14
        assert m["from_journal"] >= killed_at and m["requests"] + m["from_journal"] == 14
        assert m["failures_by_reason"] == {"empty_answer": 1, "not JSON": 4, "score 250 outside 1-100": 5}
        assert m["kept"] == 5 and m["dropped_all_failed"] == 0 and m["ties"] == 0
        best = _lines(project / "data/sdf/best.jsonl")
        assert [b["meta"]["sdf"]["score"] for b in best] == [88] * 5
        before = sum(stub.state.ok_counts.values())
        assert _run(project, "stages.sdf_judge")["requests"] == 0
        assert sum(stub.state.ok_counts.values()) == before


# --------------------------------------------------------------------------- local backend: raw prompts, choices


def test_local_judge_is_constrained_to_a_parseable_score(sdf_project):
    """A random tiny model writes noise; under the constraint every reply is still a valid score."""
    from baize.selfchat.local_backend import LocalBackend

    template = judge.load_judge_prompt("packaged:sdf_judge_v1")
    with LocalBackend(sdf_project / "models/base", batch_size=4, dtype="float32") as backend:
        requests = [judge.score_request(f"Question {i}?", f"Answer {i}.", template=template, model="tiny",
                                        max_tokens=16, constraint="choices") for i in range(6)]
        sampled = [ChatRequest(**{**r.__dict__, "temperature": 1.0, "seed": i}) for i, r in enumerate(requests)]
        replies = [backend.complete_sync(r) for r in requests + sampled]
        for reply in replies:
            assert reply.text in judge.LOCAL_CHOICES and reply.finish_reason == "stop"
            assert judge.parse_score(reply.text).score is not None
        # Each reply carries the judge's distribution at every step, over the allowed tokens only: at the score's
        # first digit, the nine tens it could write; their probability-weighted mean is the judgment.
        for reply in replies[:6]:
            assert len(reply.top_logprobs) == reply.completion_tokens
            digits = next(step for step in reply.top_logprobs if any(t.strip().isdigit() for t in step))
            assert {t.strip() for t in digits} <= set("123456789")
            assert sum(math.exp(v) for v in digits.values()) == pytest.approx(1.0, abs=1e-4)
            weighted = judge.expected_score(reply.text, reply.top_logprobs)
            assert 10 <= weighted <= 90
            assert weighted == pytest.approx(sum(math.exp(v) * 10 * int(t) for t, v in digits.items()), rel=1e-4)
        # Too small a budget cannot spell a whole score: a recorded failure, not a made-up score.
        cut = backend.complete_sync(ChatRequest(**{**requests[0].__dict__, "max_tokens": 2}))
        assert cut.finish_reason == "length" and judge.parse_score(cut.text, cut.finish_reason).score is None


def test_local_raw_prompt_equals_generate_on_the_same_text(sdf_project):
    """A `prompt` request is the text as is (no chat template), greedy = one-at-a-time `generate`."""
    import torch

    from baize import inference
    from baize.selfchat.local_backend import LocalBackend

    prompt = inference.build_prompt("How do I boil an egg?")
    with LocalBackend(sdf_project / "models/base", batch_size=2, dtype="float32") as backend:
        done = backend.complete_sync(ChatRequest(messages=[], prompt=prompt, model="tiny", temperature=0.0,
                                                 max_tokens=12))
        enc = backend.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = backend.model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert done.prompt_tokens == enc["input_ids"].shape[1]
    assert done.text == backend.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------- pairwise: both orders


@pytest.mark.parametrize(
    ("a_first", "b_first", "result"),
    [
        ("first", "second", "win"),        # A preferred in both positions
        ("second", "first", "loss"),
        ("tie", "tie", "tie"),
        ("first", "first", "inconsistent"),  # whoever is first wins: position bias
        ("second", "second", "inconsistent"),
        ("first", "tie", "inconsistent"),
        (None, "first", None),
    ],
)
def test_pairwise_verdicts_combine_both_orders(a_first, b_first, result):
    assert judge.combine_orders(a_first, b_first) == result


def test_pairwise_judges_each_pair_in_both_orders_against_a_stub(tmp_path):
    """The stub judge always prefers Assistant 1 for one question (position bias) and the longer answer otherwise."""
    from baize.selfchat.openai_backend import OpenAIBackend

    def reply(body):
        prompt = body["messages"][-1]["content"]
        one = prompt.split("[The Start of Assistant 1's Answer]\n")[1].split("\n[The End")[0]
        two = prompt.split("[The Start of Assistant 2's Answer]\n")[1].split("\n[The End")[0]
        if "biased" in prompt:
            return "9 3\nThe first one."
        if "broken" in prompt:
            return "I prefer neither."
        return f"{min(10, len(one))} {min(10, len(two))}\nLonger is better here."

    rows = [{"id": "q1", "question": "plain?", "v2": {"text": "longer answer"}, "adapter": {"text": "short"}},
            {"id": "q2", "question": "biased?", "v2": {"text": "x"}, "adapter": {"text": "y"}},
            {"id": "q3", "question": "plain again?", "v2": {"text": "abc"}, "adapter": {"text": "abc"}},
            {"id": "q4", "question": "broken?", "v2": {"text": "a"}, "adapter": {"text": "b"}}]

    async def run(url):
        backend = OpenAIBackend(base_url=url, concurrency=2)
        try:
            with Journal(tmp_path / "pairs.jsonl") as journal:
                return await judge.pairwise(backend, journal, rows, "v2", "adapter", model="judge-1", max_tokens=32)
        finally:
            await backend.aclose()

    with StubServer(reply=reply) as stub:
        results, summary = asyncio.run(run(stub.url))
        # Every pair was asked twice, the answers swapped between the two positions.
        firsts = [b["messages"][-1]["content"].split("Assistant 1's Answer]\n")[1].split("\n")[0]
                  for b in stub.state.bodies if "plain?" in b["messages"][-1]["content"]]
        assert sorted(firsts) == ["longer answer", "short"]
    assert [r["result"] for r in results] == ["win", "inconsistent", "tie", None]
    assert (summary["win"], summary["tie"], summary["loss"], summary["unparsed"]) == (1, 2, 0, 1)
    assert summary["inconsistent_share"] == pytest.approx(1 / 3)
    assert summary["requests"] + summary["cached"] == 8  # q3 asks the same thing twice: once paid


def test_sampling_through_an_openai_compatible_server_sends_the_raw_baize_prompt(tmp_path):
    """`sdf_sample.backend: openai`: the Completions API with Baize's text prompt, stop strings and seeds."""
    from baize import inference
    from baize.selfchat.openai_backend import OpenAIBackend

    params = SdfSampleParams(num_samples=2, backend="openai", model="baize-v1.5", base_url="http://x/v1")
    prompts = [{"id": "p1", "text": "How do I boil an egg?"}]

    requests = sdf.sample_requests(prompts, params, model="baize-v1.5", tokenizer=None)  # None: no token budget
    assert len(requests) == 2 and requests[0][2].seed != requests[1][2].seed

    async def run(url):
        backend = OpenAIBackend(base_url=url)
        try:
            with Journal(tmp_path / "s.jsonl") as journal:
                return await sdf.sample_answers(backend, journal, requests)
        finally:
            await backend.aclose()

    with StubServer(reply=lambda body: " Boil it for 8 minutes.\n[|Human|] Thanks") as stub:
        samples = asyncio.run(run(stub.url))
        body = stub.state.bodies[0]
    assert "messages" not in body and body["prompt"] == inference.build_prompt("How do I boil an egg?")
    assert body["stop"] == ["[|Human|]", "[|AI|]"] and body["temperature"] == 1.0 and body["top_p"] == 0.95
    assert [s["text"] for s in samples] == ["Boil it for 8 minutes."] * 2
    assert all(s["finish_reason"] == "stop" and s["failure"] is None for s in samples)


def test_bad_inputs_stop_the_stages_with_one_line(sdf_project, tmp_path):
    project = _project(sdf_project, tmp_path, sdf_judge={"backend": "local"},
                       sdf_sample={"backend": "openai", "model": "m"})
    (project / "data/sdf").mkdir(parents=True)
    good = {"prompt_id": "p", "prompt": "q?", "sample": 0, "text": "a", "failure": None}
    (project / "data/sdf/samples.jsonl").write_text(json.dumps(good) + "\n" + '{"prompt_id": "p", "sample": 1\n')
    judged = subprocess.run([sys.executable, "-m", "stages.sdf_judge"], cwd=project, env=_env(project),
                            capture_output=True, text=True, timeout=120)
    assert judged.returncode == 1
    assert judged.stderr.strip().splitlines()[-1].startswith("error: data/sdf/samples.jsonl:2: ")
    sampled = subprocess.run([sys.executable, "-m", "stages.sdf_sample"], cwd=project, env=_env(project),
                             capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 2
    assert "sdf_sample" in sampled.stderr and "base_url" in sampled.stderr and "Traceback" not in sampled.stderr
