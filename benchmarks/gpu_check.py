"""The paper's setting on a GPU: the pipeline's GPU paths end to end, and LLaMA-7B training measured.

    python benchmarks/gpu_check.py --tokenizer models/base [--out DIR]     # a CUDA machine, under 8 minutes
    python benchmarks/gpu_check.py --tokenizer models/base --cpu-smoke     # the small paths on the CPU (~30 s)

No network and no weights: only a tokenizer folder (`models/base`, or any folder with a tokenizer and a chat
template). Models are randomly initialised from a config, which is all the code paths and the speed need.

1. Code paths, on SmolLM2-135M's architecture (LLaMA, 30 layers; 2 layers under --cpu-smoke): int8 LoRA steps
   (bitsandbytes; a clear `skip` row and bf16 steps instead where it is not installed), resume from a checkpoint
   (the newest one deleted, the run continues from the one before), perplexity of base and adapter, the local
   backend (continuous batching, adapter merged) and `baize export`. Each on the device `baize.hardware` picks.
2. LLaMA-7B's shape (config only; GPU only, skipped under --cpu-smoke, where a tiny LLaMA stands in so the code
   cannot rot): trained tokens/s, peak GPU memory and model FLOPs utilisation against the GPU's bf16 peak, for an
   int8 and a bf16 frozen base with the paper's LoRA (r 8 on q,k,v,gate,up,down; micro-batch 4, bf16 autocast,
   samples of the released data's lengths padded per batch); and from the tokens/s the time of one epoch on the
   paper's data beside the paper's figure (about 9 h on one A100-80G, 26 GB).

Model FLOPs per trained token: 4 N (forward, and the backward's input gradients through the frozen weights: no
weight gradients but LoRA's, which are negligible) + 12 L d T (attention, fwd + bwd), N the parameters of the
linear layers, L layers, d the hidden size, T the sequence length (PaLM's convention, less the frozen weights'
gradients).

Writes gpu_check.md and gpu_check.json under --out (default: $OUT, else reports/gpu_check) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)

# Dense bf16 tensor-core peaks (vendor data sheets, TFLOP/s, no sparsity); --peak-tflops for another GPU.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
                    "RTX 6000 Ada": 365.0}

# The paper's run (README of the reference code): 7B, one epoch, about 9 hours on one A100-80G, 26 GB.
PAPER_DIALOGUES = 100_000
PAPER_HOURS = 9.0
PAPER_MEMORY_GB = 26.0
# Token lengths of released Baize v1 dialogues (cut to 512): Table 2's averages (3.9 rounds, AI turns of ~36
# tokens) with a human turn of ~20 tokens and the role markers give about 256 tokens; this spread keeps that mean
# (an estimate: the released files are not on this machine).
RELEASED_LENGTHS = [64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512]
TOKENS_PER_DIALOGUE = sum(RELEASED_LENGTHS) / len(RELEASED_LENGTHS)


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def row(part: str, status: str, **fields) -> dict:
    return {"part": part, "status": status, **fields}


# --------------------------------------------------------------------------- 1. code paths on the small model


def make_model(dst: Path, tokenizer_dir: Path, shape: dict, seed: int = 0) -> Path:
    """A randomly initialised model of `shape` with the tokenizer (and its chat template) of `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = LlamaConfig(**{**shape, "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))
    return dst


def make_data(dst: Path, vocab: int, n_train: int, n_val: int, seed: int = 0, max_len: int = 512) -> Path:
    """Tokenized train/val splits as the tokenize stage writes them (input_ids, labels, length): random tokens of
    the released lengths, the first third of each sample masked as a prompt."""
    from datasets import Dataset

    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for _ in range(n):
            length = min(rng.choice(RELEASED_LENGTHS), max_len)
            ids = [rng.randrange(10, vocab) for _ in range(length)]
            labels = [-100] * (length // 3) + ids[length // 3 :]
            rows.append({"input_ids": ids, "labels": labels, "length": length})
        Dataset.from_list(rows).save_to_disk(str(dst / split))
    return dst


def code_paths(work: Path, tokenizer_dir: Path, smoke: bool) -> list[dict]:
    from baize import evaluation, hardware, inference, training
    from baize.config import TrainParams

    rows: list[dict] = []
    started = time.perf_counter()
    shape = {**SMOLLM2_135M, **({"num_hidden_layers": 2} if smoke else {})}
    model_dir = make_model(work / "smollm2-shape", tokenizer_dir, shape)
    placed = hardware.placement("auto", model_dir)
    rows.append(row("model: SmolLM2-135M shape, random weights", "ok", device=placed.device, dtype=placed.dtype,
                    seconds=time.perf_counter() - started,
                    detail=f"{shape['num_hidden_layers']} layers, from a config + {tokenizer_dir}"))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    data_dir = make_data(work / "tokenized", vocab, n_train=16 if smoke else 64, n_val=4 if smoke else 16,
                         max_len=128 if smoke else 512)

    int8 = has_bitsandbytes()
    if not int8:
        rows.append(row("int8 LoRA steps", "skip", detail="bitsandbytes is not installed: the bf16 frozen base instead"))
    precision = "int8" if int8 else ("bf16" if hardware.device_type() != "cpu" else "fp32")
    params = TrainParams(precision=precision, batch_size=4, micro_batch_size=4, max_steps=4, save_steps=2,
                         eval_steps=2, warmup_steps=0, learning_rate=1e-3, logging_steps=1)
    checkpoints = work / "checkpoints"
    t = time.perf_counter()
    result = training.train(params, data_dir=data_dir, model_dir=model_dir, checkpoints_dir=checkpoints)
    m = result.metrics
    ok = m["steps"] == 4 and m["trained_tokens"] > 0 and m["eval_loss"] is not None
    rows.append(row(f"{precision} LoRA steps (Trainer)", "ok" if ok else "FAIL", device=m["device"], dtype=m["dtype"],
                    seconds=time.perf_counter() - t, tokens_per_s=m["trained_tokens_per_s"],
                    detail=f"{m['steps']} steps, eval loss {m['eval_loss']:.3f}, mixed precision {m['mixed_precision']}"))
    adapter_dir = work / "adapter"
    training.save_adapter(result.model, result.tokenizer, adapter_dir, {"params": params.model_dump(mode="json")})
    del result

    # Resume: the newest checkpoint is gone (a kill -9 mid-save); the run goes on from the one before.
    run_dir = next(p for p in checkpoints.iterdir() if p.is_dir())
    shutil.rmtree(run_dir / "checkpoint-4")
    t = time.perf_counter()
    resumed = training.train(params, data_dir=data_dir, model_dir=model_dir, checkpoints_dir=checkpoints).metrics
    ok = resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    rows.append(row("resume from a checkpoint", "ok" if ok else "FAIL", device=resumed["device"],
                    dtype=resumed["dtype"], seconds=time.perf_counter() - t,
                    detail=f"resumed from step {resumed['resumed_from_step']}, finished at step {resumed['steps']}"))

    t = time.perf_counter()
    model, tok = inference.load_model(model_dir, adapter_dir, dtype="auto")
    from datasets import load_from_disk

    val = load_from_disk(str(data_dir / "val"))
    ppl = evaluation.compare_perplexity(model, [val[i] for i in range(len(val))], batch_size=4,
                                        pad_token_id=tok.pad_token_id)
    device = str(hardware.input_device(model))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    del model
    ok = all(isinstance(ppl[k], float) and ppl[k] > 0 for k in ("base", "adapter"))
    rows.append(row("evaluation: perplexity base vs adapter", "ok" if ok else "FAIL", device=device, dtype=dtype,
                    seconds=time.perf_counter() - t, detail=f"base {ppl['base']:.1f}, adapter {ppl['adapter']:.1f}"))

    from baize.selfchat.backend import ChatRequest
    from baize.selfchat.local_backend import LocalBackend

    t = time.perf_counter()
    n, new = (4, 8) if smoke else (16, 64)
    with LocalBackend(model_dir, adapter=adapter_dir, dtype="auto", batch_size=n, seed=1) as backend:
        async def ask():
            requests = [ChatRequest(messages=[{"role": "user", "content": f"Question {i}: why is the sky blue?"}],
                                    model="check", temperature=1.0 if i % 2 else 0.0, max_tokens=new, seed=i)
                        for i in range(n)]
            return await asyncio.gather(*(backend.complete(r) for r in requests))

        replies = asyncio.run(ask())
        tokens = sum(r.completion_tokens for r in replies)
        rows.append(row("local backend (continuous batching, adapter merged)", "ok" if tokens > 0 else "FAIL",
                        device=str(backend.device), dtype=backend.dtype, seconds=time.perf_counter() - t,
                        tokens_per_s=tokens / (time.perf_counter() - t),
                        detail=f"{n} requests, {tokens} tokens generated"))

    from baize.export import export_merged

    t = time.perf_counter()
    info = export_merged(model_dir, adapter_dir, work / "merged", dtype="bfloat16", force=True)
    ok = (work / "merged" / "config.json").is_file() and info["num_parameters"] > 0
    rows.append(row("export (adapter merged, bf16 folder)", "ok" if ok else "FAIL", device=hardware.placement().device,
                    dtype="bfloat16", seconds=time.perf_counter() - t, detail=f"{info['num_parameters']:,} parameters"))
    return rows


# --------------------------------------------------------------------------- 2. LLaMA-7B measured


def gpu_peak_tflops(override: float | None) -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", override
    name = torch.cuda.get_device_name(0)
    if override:
        return name, override
    for key, value in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return name, value
    return name, None


def linear_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and "lora_" not in str(type(m)))


def measure(shape: dict, precision: str, work: Path, *, steps: int, micro: int, peak_tflops: float | None,
            max_len: int) -> dict:
    """Trained tokens/s, peak memory and MFU of LoRA steps on a frozen base of `shape` in `precision`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from baize import hardware, training
    from baize.config import TrainParams

    part = f"{precision} base, LoRA r8 (L{shape['num_hidden_layers']} d{shape['hidden_size']})"
    if precision == "int8" and not has_bitsandbytes():
        return row(part, "skip", detail="bitsandbytes is not installed (pip install bitsandbytes)")
    dev = hardware.device()
    on_gpu = dev.type == "cuda"
    mixed = "bf16" if on_gpu or hardware.cpu_has_native_bf16() else "no"
    config = LlamaConfig(**shape)
    torch.manual_seed(0)

    def random_model(dtype):
        # Built in `dtype` directly on the device: a 7B model in fp32 first would need 27 GB more.
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(dev):
                return LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)

    if precision == "int8":  # through the pipeline's own loader: a saved folder, quantized at load time
        folder = work / f"shape-{shape['num_hidden_layers']}x{shape['hidden_size']}"
        if not (folder / "config.json").is_file():
            random_model(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
        if on_gpu:
            torch.cuda.empty_cache()
        model = training.load_base_model(folder, "int8", False, mixed)
    else:
        model = random_model(torch.bfloat16 if mixed == "bf16" else torch.float32)
        model.config.use_cache = False
    if on_gpu:  # from here: the frozen weights, LoRA, optimizer state and the steps' activations
        torch.cuda.reset_peak_memory_stats()
    n_linear = linear_params(model)
    model = training.add_lora(model, TrainParams())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = random.Random(0)
    lengths = [min(x, max_len) for x in RELEASED_LENGTHS]

    def step() -> tuple[int, int]:
        rows = sorted(rng.choice(lengths) for _ in range(micro))
        width = rows[-1]
        ids = torch.randint(10, config.vocab_size, (micro, width), device=dev)
        mask = torch.zeros((micro, width), dtype=torch.long, device=dev)
        for i, n in enumerate(rows):
            mask[i, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mixed == "bf16"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(rows), sum(n * n for n in rows)

    step()  # warm-up: kernels chosen, allocator filled
    if on_gpu:
        torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = weighted = 0
    for _ in range(steps):
        n, n2 = step()
        tokens, weighted = tokens + n, weighted + n2
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    tokens_per_s = tokens / seconds
    # Attention costs grow with each sample's length: its mean over the trained tokens (sum n^2 / sum n).
    mean_t = weighted / tokens
    flops_per_token = 4 * n_linear + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * mean_t
    mfu = tokens_per_s * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else training.peak_rss_mb() / 1024
    epoch_h = PAPER_DIALOGUES * TOKENS_PER_DIALOGUE / tokens_per_s / 3600
    del model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()
    return row(part, "ok", device=str(dev), dtype=precision, seconds=seconds, tokens_per_s=tokens_per_s,
               peak_gb=peak_gb, mfu=mfu, epoch_h=epoch_h,
               detail=f"{steps} steps of {micro} samples, autocast {mixed}, "
                      f"{'GPU memory' if on_gpu else 'process RSS'}")


# --------------------------------------------------------------------------- the table


COLUMNS = [("part", "part"), ("status", "status"), ("device", "device"), ("dtype", "dtype"), ("seconds", "s"),
           ("tokens_per_s", "tokens/s"), ("peak_gb", "peak GB"), ("mfu", "MFU"), ("epoch_h", "epoch h"),
           ("detail", "detail")]


def fmt(key: str, value) -> str:
    if value is None:
        return ""
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.1f}"
    return str(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(k, r.get(k)).replace("|", "/") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "base",
                        help="a folder with a tokenizer and chat template (default: models/base)")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else reports/gpu_check")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the small-model paths on the CPU (2 layers) and a tiny LLaMA for the measurement code")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per 7B row (default 10; smoke 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not listed")
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "reports" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        os.environ["BAIZE_DEVICE"] = "cpu"  # the smoke test checks the code, on any machine
    if not (args.tokenizer / "tokenizer_config.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer_config.json (run `dvc repro base_model`, or point "
                     "it at any model folder with a tokenizer)")
    import torch

    from baize import hardware

    gpu, peak = gpu_peak_tflops(args.peak_tflops)
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        try:
            rows += code_paths(work, args.tokenizer, args.cpu_smoke)
        except Exception as exc:  # one failed path is a row of the table, with its traceback beside it
            rows.append(row("code paths", "FAIL", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            (out / "gpu_check_error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        if args.cpu_smoke:
            shapes, steps, micro, max_len = [TINY_LLAMA], args.steps or 2, 2, 128
        elif hardware.device_type() == "cuda":
            shapes, steps, micro, max_len = [LLAMA_7B], args.steps or 10, 4, 512
        else:
            shapes, steps, micro, max_len = [], 0, 0, 0
            rows.append(row("LLaMA-7B measurement", "skip", detail="no CUDA device (run with --cpu-smoke on a CPU)"))
        for shape in shapes:
            for precision in ("int8", "bf16"):
                try:
                    rows.append(measure(shape, precision, work, steps=steps, micro=micro, peak_tflops=peak,
                                        max_len=max_len))
                except Exception as exc:
                    rows.append(row(f"{precision} base, LoRA r8", "FAIL",
                                    detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                    with (out / "gpu_check_error.txt").open("a", encoding="utf-8") as fh:
                        fh.write(traceback.format_exc())
    rows.append(row(f"paper: 7B on one A100-80G ({PAPER_DIALOGUES:,} dialogues)", "reference", device="A100-80G",
                    dtype="int8", peak_gb=PAPER_MEMORY_GB, epoch_h=PAPER_HOURS,
                    detail="reference finetune.py: every sample padded to 512, fp16"))
    head = (f"gpu_check on {gpu} (bf16 peak {peak or 'unknown'} TFLOP/s), torch {torch.__version__}, "
            f"{'--cpu-smoke, ' if args.cpu_smoke else ''}{time.perf_counter() - started:.0f} s; epoch h: "
            f"{PAPER_DIALOGUES:,} dialogues x {TOKENS_PER_DIALOGUE:.0f} tokens at the measured tokens/s")
    text = head + "\n\n" + table(rows) + "\n"
    (out / "gpu_check.md").write_text(text, encoding="utf-8")
    (out / "gpu_check.json").write_text(json.dumps({"gpu": gpu, "peak_tflops": peak, "rows": rows}, indent=2) + "\n",
                                        encoding="utf-8")
    print(text)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
