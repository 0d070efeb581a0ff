"""Training throughput and peak memory: our recipe vs the reference (alpaca-lora / Baize `finetune.py`) recipe and
vs TRL's SFTTrainer.

Same model (models/base or --model), same transcripts, int8 base for both, same micro-batch and gradient
accumulation (same effective batch), a few optimizer steps each:

- `reference`: the base loaded as alpaca-lora does (`from_pretrained(load_in_8bit)` + peft's k-bit preparation,
  nothing of ours), every sample padded to 512, loss on the whole text (pad excluded, as
  DataCollatorForLanguageModeling does), random order, stock Trainer loss over the full [batch, 512, vocab]
  logits, no gradient checkpointing,
  fp32 compute (Baize's `fp16=True` needs a GPU); `reference-bf16`: the same with bf16 autocast, the CPU's
  counterpart of that fp16 autocast and the same mixed precision as ours (the fair comparison where the CPU
  has native bf16);
- `ours`: the train stage (baize.training) with the `train:` section of the repository's params.yaml as it is
  (precision, LoRA, learning rate, `max_batch_tokens`, `mixed_precision`, `gradient_checkpointing`, ...); only
  the micro-batch, the accumulation and the steps come from this script's arguments (whose defaults are
  params.yaml's too). That is: length-grouped batches padded to their longest sample, AI-only labels (tokenize
  default), lm_head and cross-entropy only at trained positions and in chunks of them, a token budget per
  forward pass, the tied embeddings stored in bf16 on the int8 base. `ours-fp32` (mixed precision `no`),
  `ours-bf16`, `ours-gc` (gradient checkpointing) and `ours-no-budget` change one setting each,
  `ours-bnb-matmul` runs the int8 linears through bitsandbytes' own CPU training path (MatMul8bitFp, which
  keeps every linear's input) instead of ours (`training._FrozenInt8Matmul`), and
  `ours+key=value` any train param (quote strings YAML reads otherwise: `ours+mixed_precision="'no'"`);
- `trl`: TRL's `SFTTrainer` (pip install -e '.[bench]'), set up as TRL's documentation does LoRA on a quantized
  base: the model path with `quantization_config=BitsAndBytesConfig(load_in_8bit=True)` and `peft_config` (the
  same LoRA: r, alpha, dropout, target modules) given to the trainer; the same transcripts as a conversational
  `messages` dataset rendered by the Baize chat template (baize.chat_template) with `assistant_only_loss=True`
  (the same input_ids and labels as ours, checked per run and printed); the same micro-batch, accumulation,
  steps, learning rate, seed and autocast dtype as `ours` (params.yaml's; SFTConfig's own default is bf16=True). Otherwise SFTConfig's
  defaults, which include gradient checkpointing; `trl-no-gc` turns that off (as `ours` runs), and
  `trl+key=value` changes any SFTConfig field. TRL's speed and memory options on the CPU:
  - used: `padding_free=True`: each micro-batch is flattened into one row with per-sample position ids and no
    padding; TRL documents it for FlashAttention, but transformers 5 builds a block-diagonal mask from the
    position ids for sdpa/eager attention too (masking_utils.find_packed_sequence_indices), so on the CPU it is
    correct (no attention across samples) and no token is padding. Its own chunked (`fused_lm_head`) loss is
    TRL's default and on.
  - not used: `packing` (bfd): it makes a training row of several transcripts up to `max_length`, so a step no
    longer holds `micro-batch x accumulation` transcripts (not the same effective batch and steps) and packing
    by max_length can cut a transcript; padding-free gives the same no-padding rows without that.
    `use_liger_kernel`: Triton kernels, GPU only. `activation_offloading`: moves activations to the CPU, which on
    the CPU is where they already are. TRL's cast of the LoRA weights to bf16 on a quantized base (its QLoRA
    recipe) is not an option: it always happens. TRL warns that the chat template leaves the end-of-turn token
    out of the loss: a false positive (it looks for an added special token; Baize's stop marker `[|Human|]` is
    plain text inside the {% generation %} span, see tests/test_chat_template.py).

Each variant runs in its own subprocess so its peak RSS (ru_maxrss) is its own; torch's thread count is its
default (the physical cores) unless OMP_NUM_THREADS is set, the same for every variant. Throughput counts the real
(non-padding) tokens of the samples that went through a training step, per second, over the steps after the
first (warm-up) one. Also: int8 vs fp32 `get_memory_footprint()` of the base (issue 15's target: the int8 base as
trained at most 0.35x the fp32 one, with fp32 compute too).

    python benchmarks/train_throughput.py                 # models/base, synthetic self-chat transcripts
    python benchmarks/train_throughput.py --model DIR --steps 4 --variants reference,ours,ours-gc
    python benchmarks/train_throughput.py --variants ours,trl,trl-no-gc,trl+padding_free=false

CAUTION: the fp32 reference peaks near 10 GB RSS with SmolLM2-135M; variants run one after the other.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

WORDS = (
    "the a of to and in is it that for you with on as are this be can your or an by from at not have more "
    "use when will which if how one time people make also should help good like these each some may other "
    "about first need data model way work file list value question answer example code python sleep health "
    "money travel learn practice simple important different result change problem system process number"
).split()


def synthetic_transcripts(n: int, seed: int = 0):
    """Self-chat-like transcripts: 1-5 rounds, short questions, longer answers (lengths ~60-600 tokens)."""
    from baize.transcript import Turn

    rng = random.Random(seed)

    def sentence(lo, hi):
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        return " ".join(words).capitalize() + "."

    out = []
    for _ in range(n):
        turns = []
        for _ in range(rng.choice([1, 2, 2, 3, 3, 3, 4, 5])):
            turns.append(Turn(role="human", text=" ".join(sentence(5, 14) for _ in range(rng.randint(1, 2)))))
            turns.append(Turn(role="ai", text=" ".join(sentence(6, 18) for _ in range(rng.randint(1, 5)))))
        out.append(turns)
    return out


def fitting(tokenizer, transcripts, max_length: int):
    """Each transcript cut to the whole human/AI pairs whose rendered text fits in `max_length` tokens (what the
    tokenize stage keeps of a longer one, give or take the dangling marker's space), so that every variant, the
    `messages` dataset of `trl` included, trains on the same complete transcripts, none cut by a max_length."""
    from baize.formats import render_training

    out = []
    for turns in transcripts:
        while len(turns) > 2 and len(tokenizer(render_training(turns)).input_ids) > max_length:
            turns = turns[:-2]
        out.append(turns)
    return out


def build_rows(model_dir: Path, n: int, max_length: int = 512):
    from baize.formats import render_training
    from baize.tokenization import load_tokenizer, tokenize_texts

    tokenizer = load_tokenizer(model_dir)
    transcripts = fitting(tokenizer, synthetic_transcripts(n), max_length)
    texts = [render_training(t) for t in transcripts]
    cols = {loss: tokenize_texts(tokenizer, texts, loss, max_length) for loss in ("ai_only", "all")}
    return [
        {"input_ids": ids, "labels": ai, "labels_all": al, "length": ln, "messages": messages(turns)}
        for ids, ai, al, ln, turns in zip(
            cols["ai_only"]["input_ids"], cols["ai_only"]["labels"], cols["all"]["labels"], cols["ai_only"]["length"],
            transcripts,
        )
    ]


def messages(turns) -> list[dict[str, str]]:
    """A transcript as a conversational (`messages`) row, as TRL takes it (rendered by the Baize chat template)."""
    return [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns]


# --------------------------------------------------------------------------- worker (one variant per process)


VARIANTS = {
    # name: (reference recipe?, changes to params.yaml's train section)
    "reference": (True, {"mixed_precision": "no"}),  # Baize's finetune.py as it runs on a CPU (fp16=True needs CUDA)
    "reference-bf16": (True, {"mixed_precision": "bf16"}),  # its fp16 autocast, as bf16 (the CPU's half type)
    "ours": (False, {}),  # the train stage as the default params.yaml runs it
    "ours-fp32": (False, {"mixed_precision": "no"}),
    "ours-bf16": (False, {"mixed_precision": "bf16"}),
    "ours-gc": (False, {"gradient_checkpointing": True}),
    "ours-no-budget": (False, {"max_batch_tokens": 0}),
    # the same with bitsandbytes' own CPU training matmul (MatMul8bitFp) instead of training._FrozenInt8Matmul
    "ours-bnb-matmul": (False, {}),
}


def default_params(micro: int | None = None, accum: int | None = None, steps: int | None = None, **changes):
    """params.yaml's `train:` section (the repository's), with the benchmark's micro-batch, accumulation and steps
    (None: params.yaml's), no warm-up (a few steps), no checkpoints or val passes, then `changes`."""
    from baize.config import TrainParams, load_sections

    (train,) = load_sections("train", path=ROOT / "params.yaml")
    values = train.model_dump()
    micro = micro or train.micro_batch_size
    accum = accum or train.gradient_accumulation_steps(1)
    values.update(batch_size=micro * accum, micro_batch_size=micro, num_processes=1, warmup_steps=0,
                  save_steps=10**6, eval_steps=10**6, eval_val=False)
    if steps is not None:
        values["max_steps"] = steps
    return TrainParams(**{**values, **changes})

# TRL's SFTTrainer, configured as TRL's documentation recommends for LoRA on a k-bit base (see trl_worker); the
# `+key=value` changes of these are SFTConfig fields: `trl+gradient_checkpointing=false`.
TRL_VARIANTS = {
    "trl": {},  # SFTConfig's defaults (gradient checkpointing on) + padding-free
    "trl-no-gc": {"gradient_checkpointing": False},  # the same without gradient checkpointing (as `ours` runs)
}


def variant_config(name: str) -> tuple[bool, dict]:
    """A named variant, optionally with train params changed: `ours+max_batch_tokens=1024+lora_dropout=0`."""
    import yaml

    base, *changes = name.split("+")
    if base not in VARIANTS:
        sys.exit(f"unknown variant {base!r} (known: {', '.join(VARIANTS)})")
    reference, overrides = VARIANTS[base]
    for change in changes:
        key, _, value = change.partition("=")
        overrides = {**overrides, key: yaml.safe_load(value)}
    return reference, overrides


def worker(variant: str, data: Path, model_dir: Path, steps: int, micro: int, accum: int) -> dict:
    if variant.split("+")[0] in TRL_VARIANTS:
        return trl_worker(variant, data, model_dir, steps, micro, accum)
    import torch
    from datasets import load_from_disk
    from transformers import Trainer, TrainerCallback

    from baize import hardware, training

    torch.manual_seed(0)
    ds = load_from_disk(str(data))
    reference, overrides = variant_config(variant)
    if reference:  # whole-text loss
        ds = ds.remove_columns("labels").rename_column("labels_all", "labels")
        overrides = {"gradient_checkpointing": False, "max_batch_tokens": 0, **overrides}
    params = default_params(micro, accum, steps, **overrides)
    mixed = hardware.resolve_mixed_precision(params.mixed_precision)
    tokenizer = training.load_tokenizer(Path("/nonexistent"), model_dir)
    if variant.split("+")[0] == "ours-bnb-matmul":
        training.install_frozen_int8_matmul = lambda model: 0
    if reference:
        base = reference_base(model_dir)
    else:
        base = training.load_base_model(model_dir, "int8", params.gradient_checkpointing, mixed)
    model = training.add_lora(base, params)
    base_cls = Trainer if reference else training.BaizeTrainer
    extra = {} if reference else {"max_batch_tokens": params.max_batch_tokens}

    class Counting(base_cls):
        real_tokens = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.real_tokens += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), trainer.real_tokens, trainer_trained()))

    out_dir = tempfile.mkdtemp(prefix="bench-train-")
    args = training.training_arguments(params, Path(out_dir), has_eval=False)
    args.save_strategy = "no"
    if reference:
        args.train_sampling_strategy = "random"
    trainer = Counting(
        model=model, args=args, train_dataset=ds,
        data_collator=training.PadCollator(tokenizer.pad_token_id, pad_to=512 if reference else None),
        callbacks=[Clock()], **extra,
    )
    trained = {"n": 0}

    def trainer_trained():
        return trainer.trained_tokens if not reference else trained["n"]

    if reference:  # count trained tokens for the table (the stock loss does not)
        orig = Counting.compute_loss

        def counted(self, model, inputs, *a, **k):
            if model.training:
                trained["n"] += int((inputs["labels"][:, 1:] != -100).sum())
            return orig(self, model, inputs, *a, **k)

        Counting.compute_loss = counted
    return {**_timed_train(trainer, marks), "variant": variant, "mixed_precision": mixed,
            "weights_footprint_mb": model.get_memory_footprint() / 2**20}


def reference_base(model_dir: Path):
    """The int8 base as alpaca-lora / Baize's finetune.py load it: `from_pretrained(load_in_8bit=True)` then peft's
    k-bit preparation (every non-int8 weight fp32), and nothing of ours: no bf16 embeddings, no fused head, no
    copy of the weights left mapped from the safetensors file, no allocator tuning. Without gradient
    checkpointing (the reference recipe "with no memory savings", DESIGN.md's training targets)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from baize import hardware

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32,
        device_map=hardware.int8_device_map(),
    )
    model.config.use_cache = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _timed_train(trainer, marks: list) -> dict:
    """Run `trainer.train()` and turn the per-step (time, non-padding tokens, trained tokens) marks its callback
    appends into rates; the first step (warm-up) is reported apart and not timed."""
    start = time.perf_counter()
    trainer.train()
    (t0, tok0, tr0), (t1, tok1, tr1) = marks[0], marks[-1]
    return {
        "steps": len(marks),
        "measured_steps": len(marks) - 1,
        "seconds": t1 - t0,
        "non_padding_tokens_per_s": (tok1 - tok0) / (t1 - t0),
        "trained_tokens_per_s": (tr1 - tr0) / (t1 - t0),
        "first_step_s": marks[0][0] - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def trl_worker(variant: str, data: Path, model_dir: Path, steps: int, micro: int, accum: int) -> dict:
    """TRL's `SFTTrainer` on the same int8 base, LoRA settings, transcripts, batch and steps as `ours`.

    As TRL's documentation sets it up for (Q)LoRA: the model path with `quantization_config` (bitsandbytes int8)
    and `peft_config` given to the trainer, a conversational `messages` dataset rendered by the tokenizer's chat
    template (the Baize template) with `assistant_only_loss=True`. TRL's speed/memory options (see the module
    docstring for which and why): `padding_free=True` (on the CPU transformers' sdpa attention gets a
    block-diagonal mask from the position ids, so no token attends across samples); no packing.
    """
    import torch
    import yaml
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from baize import hardware
    from baize.chat_template import set_baize_chat_template

    base, *changes = variant.split("+")
    overrides = dict(TRL_VARIANTS[base])
    for change in changes:
        key, _, value = change.partition("=")
        overrides[key] = yaml.safe_load(value)
    torch.manual_seed(0)
    rows = load_from_disk(str(data))
    ds = rows.select_columns(["messages"])
    # the same train params as `ours` (whose own knobs, like max_batch_tokens, have no TRL counterpart)
    params = default_params(micro, accum, steps)
    micro, accum = params.micro_batch_size, params.gradient_accumulation_steps(1)
    mixed = hardware.resolve_mixed_precision(params.mixed_precision)  # the same compute dtype as `ours`
    tokenizer = set_baize_chat_template(AutoTokenizer.from_pretrained(str(model_dir)))
    config = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=params.learning_rate,
        warmup_steps=0,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        seed=params.seed,
        bf16=mixed == "bf16",  # SFTConfig defaults to bf16=True; the same autocast as `ours` instead
        use_cpu=hardware.device_type() == "cpu",
        assistant_only_loss=True,  # the tokenize stage's ai_only labels (the template's {% generation %} spans)
        padding_free=True,
        max_length=None,  # padding-free without packing does not truncate; the transcripts fit in 512 tokens
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    config.update(overrides)
    args = SFTConfig(**config)
    lora = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                      target_modules=list(params.target_modules), bias="none", task_type="CAUSAL_LM")
    counts = {"real": 0, "trained": 0}

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                if "attention_mask" in inputs:
                    counts["real"] += int(inputs["attention_mask"].sum())
                else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is None)
                    counts["real"] += int(inputs["input_ids"].numel())
                counts["trained"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, *a, **k)

    marks: list[tuple[float, int, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), counts["real"], counts["trained"]))

    if hardware.int8_device_map() is not None:
        args.model_init_kwargs = {"device_map": hardware.int8_device_map()}
    trainer = Counting(
        model=str(model_dir), args=args, train_dataset=ds, processing_class=tokenizer,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True), peft_config=lora, callbacks=[Clock()],
    )
    # TRL's tokenization of the messages must be our tokenize stage's, token for token (labels too)
    prepared = trainer.train_dataset
    same = sum(
        list(p["input_ids"]) == r["input_ids"]
        and list(p["labels"]) == r["labels"]
        for p, r in zip(prepared, rows)
    )
    return {
        **_timed_train(trainer, marks),
        "variant": variant,
        "mixed_precision": mixed,
        "weights_footprint_mb": trainer.model.get_memory_footprint() / 2**20,
        "trl_options": {k: getattr(args, k) for k in ("padding_free", "packing", "gradient_checkpointing", "bf16",
                                                      "assistant_only_loss", "max_length")},
        "same_input_ids_as_ours": f"{same}/{len(rows)}",
    }


def footprint(model_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from baize import hardware, training

    fp32 = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    out = {"fp32_mb": fp32.get_memory_footprint() / 2**20}
    del fp32
    # int8 linear layers, the rest in fp16 as alpaca-lora loads it
    int8 = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float16,
        use_safetensors=True,
    )
    out["int8_fp16_rest_mb"] = int8.get_memory_footprint() / 2**20
    del int8
    # as the train stage holds it for training (after peft's k-bit preparation), without / with mixed precision
    for name, mixed in (("int8_as_trained_fp32_mb", "no"), ("int8_as_trained_mb", "auto")):
        resolved = hardware.resolve_mixed_precision(mixed)
        out[name] = training.load_base_model(model_dir, "int8", False, resolved).get_memory_footprint() / 2**20
        out[name.replace("_mb", "_mixed")] = resolved
    return out


# --------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models/base")
    ap.add_argument("--samples", type=int, default=96, help="synthetic transcripts (the sampler draws from them)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per variant; the first is warm-up")
    ap.add_argument("--micro-batch", type=int, help="default: params.yaml's train.micro_batch_size")
    ap.add_argument("--grad-accum", type=int,
                    help="default: params.yaml's batch_size / micro_batch_size (one process)")
    ap.add_argument("--variants", default="reference,reference-bf16,ours,trl,trl-no-gc",
                    help=f"comma-separated, of: {', '.join([*VARIANTS, *TRL_VARIANTS])}; +key=value changes a train "
                    "param (an SFTConfig field for trl*)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.micro_batch is None or a.grad_accum is None:
        defaults = default_params(a.micro_batch, a.grad_accum)
        a.micro_batch, a.grad_accum = defaults.micro_batch_size, defaults.gradient_accumulation_steps(1)

    if a.worker:
        res = footprint(a.model) if a.worker == "footprint" else worker(
            a.worker, a.data, a.model, a.steps, a.micro_batch, a.grad_accum
        )
        a.json.write_text(json.dumps(res))
        return

    if not (a.model / "config.json").is_file():
        sys.exit(f"{a.model}: no model folder (run `dvc repro base_model` or pass --model)")
    from datasets import Dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    rows = build_rows(a.model, a.samples)
    Dataset.from_list(rows).save_to_disk(str(tmp / "data"))
    lengths = sorted(r["length"] for r in rows)
    print(f"{len(rows)} transcripts, tokens min/median/mean/max = {lengths[0]}/{lengths[len(lengths) // 2]}/"
          f"{sum(lengths) / len(lengths):.0f}/{lengths[-1]}; padding share at 512: "
          f"{1 - sum(lengths) / (512 * len(lengths)):.0%}; micro-batch {a.micro_batch} x accumulation {a.grad_accum}",
          flush=True)

    variants = a.variants.split(",")
    if any(name.split("+")[0] in TRL_VARIANTS for name in variants):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install -e '.[bench]'): the trl variants are left out", flush=True)
            variants = [name for name in variants if name.split("+")[0] not in TRL_VARIANTS]
    results = {}
    for name in [*variants, "footprint"]:
        out = tmp / f"{name}.json"
        cmd = [sys.executable, __file__, "--worker", name, "--data", str(tmp / "data"), "--json", str(out),
               "--model", str(a.model), "--steps", str(a.steps), "--micro-batch", str(a.micro_batch),
               "--grad-accum", str(a.grad_accum)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(out.read_text())
        print(f"  {name}: done in {time.perf_counter() - t:.0f} s: {results[name]}", flush=True)

    # ratio columns: against the paper's recipe and against TRL (every trl variant that ran)
    refs = [name for name in results if name in ("reference", "reference-bf16") or name.split("+")[0] in TRL_VARIANTS]
    print()
    print("| variant | mixed precision | non-padding tokens/s | trained tokens/s | peak RSS (MB) | "
          + " | ".join(f"vs {name}: tokens/s, RSS" for name in refs) + " |")
    print("| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(refs))
    for name in variants:
        r = results[name]
        rel = [f"{r['non_padding_tokens_per_s'] / results[ref]['non_padding_tokens_per_s']:.2f}x, "
               f"{r['peak_rss_mb'] / results[ref]['peak_rss_mb']:.2f}x" for ref in refs]
        print(f"| {name} | {r['mixed_precision']} | {r['non_padding_tokens_per_s']:.0f} | "
              f"{r['trained_tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | " + " | ".join(rel) + " |")
    for name in refs:
        r = results[name]
        if "trl_options" not in r:
            continue
        print(f"\n{name}: SFTConfig {r['trl_options']}; TRL's input_ids and labels equal ours for "
              f"{r['same_input_ids_as_ours']} transcripts")
        if "ours" in results:
            o = results["ours"]
            print(f"ours vs {name}: {o['non_padding_tokens_per_s'] / r['non_padding_tokens_per_s']:.2f}x non-padding "
                  f"tokens/s (target >= 1.5x), {o['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak RSS (target <= 0.7x)")
    fp = results["footprint"]
    f32 = fp["fp32_mb"]
    print(f"\nweights footprint (get_memory_footprint) against fp32 ({f32:.0f} MB): "
          f"int8 + fp16 rest (alpaca-lora's load) {fp['int8_fp16_rest_mb']:.0f} MB = "
          f"{fp['int8_fp16_rest_mb'] / f32:.2f}x; as trained, mixed precision {fp['int8_as_trained_mixed']}: "
          f"{fp['int8_as_trained_mb']:.0f} MB = {fp['int8_as_trained_mb'] / f32:.2f}x; as trained in fp32: "
          f"{fp['int8_as_trained_fp32_mb']:.0f} MB = {fp['int8_as_trained_fp32_mb'] / f32:.2f}x")


if __name__ == "__main__":
    main()
