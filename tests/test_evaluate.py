"""The evaluate stage and its library: prompt building, stop strings, format metrics, perplexity, the judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from baize import evaluation, inference
from baize.inference import BAIZE_SYSTEM_PROMPT, Generation

sys.path.insert(0, str(Path(__file__).parent))
import eval_helpers  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return inference.load_tokenizer(base_model_dir)


@pytest.fixture(scope="module")
def tiny(base_model_dir) -> Path:
    return eval_helpers.tiny_adapter(base_model_dir)


# --------------------------------------------------------------------------- prompt and truncation


def test_paper_prompt_is_baize_demo_prompt():
    assert BAIZE_SYSTEM_PROMPT.startswith("The following is a conversation between a human and an AI assistant named Baize")
    assert BAIZE_SYSTEM_PROMPT.endswith("[|Human|]Hello!\n[|AI|]Hi!")
    p = inference.build_prompt("Why?", [("Hi", "Hello"), ("Q2", "A2")], prompt_format="paper")
    assert p == BAIZE_SYSTEM_PROMPT + "\n[|Human|]Hi\n[|AI|]Hello\n[|Human|]Q2\n[|AI|]A2\n[|Human|]Why?\n[|AI|]"


def test_training_prompt_is_what_the_adapter_chat_template_renders(tokenizer):
    from baize.chat_template import set_baize_chat_template

    history = [("Hi", "Hello"), ("Q2", "A2")]
    p = inference.build_prompt("Why?", history)  # the default format
    assert p == "The conversation between human and AI assistant.\n[|Human|] Hi\n[|AI|] Hello\n[|Human|] Q2\n[|AI|] A2\n[|Human|] Why?\n[|AI|]"
    messages = [m for h, a in history for m in ({"role": "user", "content": h}, {"role": "assistant", "content": a})]
    messages.append({"role": "user", "content": "Why?"})
    templated = set_baize_chat_template(tokenizer).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert p == templated
    with pytest.raises(inference.BaizeError, match="prompt format 'chatml'"):
        inference.build_prompt("Why?", prompt_format="chatml")


@pytest.mark.parametrize("prompt_format", ["training", "paper"])
def test_truncation_drops_oldest_turns(tokenizer, prompt_format):
    history = [(f"question number {i} " + "word " * 20, f"answer number {i} " + "word " * 20) for i in range(6)]
    base = inference.count_tokens(tokenizer, inference.build_prompt("Last?", prompt_format=prompt_format))
    pair = inference.count_tokens(tokenizer, inference.format_turn(*history[-1], prompt_format=prompt_format))
    budget = base + 2 * pair + 2  # room for about two pairs
    p = inference.build_prompt("Last?", history, tokenizer, budget, prompt_format)
    assert inference.count_tokens(tokenizer, p) <= budget
    assert "question number 5" in p and "question number 4" in p
    assert "question number 3" not in p and "question number 0" not in p
    if prompt_format == "paper":
        assert p.endswith("\n[|Human|]Last?\n[|AI|]") and p.startswith(BAIZE_SYSTEM_PROMPT)
    else:
        assert p.endswith("\n[|Human|] Last?\n[|AI|]") and p.startswith("The conversation between human and AI assistant.\n[|Human|] question number 4")
    with pytest.raises(inference.PromptTooLongError, match="context budget"):
        inference.build_prompt("Last?", history, tokenizer, base - 1, prompt_format)


def test_cut_at_stop_and_hold_back():
    assert inference.cut_at_stop("Paris.\n[|Human|]And") == ("Paris.\n", "[|Human|]")
    assert inference.cut_at_stop("a [|AI|] b [|Human|]") == ("a ", "[|AI|]")
    assert inference.cut_at_stop("no marker") == ("no marker", None)
    assert inference._held_back("text [|Hu", inference.STOP_STRINGS) == 4
    assert inference._held_back("text [", inference.STOP_STRINGS) == 1
    assert inference._held_back("text.", inference.STOP_STRINGS) == 0


# --------------------------------------------------------------------------- format metrics


def _g(text, reason, stop=None, n=None):
    return Generation(text=text, finish_reason=reason, stop_string=stop, num_tokens=n if n is not None else len(text.split()), raw=text)


def test_role_leak_detection():
    assert not inference.has_role_leak(_g("Paris is the capital.", "stop", "[|Human|]"))
    assert inference.has_role_leak(_g("Sure.", "stop", "[|AI|]"))  # a second AI turn with no human between
    assert inference.has_role_leak(_g("Paris.\nHuman: and Spain?", "length"))
    assert inference.has_role_leak(_g("Paris.\n[Human] and Spain?", "eos"))
    assert inference.has_role_leak(_g("Paris.\n### Assistant: more", "eos"))
    assert not inference.has_role_leak(_g("Humans: a species. AI: a field.", "eos"))  # mid-line, plural


def test_format_metrics_on_hand_made_outputs():
    gens = [
        _g("One two three.", "stop", "[|Human|]", 3),
        _g("Four five.", "eos", None, 2),
        _g("Six seven eight nine", "length", None, 4),
        _g("Hi.\nUser: more", "stop", "[|AI|]", 3),
    ]
    m = evaluation.format_metrics(gens)
    assert m["count"] == 4
    assert m["stop_rate"] == 0.75
    assert m["role_leak_rate"] == 0.25
    assert m["mean_tokens"] == 3.0
    assert m["empty_rate"] == 0.0
    assert m["mean_chars"] == sum(len(g.text) for g in gens) / 4
    assert evaluation.format_metrics([]) == {"count": 0}


# --------------------------------------------------------------------------- prompts


def test_packaged_prompts():
    items = evaluation.load_prompts("packaged:vicuna80")
    assert len(items) == 80 and len({i["id"] for i in items}) == 80
    cats = {i["category"] for i in items}
    assert cats == {"generic", "knowledge", "roleplay", "common-sense", "fermi", "counterfactual", "coding", "math", "writing"}
    first9 = evaluation.load_prompts("packaged:vicuna80", 9)
    assert {i["category"] for i in first9} == cats  # any prefix is spread over the categories
    with pytest.raises(Exception, match="unknown packaged set"):
        evaluation.load_prompts("packaged:nope")


def test_prompt_files(tmp_path):
    (tmp_path / "q.txt").write_text("First?\n\nSecond?\n")
    assert [p["text"] for p in evaluation.load_prompts(str(tmp_path / "q.txt"))] == ["First?", "Second?"]
    (tmp_path / "q.jsonl").write_text('{"text": "A?"}\n{"nope": 1}\n')
    with pytest.raises(Exception, match=r"q\.jsonl:2: expected an object with a non-empty 'text'"):
        evaluation.load_prompts(str(tmp_path / "q.jsonl"))


def test_heldout_prompts_are_first_human_turns(tiny, tokenizer):
    val = evaluation.load_split(tiny / "tokenized" / "val")
    got = evaluation.heldout_prompts(val, tokenizer, 3)
    assert [g["text"] for g in got] == [f"Tell me about {t}." for t in eval_helpers.TOPICS[16:19]]


# --------------------------------------------------------------------------- model runs


@pytest.mark.slow
def test_adapter_perplexity_below_base_in_one_run(tiny, base_model_dir, capsys):
    model, tok = inference.load_model(base_model_dir, tiny / "adapter")
    val = evaluation.load_split(tiny / "tokenized" / "val")
    rows = [val[i] for i in range(len(val))]
    capsys.readouterr()
    res = evaluation.compare_perplexity(model, rows, batch_size=4, pad_token_id=tok.pad_token_id)
    assert res["adapter"] < res["base"]
    # Each model's pass says so (off a terminal: plain lines, the last with every row done).
    err = capsys.readouterr().err
    for name in ("base", "adapter"):
        assert f"evaluate: perplexity of {name}: 100%" in err and f"{len(rows)}/{len(rows)}" in err, err
    assert res["drop"] == pytest.approx(res["base"] - res["adapter"])
    # Only labelled tokens count: the AI turns and their end markers, not the human turns or the preamble.
    assert res["tokens"] == sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    # The adapter is off inside the context and back on after it.
    with evaluation.base_model_context(model):
        again = evaluation.perplexity(model, rows[:2], pad_token_id=tok.pad_token_id)
    after = evaluation.perplexity(model, rows[:2], pad_token_id=tok.pad_token_id)
    assert after["perplexity"] < again["perplexity"]


@pytest.mark.slow
def test_generation_stops_at_stop_strings(tiny, base_model_dir):
    model, tok = inference.load_model(base_model_dir, tiny / "adapter")
    prompts = [inference.build_prompt(f"Tell me about {t}.") for t in ("tea", "rivers")]  # trained topics
    # The trained adapter ends its turn with [|Human|] (it learned the Baize format).
    gens = inference.generate(model, tok, prompts, max_new_tokens=40, temperature=0, batch_size=2)
    assert all(g.finish_reason == "stop" and g.stop_string == "[|Human|]" for g in gens), gens
    assert all("[|" not in g.text and g.raw.count("[|Human|]") == 1 for g in gens)
    # Any stop string works the same way, mid-sentence too; a tiny limit ends with "length".
    cut = inference.generate(model, tok, prompts[:1], max_new_tokens=40, temperature=0, stop=("about",))
    assert cut[0].finish_reason == "stop" and "about" not in cut[0].text
    short = inference.generate(model, tok, prompts[:1], max_new_tokens=2, temperature=0, stop=("@@@",))
    assert short[0].finish_reason == "length"
    # Streaming shows the same reply, never a (partial) marker.
    pieces = list(inference.stream_reply(model, tok, prompts[0], max_new_tokens=40, temperature=0))
    assert "".join(pieces) == gens[0].text and len(pieces) > 1


@pytest.mark.slow
def test_served_answers_equal_generate_greedily(tiny, base_model_dir):
    """evaluate's engine (the self-chat local backend: continuous batching, the adapter merged) answers as
    `model.generate` does: greedy, the same texts, stop reasons and stop strings for the base, the base through its
    own chat template, and the adapter."""
    model, tok = inference.load_model(base_model_dir, tiny / "adapter")
    prompts = [{"text": f"Tell me about {t}."} for t in ("tea", "rivers", "the moon")]
    kw = dict(which=["base", "base_chat", "adapter"], max_new_tokens=24, temperature=0, top_p=1.0, batch_size=2,
              seed=3, max_context_tokens=512, chat_tokenizer=inference.load_tokenizer(base_model_dir))
    expected = evaluation.generate_answers(model, tok, prompts, **kw)
    served = evaluation.generate_answers_served(base_model_dir, {"adapter": tiny / "adapter"}, tok, prompts, **kw)
    for name in kw["which"]:
        assert [(g.text, g.finish_reason, g.stop_string) for g in served[name]] == [
            (g.text, g.finish_reason, g.stop_string) for g in expected[name]], name
    assert any(g.stop_string == "[|Human|]" for g in served["adapter"])  # the trained adapter hands the turn back


# --------------------------------------------------------------------------- the stage


def _project(tmp_path: Path, tiny: Path, base_model_dir: Path, extra: str = "") -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(
        "tracking:\n  experiment: evaltest\n  log_artifacts: true\n"
        "evaluate:\n  num_prompts: 2\n  heldout_prompts: 1\n  max_new_tokens: 12\n  batch_size: 3\n" + extra
    )
    return proj


def _run_stage(proj: Path, tiny: Path, base_model_dir: Path, adapter=None, timeout=400):
    env = {**os.environ, "PYTHONPATH": f"{eval_helpers.ROOT}:{eval_helpers.ROOT / 'src'}", "BAIZE_PIPELINE_ID": "evaltest"}
    return subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--adapter", str(adapter or tiny / "adapter"), "--model",
         str(base_model_dir), "--data", str(tiny / "tokenized"), "--out", "reports/eval"],
        cwd=proj, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_stage_writes_metrics_samples_and_mlflow(tmp_path, tiny, base_model_dir, mlflow_uri):
    import mlflow

    from baize.tracking import ADAPTER_TAG, folder_sha256

    adapter = tmp_path / "adapter"
    import shutil

    shutil.copytree(tiny / "adapter", adapter)
    # Real "train" runs to link to, tagged with the digest of the adapter they wrote as the train stage tags
    # them (the adapter holds no run id): the one that wrote this adapter, and a newer one that wrote another.
    mlflow.set_tracking_uri(mlflow_uri)
    exp = mlflow.MlflowClient(mlflow_uri).create_experiment("evaltest", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp, run_name="train",
                          tags={"baize.stage": "train", ADAPTER_TAG: folder_sha256(adapter)}) as train_run:
        pass
    with mlflow.start_run(experiment_id=exp, run_name="train", tags={"baize.stage": "train", ADAPTER_TAG: "0" * 64}):
        pass

    proj = _project(tmp_path, tiny, base_model_dir)
    res = _run_stage(proj, tiny, base_model_dir, adapter)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((proj / "reports/eval/report.json").read_text())
    assert metrics["perplexity"]["adapter"] < metrics["perplexity"]["base"]
    # The headline for `dvc exp show`; the seconds only in the untracked run.json.
    headline = {
        "ppl0": metrics["perplexity"]["base"], "ppl1": metrics["perplexity"]["adapter"],
        "stop0": metrics["generation"]["base"]["stop_rate"], "stop1": metrics["generation"]["adapter"]["stop_rate"],
        "leak1": metrics["generation"]["adapter"]["role_leak_rate"],
    }
    assert json.loads((proj / "reports/eval/metrics.json").read_text()) == {k: round(v, 3) for k, v in headline.items()}
    assert "wall_s" not in metrics and json.loads((proj / "reports/eval/run.json").read_text())["wall_s"] > 0
    assert set(metrics["generation"]) == {"base", "base_chat", "adapter"}  # no v2 adapter given: no v2 row
    assert metrics["generation"]["adapter"]["count"] == 3
    samples = [json.loads(line) for line in (proj / "reports/eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and samples[-1]["source"] == "val"
    assert {"text", "finish_reason", "role_leak"} <= set(samples[0]["adapter"]) and "base" in samples[0]

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("evaltest").experiment_id], filter_string="tags.`baize.stage` = 'evaluate'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["baize.train_run_id"] == train_run.info.run_id
    assert run.data.metrics["perplexity.adapter"] == pytest.approx(metrics["perplexity"]["adapter"])
    assert "generation.adapter.stop_rate" in run.data.metrics
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="eval/samples.json",
                                                                dst_path=str(tmp_path / "dl"))).read_text())
    assert "adapter_text" in table["columns"] and len(table["data"]) == 3

    # Same seed, same params: the samples are reproduced exactly (the base/adapter comparison is fair).
    first = (proj / "reports/eval/samples.jsonl").read_text()
    res = _run_stage(proj, tiny, base_model_dir, adapter)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (proj / "reports/eval/samples.jsonl").read_text() == first


def test_stage_bad_inputs_one_line(tmp_path, tiny, base_model_dir, mlflow_uri):
    proj = _project(tmp_path, tiny, base_model_dir, "  top_p: 2\n")
    res = _run_stage(proj, tiny, base_model_dir, timeout=120)
    assert res.returncode == 2 and "evaluate.top_p" in res.stderr and "Traceback" not in res.stderr
    (proj / "params.yaml").write_text("tracking: {}\nevaluate: {}\n")
    res = _run_stage(proj, tiny, base_model_dir, adapter=tmp_path / "missing", timeout=120)
    assert res.returncode == 1 and "missing: adapter folder not found" in res.stderr and "Traceback" not in res.stderr
    assert not (proj / "reports").exists()


# --------------------------------------------------------------------------- judge


class _JudgeStub(BaseHTTPRequestHandler):
    calls: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        prompt = body["messages"][-1]["content"]
        text = "8 6\nAssistant 1 is more detailed." if "[System]" in prompt else "A reference answer."
        out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_judge_scores_relative_to_reference_and_caches(tmp_path, monkeypatch):
    import asyncio

    from baize import judge
    from baize.selfchat.journal import Journal
    from baize.selfchat.openai_backend import OpenAIBackend

    assert judge.parse_scores("8 6\nbecause") == (8.0, 6.0)
    assert judge.parse_scores("Scores: 7.5, 10") == (7.5, 10.0)
    assert judge.parse_scores("I cannot judge this.") is None

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-secret")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeStub)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    rows = [{"id": f"q{i}", "question": f"Question {i}?", "base": {"text": "b"}, "adapter": {"text": f"answer {i}"}}
            for i in range(3)]
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        for expected_requests in (6, 0):  # the second run is answered from the journal
            _JudgeStub.calls.clear()
            with Journal(tmp_path / "judge.jsonl") as journal:
                judged, summary = asyncio.run(
                    judge.judge_rows(OpenAIBackend(base_url=url, max_retries=0), journal, rows, model="judge-model")
                )
            assert len(_JudgeStub.calls) == expected_requests
            assert summary["relative_score_pct"] == pytest.approx(75.0)
            assert summary["judged"] == 3 and judged[0]["reference"] == "A reference answer."
    finally:
        httpd.shutdown()
        httpd.server_close()
    # The judge saw the reference first and the model's answer second.
    assert "[The Start of Assistant 1's Answer]\nb\n" in judge.judge_request("Q", "b", "a", model="m", max_tokens=9).messages[-1]["content"]


def test_lm_eval_missing_is_one_clear_line(base_model_dir):
    try:
        import lm_eval  # noqa: F401

        pytest.skip("lm-eval is installed")
    except ImportError:
        pass
    with pytest.raises(Exception, match="lm-evaluation-harness is not installed"):
        evaluation.run_lm_eval(base_model_dir, None, ["hellaswag"], 5)
