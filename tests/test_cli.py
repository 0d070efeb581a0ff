"""The `baize` console script: chat in a pseudo-terminal, export (+ transformers serve), import."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from baize.cli import main
from baize.transcript import read_jsonl

sys.path.insert(0, str(Path(__file__).parent))
import eval_helpers  # noqa: E402

BAIZE = str(Path(sys.executable).with_name("baize"))


@pytest.fixture(scope="module")
def tiny(base_model_dir) -> Path:
    return eval_helpers.tiny_adapter(base_model_dir)


# --------------------------------------------------------------------------- import


def test_import_hand_made_baize_json(tmp_path):
    src = tmp_path / "mine.json"
    src.write_text(json.dumps([
        {"topic": "tea", "input": "The conversation between human and AI assistant.\n[|Human|] Hi\n[|AI|] Hello!\n"
                                  "[|Human|] Tea?\n[|AI|] Green tea is nice.\n[|Human|] "},
        {"topic": "owls", "input": "The conversation between human and AI assistant.\n[|Human|] Owls?\n[|AI|] Birds.\n[|Human|] "},
    ]))
    out = tmp_path / "out" / "transcripts.jsonl"
    res = CliRunner().invoke(main, ["import", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "validate.input=" in res.output
    got = list(read_jsonl(out))
    assert [t.seed for t in got] == ["tea", "owls"]
    assert got[0].pairs() == [("Hi", "Hello!"), ("Tea?", "Green tea is nice.")]


def test_import_openai_jsonl(tmp_path):
    src = tmp_path / "ft.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "A"}]}) + "\n")
    out = tmp_path / "t.jsonl"
    res = CliRunner().invoke(main, ["import", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    (t,) = read_jsonl(out)
    assert t.pairs() == [("Q", "A")] and t.meta["system"] == "Be brief."


def test_import_released_fixtures(tmp_path, baize_fixtures):
    for name in ("english_records.json", "quora_ko_selfchat_300.json"):
        out = tmp_path / f"{name}.jsonl"
        res = CliRunner().invoke(main, ["import", str(baize_fixtures / name), "--out", str(out)])
        assert res.exit_code == 0, res.output
        records = json.loads((baize_fixtures / name).read_text(encoding="utf-8"))
        got = list(read_jsonl(out))
        assert len(got) == len(records) > 0
        assert all(t.turns and len(t.turns) % 2 == 0 for t in got)


@pytest.mark.parametrize(
    "content, suffix, expected",
    [
        ('[{"topic": "x", "input": "no markers"}]', ".json", "bad.json:1: record 0: 'input'"),
        ('[{"topic": "x",\n "input": 5}]', ".json", "bad.json:1: record 0: 'input' must be a string"),
        ('{"messages": [{"role": "user", "content": "Q"}]}\n{"messages": [\n', ".jsonl", "bad.jsonl:2: invalid or truncated JSON"),
        ("hello", ".txt", "cannot tell the format"),
    ],
)
def test_import_bad_input_is_one_line(tmp_path, content, suffix, expected):
    src = tmp_path / f"bad{suffix}"
    src.write_text(content)
    out = tmp_path / "t.jsonl"
    res = subprocess.run([BAIZE, "import", str(src), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_import_missing_file(tmp_path):
    res = CliRunner().invoke(main, ["import", str(tmp_path / "nope.json")])
    assert res.exit_code == 1 and "nope.json: no such file" in res.output


# --------------------------------------------------------------------------- chat


@pytest.mark.slow
def test_chat_answers_in_a_pseudo_terminal(tiny, base_model_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        BAIZE,
        ["chat", "--base", str(base_model_dir), "--adapter", str(tiny / "adapter"), "--max-new-tokens", "30",
         "--temperature", "0"],
        encoding="utf-8", timeout=180, env={**os.environ, "TERM": "dumb"},
    )
    try:
        child.expect("Human: ")
        child.sendline("Tell me about tea.")
        child.expect("Baize: ")
        # The trained adapter's answer, streamed, ending at its [|Human|] marker (which is never shown).
        child.expect(r"Here is a short answer about tea\.\r?\n")
        child.expect("Human: ")
        assert "[|Human|]" not in child.before and "[|AI|]" not in child.before
        child.sendline("Thanks!")
        child.expect("Baize: ")
        child.expect("Human: ")  # a second turn works with the history
        assert child.before.strip() and "[|Human|]" not in child.before and "[|AI|]" not in child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_chat_bad_adapter_one_line(tmp_path, base_model_dir):
    res = subprocess.run([BAIZE, "chat", "--base", str(base_model_dir), "--adapter", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, input="")
    assert res.returncode == 1 and "no adapter_config.json" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([BAIZE, "chat", "--base", str(base_model_dir), "--adapter", "runs:/0123456789abcdef/adapter"],
                         capture_output=True,
                         text=True, timeout=120, input="",
                         env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert res.returncode == 1 and "runs:/0123456789abcdef/adapter: cannot download" in res.stderr, res.stderr


@pytest.mark.slow
def test_chat_adapter_from_mlflow_uri(tmp_path, tiny, base_model_dir, mlflow_uri):
    import mlflow

    from baize.inference import resolve_adapter

    mlflow.set_tracking_uri(mlflow_uri)
    exp = mlflow.MlflowClient(mlflow_uri).create_experiment("cli", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(tiny / "adapter"), artifact_path="adapter")
    got = resolve_adapter(f"runs:/{run.info.run_id}/adapter", dst=tmp_path / "dl")
    assert (got / "adapter_model.safetensors").read_bytes() == (tiny / "adapter" / "adapter_model.safetensors").read_bytes()


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(tiny, base_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    res = subprocess.run([BAIZE, "export", "--base", str(base_model_dir), "--adapter", str(tiny / "adapter"),
                          "--out", str(out), "--dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_export_loads_and_generates(exported, tiny, base_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baize import evaluation, inference

    assert not list(exported.glob("adapter_*")) and list(exported.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(exported))
    assert "[|Human|]" in tok.chat_template
    model = model.float()  # bf16 matmuls are slow on CPU; the weights' values are what we check
    # The merged weights are the adapter's: same greedy answer as base + adapter (up to bf16 rounding).
    gens = inference.generate(model, tok, [inference.build_prompt("Tell me about tea.")], max_new_tokens=30,
                              temperature=0)
    assert gens[0].finish_reason == "stop" and "tea" in gens[0].text.lower()
    val = evaluation.load_split(tiny / "tokenized" / "val")
    rows = [val[i] for i in range(4)]
    peft_model, _ = inference.load_model(base_model_dir, tiny / "adapter")
    with evaluation.base_model_context(peft_model):
        base_ppl = evaluation.perplexity(peft_model, rows, pad_token_id=tok.pad_token_id)["perplexity"]
    merged_ppl = evaluation.perplexity(model, rows, pad_token_id=tok.pad_token_id)["perplexity"]
    assert merged_ppl < base_ppl
    meta = json.loads((exported / "baize_export.json").read_text())
    assert meta["stop_strings"] == ["[|Human|]", "[|AI|]"]


def test_export_refuses_existing_out(tmp_path, base_model_dir):
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(main, ["export", "--base", str(base_model_dir), "--adapter", str(tmp_path),
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "already exists" in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_export_answers_through_transformers_serve(exported):
    serve = Path(sys.executable).with_name("transformers")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import openai

    port = _free_port()
    proc = subprocess.Popen(
        [str(serve), "serve", str(exported), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {proc.stderr.read()[-2000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail("transformers serve did not start within 150 s")
                time.sleep(1)
        reply = client.chat.completions.create(
            model=str(exported), messages=[{"role": "user", "content": "Tell me about tea."}],
            max_tokens=30, temperature=0, stop=["[|Human|]", "[|AI|]"],
        )
        text = reply.choices[0].message.content
        assert "tea" in text.lower(), text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
