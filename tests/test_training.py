"""The train stage: loss over trained positions, outputs + one MLflow run, kill -9 resume, NaN stop, DDP.

The stage tests run `python -m stages.train` in a temporary project with a *tiny* random LLaMA (2 layers,
hidden 64) that uses the real SmolLM2 tokenizer, so each run takes seconds; the int8 path is the real
bitsandbytes one. Throughput and memory of the real 135M model are measured by benchmarks/train_throughput.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from baize import hardware, training
from baize.config import TrainParams
from baize.formats import render_training
from baize.tracking import folder_sha256
from baize.transcript import Turn

ROOT = Path(__file__).resolve().parents[1]

TOPICS = ["sorting a list in Python", "baking sourdough bread", "the causes of inflation", "learning to swim",
          "how vaccines work", "planning a trip to Japan", "writing a cover letter", "caring for a cat"]


def _transcripts(n: int) -> list[list[Turn]]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        turns = []
        for r in range(1 + i % 3):
            turns.append(Turn(role="human", text=f"Can you tell me more about {topic}? (question {r + 1})"))
            turns.append(Turn(role="ai", text=f"Sure. {topic.capitalize()} is a broad subject. " * (1 + (i + r) % 4)))
        out.append(turns)
    return out


def _tokenized(tokenizer, transcripts, max_length=160):
    """Rows as the tokenize stage writes them; loss on everything after the preamble's first line."""
    rows = []
    for i, turns in enumerate(transcripts):
        ids = tokenizer(render_training(turns), truncation=True, max_length=max_length)["input_ids"]
        labels = list(ids)
        labels[:8] = [-100] * 8
        rows.append({"id": f"t{i}", "input_ids": ids, "labels": labels, "length": len(ids)})
    return rows


@pytest.fixture(scope="session")
def tiny_project(base_model_dir, tmp_path_factory) -> Path:
    """models/base (tiny random LLaMA + real tokenizer) and data/tokenized/{train,val,tokenizer}."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("train-project")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "models/base", safe_serialization=True)
    tokenizer.save_pretrained(root / "models/base")
    tokenizer.save_pretrained(root / "data/tokenized/tokenizer")
    rows = _tokenized(tokenizer, _transcripts(40))
    Dataset.from_list(rows[:32]).save_to_disk(str(root / "data/tokenized/train"))
    Dataset.from_list(rows[32:]).save_to_disk(str(root / "data/tokenized/val"))
    return root


def _write_params(project: Path, **train) -> None:
    base = {"precision": "int8", "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3,
            "warmup_steps": 1, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "max_steps": 4}
    base.update(train)
    params = {"tracking": {"experiment": "baize-test", "log_artifacts": True}, "train": base}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
        BAIZE_PIPELINE_ID="test-train",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _run_stage(project: Path, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.train"], cwd=project, env=_env(project),
        capture_output=True, text=True, timeout=timeout,
    )


def _fresh(tiny_project: Path, tmp_path: Path) -> Path:
    """A private copy of the project's inputs (outputs of one test never leak into another)."""
    project = tmp_path / "p"
    (project / "models").mkdir(parents=True)
    (project / "data").mkdir()
    os.symlink(tiny_project / "models/base", project / "models/base")
    os.symlink(tiny_project / "data/tokenized", project / "data/tokenized")
    return project


def _stage_runs(project: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("baize-test")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`baize.stage` = 'train' and tags.`baize.kind` = 'stage'")
    return client, runs


# --------------------------------------------------------------------------- fast unit tests


def test_pad_batch_pads_to_longest_with_ignored_labels():
    batch = training.pad_batch(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert training.pad_batch([{"input_ids": [1], "labels": [1]}], 0, pad_to=4)["input_ids"].shape == (1, 4)


def test_trained_positions_are_shifted_labels():
    labels = torch.tensor([[-100, -100, 3, 4, -100]])
    # position t predicts token t+1: positions 1 and 2 are trained
    assert training.trained_positions(labels).tolist() == [[False, True, True, False, False]]


def test_fingerprint_changes_with_params_and_data_and_stale_runs_are_removed(tmp_path):
    p = TrainParams()
    fp = training.run_fingerprint(p, {"train": "a", "val": "b"}, "w")
    assert fp == training.run_fingerprint(TrainParams(), {"train": "a", "val": "b"}, "w")
    assert fp != training.run_fingerprint(p.model_copy(update={"learning_rate": 1e-3}), {"train": "a", "val": "b"}, "w")
    assert fp != training.run_fingerprint(p, {"train": "c", "val": "b"}, "w")
    assert fp != training.run_fingerprint(p, {"train": "a", "val": "b"}, "other-base")
    (tmp_path / fp / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "0123456789abcdef" / "checkpoint-8").mkdir(parents=True)
    training.remove_stale_runs(tmp_path, keep=fp)
    assert [c.name for c in tmp_path.iterdir()] == [fp]


def test_last_complete_checkpoint_skips_a_save_cut_short(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4").mkdir()  # killed before trainer_state.json was written
    assert training.last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert training.last_complete_checkpoint(tmp_path / "checkpoint-4") is None


@pytest.mark.slow
def test_loss_over_trained_positions_equals_the_full_logits_loss(tiny_project):
    """Projecting only the trained positions onto the vocabulary gives the same loss and gradients."""
    from transformers import TrainingArguments

    model = training.add_lora(training.load_base_model(tiny_project / "models/base", "fp32"), TrainParams(lora_dropout=0.0))
    rows = _tokenized(training.load_tokenizer(tiny_project / "data/tokenized", tiny_project), _transcripts(3))
    batch = training.pad_batch(rows, pad_token_id=0)
    trainer = training.BaizeTrainer(model=model, args=TrainingArguments(str(tiny_project / "unused"), use_cpu=True, report_to="none"))
    ours = trainer.compute_loss(model, batch)
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    reference = model(**batch).loss  # transformers' loss over the full [batch, seq, vocab] logits
    reference.backward()
    assert torch.allclose(ours, reference, atol=1e-5)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_split_by_tokens_keeps_every_row_once_within_the_budget():
    lengths = [50, 12, 30, 49, 7]
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    batch = training.pad_batch(rows, pad_token_id=0)
    assert training.split_by_tokens(batch, 0) == [batch]  # no budget
    assert training.split_by_tokens(batch, 5 * 50) == [batch]  # fits
    chunks = training.split_by_tokens(batch, 100)
    assert len(chunks) > 1
    seen = []
    for chunk in chunks:
        rows_, width = chunk["input_ids"].shape
        assert rows_ * width <= 100
        assert int(chunk["attention_mask"].sum(dim=1).max()) == width  # re-padded to its own longest row
        for ids, mask, labels in zip(chunk["input_ids"], chunk["attention_mask"], chunk["labels"]):
            n = int(mask.sum())
            assert ids[:n].tolist() == list(range(1, n + 1)) and labels[:n].tolist() == ids[:n].tolist()
            assert (labels[n:] == training.IGNORE).all()
            seen.append(n)
    assert sorted(seen) == sorted(lengths)
    # A row longer than the budget is a chunk of its own; nothing is cut.
    assert sorted(int(c["attention_mask"].sum()) for c in training.split_by_tokens(batch, 10)) == sorted(lengths)


@pytest.mark.slow
def test_token_budget_chunks_give_the_same_step_as_the_whole_micro_batch(tiny_project, tmp_path):
    """A micro-batch over `max_batch_tokens` runs in chunks; summed, their gradients and loss are the same."""
    rows = _tokenized(training.load_tokenizer(tiny_project / "data/tokenized", tiny_project), _transcripts(6))
    batch = training.pad_batch(rows, pad_token_id=0)
    num_items = torch.tensor(int(training.trained_positions(batch["labels"]).sum()) * 2)  # as if accumulating 2
    results = []
    for budget in (0, batch["input_ids"].shape[1] * 2):
        torch.manual_seed(0)
        params = TrainParams(lora_dropout=0.0, mixed_precision="no", max_batch_tokens=budget)
        model = training.add_lora(training.load_base_model(tiny_project / "models/base", "fp32"), params)
        trainer = training.BaizeTrainer(
            model=model, args=training.training_arguments(params, tmp_path / f"b{budget}", has_eval=False),
            max_batch_tokens=budget,
        )
        assert len(training.split_by_tokens(batch, budget)) == (1 if budget == 0 else 3)
        loss = trainer.training_step(trainer.model, dict(batch), num_items)
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert torch.allclose(whole, chunked, atol=1e-5)
    for a, b in zip(whole_grads, chunked_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_warmup_never_trains_a_step_at_learning_rate_zero():
    # transformers' "linear" schedule: step 0 gets 0 / warmup_steps = 0, a wasted step (all of it at warmup_steps 1).
    assert [training.warmup_linear_factor(s, 1, 4) for s in range(4)] == pytest.approx([1 / 2, 1, 2 / 3, 1 / 3])
    assert [training.warmup_linear_factor(s, 3, 5) for s in range(5)] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1, 1 / 2])
    assert [training.warmup_linear_factor(s, 0, 2) for s in range(2)] == pytest.approx([1, 1 / 2])  # as transformers'
    assert training.warmup_linear_factor(10, 2, 10) == 0.0


def test_mixed_precision_auto_resolves_to_what_the_machine_computes():
    assert hardware.resolve_mixed_precision("no") == "no"
    assert hardware.resolve_mixed_precision("bf16") == "bf16"
    assert hardware.resolve_mixed_precision("auto") in ("bf16", "fp16", "no")
    if not torch.cuda.is_available():
        assert hardware.resolve_mixed_precision("auto") != "fp16"


@pytest.mark.slow
def test_int8_base_stores_embeddings_in_bf16_and_keeps_the_residual_stream_fp32(tiny_project):
    model_dir = tiny_project / "models/base"
    for mixed in ("no", "bf16"):  # with fp32 compute too: only the storage is bf16
        model = training.load_base_model(model_dir, "int8", mixed_precision=mixed)
        embeddings = model.get_input_embeddings()
        assert embeddings.weight.dtype == torch.bfloat16
        assert model.get_output_embeddings().weight is embeddings.weight  # tied: lm_head is stored once, in bf16
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
        assert embeddings(torch.tensor([[1, 2, 3]])).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed == "bf16"):
            out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
        assert torch.isfinite(out.loss)
        if mixed == "no":
            assert out.logits.dtype == torch.float32


@pytest.mark.slow
def test_frozen_int8_matmul_is_bitsandbytes_bit_for_bit_and_keeps_no_input(tiny_project):
    """The CPU training path of the int8 linears (`_FrozenInt8Matmul`): the same loss and LoRA gradients as
    bitsandbytes' own path to the last bit, without holding each linear's input until the backward pass."""
    import gc
    import weakref

    from bitsandbytes.nn import Linear8bitLt

    model = training.add_lora(training.load_base_model(tiny_project / "models/base", "int8"), TrainParams(lora_dropout=0.0))
    model.train()
    linears = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    assert linears and all("forward" in vars(m) for m in linears)  # installed on every int8 linear
    rows = _tokenized(training.load_tokenizer(tiny_project / "data/tokenized", tiny_project), _transcripts(3))
    batch = training.pad_batch(rows, pad_token_id=0)
    model(**batch)  # the first call sets up bitsandbytes' state (it runs bitsandbytes' path)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours = loss_and_grads()
    x = torch.randn(2, 5, linears[0].in_features, requires_grad=True)
    h = x * 2.0
    kept = weakref.ref(h)
    out = linears[0](h)
    del h
    gc.collect()
    assert kept() is None  # only the int8 weight is kept for the backward
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

    for m in linears:
        del m.forward  # bitsandbytes' own forward (MatMul8bitFp on the CPU) again
    h = x * 2.0
    kept = weakref.ref(h)
    out = linears[0](h)  # the graph (and whatever it holds) lives as long as its output
    del h
    gc.collect()
    assert kept() is not None  # what it costs: bitsandbytes keeps every linear's input
    theirs = loss_and_grads()
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))


def test_lm_head_computes_fp32_logits_from_its_bf16_stored_weight():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.data = head.weight.data.bfloat16()
    training.install_head(_Wrapper(head))
    hidden = torch.randn(3, 5, 16)
    logits = head(hidden)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(hidden, head.weight.float()))
    with training.hidden_only(head):
        assert head(hidden) is hidden
    assert not head.hidden_only


class _Wrapper(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_cross_entropy_equals_the_whole_logits_loss_and_gradients(weight_dtype):
    """The fused lm_head + cross-entropy over chunks of positions: the same summed loss and the same gradients
    (of the hidden states and, when it is trained, of the weight) as fp32 logits of every position at once."""
    torch.manual_seed(0)
    weight = torch.randn(300, 24).to(weight_dtype)
    hidden = torch.randn(70, 24, requires_grad=True)
    targets = torch.randint(0, 300, (70,))
    reference = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden, weight.float()), targets, reduction="sum"
    )
    (ref_grad,) = torch.autograd.grad(reference / 13, hidden)
    # chunks of one row, uneven chunks, one chunk, fewer rows than a chunk; weight slices uneven, whole
    for rows, vocab_rows in ((1, 64), (16, 7), (70, 300), (512, 8192)):
        loss = training.head_cross_entropy(hidden, weight, targets, rows=rows, vocab_rows=vocab_rows)
        (grad,) = torch.autograd.grad(loss / 13, hidden)  # normalized after, as compute_loss does
        assert torch.allclose(loss, reference, rtol=1e-5)
        assert torch.allclose(grad, ref_grad, atol=1e-6)
    trained = weight.float().requires_grad_()
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, trained), targets, reduction="sum")
    ref_grads = torch.autograd.grad(reference, [hidden, trained])
    grads = torch.autograd.grad(training.head_cross_entropy(hidden, trained, targets, rows=16, vocab_rows=64),
                                [hidden, trained])
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(training.head_cross_entropy(hidden, weight, targets, rows=16), reference, rtol=1e-5)
    empty = hidden[:0]
    assert training.head_cross_entropy(empty, weight, targets[:0]).item() == 0.0


@pytest.mark.slow
def test_int8_base_as_trained_with_fp32_compute_is_at_most_035x_the_fp32_footprint(tmp_path):
    """Issue 15: the int8 base as the train stage holds it, without bf16 compute, <= 0.35x its fp32 footprint. A
    random LLaMA with SmolLM2-135M's proportions (30 layers, the same ratios of vocabulary, hidden, MLP and kv
    sizes, tied embeddings), scaled down 8x in width so the test takes seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=6144, hidden_size=72, intermediate_size=192, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=512, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    fp32 = LlamaForCausalLM(config)
    fp32.save_pretrained(tmp_path, safe_serialization=True)
    int8 = training.load_base_model(tmp_path, "int8", mixed_precision="no")
    ratio = int8.get_memory_footprint() / fp32.get_memory_footprint()
    assert ratio <= 0.35, ratio


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stage_writes_adapter_metrics_plots_and_one_mlflow_run(tiny_project, tmp_path):
    project = _fresh(tiny_project, tmp_path)
    _write_params(project, max_steps=4)
    proc = _run_stage(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What a user sees: a step bar with the loss, not the Trainer's raw dicts, nor library deprecation noise.
    assert "train: 100%" in proc.stderr and "loss=" in proc.stderr, proc.stderr[-2000:]
    assert "{'loss'" not in proc.stdout + proc.stderr and "is_gradient_checkpointing" not in proc.stderr
    assert "integer column" not in proc.stderr  # MLflow's schema hint about token ids (from_huggingface and log_input)
    assert "train: val loss:" in proc.stderr  # the val passes (the base's loss first) say so too

    adapter = project / "models/adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "baize_adapter.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all("lora_" in k for k in keys)  # only the adapter, not the base weights
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    # No load-time flag (HF_HUB_OFFLINE set or not) in the saved tokenizer: the adapter is the same in any environment.
    assert "local_files_only" not in json.loads((adapter / "tokenizer_config.json").read_text())
    # Sorted, not in PEFT's set order (which follows the process's hash seed): the same adapter folder every run.
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])

    metrics = json.loads((project / "reports/train/report.json").read_text())
    timing = json.loads((project / "reports/train/run.json").read_text())  # untracked: differs on every run
    assert metrics["steps"] == 4 and timing["resumed_from_step"] == 0
    assert metrics["effective_batch_size"] == 8 and metrics["trained_tokens"] > 0
    for key in ("train_loss", "eval_loss", "eval_perplexity", "base_eval_perplexity"):
        assert metrics[key] is not None and metrics[key] > 0, key
    for key in ("trained_tokens_per_s", "peak_rss_mb", "train_runtime_s"):
        assert timing[key] > 0 and key not in metrics, key
    assert json.loads((project / "reports/train/metrics.json").read_text()) == {
        "loss": round(metrics["train_loss"], 3)}  # the val figure is evaluate's ppl
    with (project / "reports/train/steps.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and r["learning_rate"] for r in rows)
    # warmup_steps: 1 warms up in one step that trains (transformers' own schedule gives it learning rate 0).
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([0.0005, 0.001, 0.002 / 3, 0.001 / 3])
    assert [r["step"] for r in rows if r["eval_loss"]] == ["2", "4"]
    assert not any((project / "models/checkpoints").iterdir())  # done: nothing left to resume

    client, runs = _stage_runs(project)
    assert len(runs) == 1
    run = runs[0]
    meta = json.loads((adapter / "baize_adapter.json").read_text())
    # No run id in the adapter (a DVC output): the run carries the adapter's digest instead.
    assert not any("mlflow" in key for key in meta)
    assert run.data.tags["baize.adapter.sha256"] == folder_sha256(adapter)
    assert meta["base_model_sha256"] == training.base_model_sha256(project / "models/base")
    assert meta["params"]["max_steps"] == 4
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["train.learning_rate"] == "0.001"
    assert any(k.startswith("system/") for k in run.data.metrics)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"tokenized-train", "tokenized-val"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_mid_run_then_rerun_resumes_and_finishes(tiny_project, tmp_path):
    project = _fresh(tiny_project, tmp_path)
    _write_params(project, max_steps=30, save_steps=3, eval_steps=100)
    ckpts = project / "models/checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=_env(project),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if list(ckpts.glob("*/checkpoint-6/trainer_state.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (project / "models/adapter").exists()
    saved = training.last_complete_checkpoint(next(ckpts.iterdir()))
    step_at_kill = json.loads((saved / "trainer_state.json").read_text())["global_step"]
    assert 6 <= step_at_kill < 30

    done = _run_stage(project, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((project / "reports/train/run.json").read_text())["resumed_from_step"] == step_at_kill
    # Said at the start, before the model is even loaded; and the base model's val loss is still reported.
    assert f"train: resuming from step {step_at_kill} (checkpoint models/checkpoints/" in done.stderr
    report = json.loads((project / "reports/train/report.json").read_text())
    assert isinstance(report["base_eval_loss"], float) and report["base_eval_perplexity"] > 1
    assert json.loads((project / "reports/train/report.json").read_text())["steps"] == 30
    with (project / "reports/train/steps.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(1, 31))  # the whole run, once each
    _, runs = _stage_runs(project)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1  # the killed run never finished; the resumed one did


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stale_checkpoint_of_other_params_is_not_resumed(tiny_project, tmp_path):
    project = _fresh(tiny_project, tmp_path)
    stale = project / "models/checkpoints/0123456789abcdef/checkpoint-2"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text('{"global_step": 2}')
    _write_params(project, max_steps=2)
    proc = _run_stage(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((project / "reports/train/run.json").read_text())["resumed_from_step"] == 0
    assert not stale.parent.exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_nan_loss_stops_with_a_clear_message(tiny_project, tmp_path):
    """A base whose final norm holds a NaN (a corrupted download, an overflow) makes every loss NaN."""
    from transformers import LlamaForCausalLM

    project = _fresh(tiny_project, tmp_path)
    os.unlink(project / "models/base")
    model = LlamaForCausalLM.from_pretrained(tiny_project / "models/base")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(project / "models/base", safe_serialization=True)
    training.load_tokenizer(tiny_project / "data/tokenized", tiny_project).save_pretrained(project / "models/base")
    _write_params(project, precision="fp32", max_steps=4)
    proc = _run_stage(project)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training loss became nan at step 1") and "train.learning_rate" in last, last
    assert "Traceback" not in proc.stderr
    assert not (project / "models/adapter").exists()
    _, runs = _stage_runs(project)
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize(
    ("train", "needle"),
    [({"lora_r": 0}, "train.lora_r"), ({"learning_rate": "fast"}, "train.learning_rate"), ({"lora_rank": 8}, "lora_rank")],
)
def test_bad_params_exit_2_before_any_work(tmp_path, train, needle):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {}, "train": train}), encoding="utf-8")
    proc = _run_stage(tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_ddp_on_cpu(tiny_project, tmp_path):
    """`num_processes: 2` re-runs the stage under `accelerate launch` (gloo DDP); rank 0 alone writes outputs."""
    project = _fresh(tiny_project, tmp_path)
    # A token budget below every micro-batch: each rank runs chunks, and only its last chunk all-reduces.
    _write_params(project, num_processes=2, max_steps=2, batch_size=4, micro_batch_size=2, max_batch_tokens=40)
    proc = _run_stage(project, timeout=220)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "accelerate.commands.launch --num_processes 2" in proc.stderr
    metrics = json.loads((project / "reports/train/report.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["effective_batch_size"] == 4 and metrics["steps"] == 2
    assert metrics["mixed_precision"] == hardware.resolve_mixed_precision("auto")
    assert f"--mixed_precision {metrics['mixed_precision']}" in proc.stderr
    # The counters were reduced on the process group's device (gloo: the CPU; NCCL would be cuda:<rank>), and
    # summed over both ranks: every label token of the two micro-batches per step.
    run = json.loads((project / "reports/train/run.json").read_text())
    assert run["device"].split(":")[0] == "cpu" and run["dtype"] == "int8"  # accelerate names it cpu:<rank>
    assert metrics["trained_tokens"] > 0
    assert (project / "models/adapter/adapter_model.safetensors").is_file()
    _, runs = _stage_runs(project)
    assert len(runs) == 1


class _FakeSaver:
    """Stands in for the PEFT model / tokenizer: save_pretrained writes one file that says which one it is."""

    def __init__(self, tag: str):
        self.tag = tag

    def save_pretrained(self, path, **_):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_config.json").write_text("{}")
        (Path(path) / "adapter_model.safetensors").write_text(self.tag)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_save_adapter_never_leaves_no_adapter(tmp_path, monkeypatch, exchange):
    """A crash while the new adapter replaces the old one leaves a whole adapter (the old one, or the new one), and
    the next save puts everything right. The old code deleted the old adapter before renaming the new one in."""
    out = tmp_path / "models/adapter"

    def save(tag):
        training.save_adapter(_FakeSaver(tag), _FakeSaver(tag), out, {"v": tag})

    def adapters():
        return {p.name: (p / "adapter_model.safetensors").read_text() for p in out.parent.iterdir()
                if (p / "adapter_model.safetensors").is_file() and (p / training.ADAPTER_META).is_file()}

    if not exchange:
        monkeypatch.setattr(training, "_exchange", lambda a, b: False)
    save("v1")
    assert adapters() == {"adapter": "v1"}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def crash_on_swap(src, dst):
        if str(src).endswith("adapter.tmp"):  # the new adapter going into place
            raise OSError("simulated crash")
        return real_replace(src, dst)

    def crash_on_cleanup(path, *a, **k):
        old = Path(path) / "adapter_model.safetensors"
        if old.is_file() and old.read_text() == "v1":  # after the exchange: the old adapter is about to be deleted
            raise OSError("simulated crash")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(training.os, "replace", crash_on_swap)
    monkeypatch.setattr(training.shutil, "rmtree", crash_on_cleanup)
    with pytest.raises(OSError, match="simulated crash"):
        save("v2")
    monkeypatch.setattr(training.os, "replace", real_replace)
    monkeypatch.setattr(training.shutil, "rmtree", real_rmtree)
    survived = adapters()
    assert "v1" in survived.values() or survived.get("adapter") == "v2"  # a whole adapter is there
    if exchange:
        assert survived["adapter"] == "v2"  # one atomic step: the new one is in place
    else:
        assert survived == {"adapter.old": "v1", "adapter.tmp": "v2"}  # the old one, renamed aside
    save("v3")
    assert adapters() == {"adapter": "v3"} and sorted(p.name for p in out.parent.iterdir()) == ["adapter"]


def test_logging_the_token_datasets_prints_no_integer_column_hint(tmp_path, mlflow_uri):
    """mlflow.log_input infers the schema again: without the filter around it MLflow's hint is printed per split."""
    import warnings

    import mlflow
    from datasets import Dataset

    from stages.train import _log_inputs

    for split in ("train", "val"):
        Dataset.from_dict({"id": ["a", "b"], "input_ids": [[1, 2, 3], [4, 5]], "labels": [[1, 2, 3], [-100, 5]],
                           "length": [3, 2]}).save_to_disk(
            str(tmp_path / "data" / split))
    mlflow.set_tracking_uri(mlflow_uri)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run() as run:
        warnings.simplefilter("always")
        _log_inputs(tmp_path / "data", {"train": "a" * 64, "val": "b" * 64})
    assert not [w for w in caught if "integer column" in str(w.message)]
    logged = mlflow.MlflowClient(mlflow_uri).get_run(run.info.run_id).inputs.dataset_inputs
    assert {d.dataset.name for d in logged} == {"tokenized-train", "tokenized-val"}
