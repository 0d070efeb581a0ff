"""int8 LoRA fine-tuning of the base model on the tokenized Baize transcripts, in one file.

The whole path, top to bottom (alpaca-lora's `finetune.py`, with what the CPU taught us):

1. `load_splits`: the `train`/`val` datasets written by the tokenize stage (`input_ids`, `labels`, `length`).
2. `load_base_model`: the frozen base, quantized to int8 by bitsandbytes (or kept bf16/fp32), prepared for
   k-bit training, its tied embeddings / lm_head stored in bf16 (upcast at use: fp32 compute stays fp32), nothing
   left mapped from the fp32 safetensors file, glibc's freed heap returned to the OS (see `limit_heap_retention`);
   `add_lora` puts rank-8 adapters on q, k, v, gate, up and down (the paper's settings).
3. `BaizeTrainer` (the transformers Trainer) with:
   - length-grouped batches and padding only to the longest sample of each batch (`pad_batch`), instead of
     padding every sample to 512: on the self-chat length distribution most of a 512-pad batch is padding, and
     attention costs grow with the square of the padded length;
   - a loss that projects onto the 49k-token vocabulary only the positions that are trained
     (`labels != -100`), a chunk of them at a time with the gradient in the same pass (`head_cross_entropy`):
     the fp32 logits of every position, their softmax and gradient are the largest temporaries of a small
     model's step;
   - a token budget per forward pass (`max_batch_tokens`): a longer micro-batch runs in chunks whose gradients
     add up to the same step, so the longest transcripts do not set the peak memory;
   - bf16 autocast where the hardware computes bf16 natively (`mixed_precision: auto`; AMX CPUs included):
     faster on long forwards (1.4x for the padded reference recipe on this CPU), half the stored embeddings;
   - optional gradient checkpointing, which keeps one layer's activations instead of all of them (slower);
   - a clear stop (`LossDivergedError`, exit 1) as soon as the loss is NaN/inf.
4. Checkpoints every `save_steps` into `checkpoints/<fingerprint>/`, where the fingerprint covers the params,
   the data and the base model: a re-run after a crash resumes the same run; changed params or data start over.
5. `save_adapter`: only the LoRA weights (safetensors), the tokenizer with its chat template and
   `baize_adapter.json` (MLflow run, base model sha256, params).

Baize v2 (SDF) trains through the same path with `stack_on`: the first (v1.5) adapter is loaded frozen as
`sft`, a new LoRA (`default`) is added, both are active (h = W0 x + B_sft A_sft x + B_sdf A_sdf x) and only the new
one trains. The int8 base makes stacking the right choice: merging the first LoRA into int8 weights would round it.

MLflow: when a run is active (the stage opens it), rank 0 logs per-step metrics into it; nothing here opens runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import csv
import functools
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import threading
import time
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from baize.base_model import clean_tokenizer_config
from baize.config import TrainParams
from baize import hardware
from baize.errors import BaizeError, InputError, ParamsError
from baize.hardware import resolve_mixed_precision
from baize.transcript import atomic_write_text
from baize.inference import STACK_NAME  # the frozen first LoRA of a stack: its adapter name and subfolder

# bitsandbytes warns on every int8 load of a CPU with AVX512-BF16 that its optional 4-bit kernels package is
# missing; 4-bit is never used here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ADAPTER_META = "baize_adapter.json"
REQUIRED_COLUMNS = ("input_ids", "labels")
IGNORE = -100  # label of a position that is not trained (prompt, padding)


class _DropExpected(logging.Filter):
    # bitsandbytes' int8 inference path (evaluation) logs this once per layer and call; it is expected.
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropExpected())


class LossDivergedError(BaizeError):
    """The training loss became NaN or infinite: the run stops instead of writing a broken adapter."""


# --------------------------------------------------------------------------- data


def load_splits(data_dir: str | os.PathLike):
    """The tokenized `train` and `val` datasets (val may be absent or empty: then no evaluation)."""
    from datasets import load_from_disk

    data_dir = Path(data_dir)
    splits = {}
    for name in ("train", "val"):
        path = data_dir / name
        if not path.is_dir():
            if name == "val":
                splits[name] = None
                continue
            raise InputError(path, None, "missing tokenized split (run the tokenize stage first)")
        try:
            ds = load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a broken folder
            raise InputError(path, None, f"not a saved Hugging Face dataset ({type(exc).__name__}: {exc})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
        if missing:
            raise InputError(path, None, f"missing column(s) {', '.join(missing)} (has {', '.join(ds.column_names)})")
        if "length" not in ds.column_names:  # the length-grouped sampler reads it instead of re-measuring
            ds = ds.map(lambda row: {"length": len(row["input_ids"])})
        splits[name] = ds
    if len(splits["train"]) == 0:
        raise InputError(data_dir / "train", None, "no training samples")
    if splits["val"] is not None and len(splits["val"]) == 0:
        splits["val"] = None
    return splits["train"], splits["val"]


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the positions whose next-token prediction is trained (position t predicts label t+1)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def pad_batch(features: list[dict[str, Any]], pad_token_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sample (or to `pad_to`); padding gets label -100 and attention 0."""
    width = pad_to or max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = min(len(f["input_ids"]), width)
        input_ids[i, :n] = torch.as_tensor(f["input_ids"][:n])
        labels[i, :n] = torch.as_tensor(f["labels"][:n])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PadCollator:
    """Dynamic padding (a class, not a lambda, so dataloader workers can pickle it)."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, features):
        return pad_batch(features, self.pad_token_id, self.pad_to)


# --------------------------------------------------------------------------- model


def _upcast_output(module, args, output):
    return output.float()


def _head_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head's forward: the hidden states themselves while `compute_loss` projects them (`hidden_only`), else the
    logits, with a weight stored in a lower dtype (bf16 with an int8 base) upcast to the hidden states' dtype, so
    outside autocast the logits are computed in fp32 (a CPU without bf16 has no fast bf16 matmul)."""
    if getattr(head, "hidden_only", False):
        return hidden
    weight = head.weight
    if not torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(hidden.dtype)
    return F.linear(hidden, weight, head.bias)


def install_head(model) -> None:
    """Give the model's lm_head `_head_forward` (it stays the same nn.Linear, its weight still tied)."""
    head = model.get_output_embeddings()
    head.hidden_only = False
    head.forward = functools.partial(_head_forward, head)


@contextlib.contextmanager
def hidden_only(head):
    """Within: lm_head returns its input, so `model(..., logits_to_keep=mask)` gives the kept hidden states."""
    head.hidden_only = True
    try:
        yield
    finally:
        head.hidden_only = False


class _FrozenInt8Matmul(torch.autograd.Function):
    """`x @ W.T + bias` for a frozen bitsandbytes int8 weight (W = CB * SCB / 127 per output row) on the CPU.

    bitsandbytes' CPU training path (MatMul8bitFp) keeps every linear's input for a weight gradient that a frozen
    base never needs (SmolLM2, 512-token budget: 80 MB of the step's peak, more on longer rows). Here nothing but
    the int8 weight is kept, and the weight is dequantized in one pass into a scratch buffer reused by every call
    of its shape, instead of a fresh fp32 copy (then scaled in a second pass) per call. The arithmetic is bitsandbytes', so outputs and gradients are
    bit for bit the same (tests/test_training.py)."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return F.linear(x, _dequantized(cb, scb, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        cb, scb = ctx.saved_tensors
        grad_output = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
        grad_x = torch.matmul(grad_output.to(ctx.x_dtype), _dequantized(cb, scb, ctx.x_dtype))
        return grad_x.view(ctx.x_shape), None, None, None


_SCRATCH = threading.local()  # (shape, dtype, device) -> the buffer a weight of that shape is dequantized into


def _dequantized(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CB * SCB / 127 (bitsandbytes' factor) in `dtype`, in a per-thread buffer that the next call of that shape
    overwrites (the result is only read by the one matmul that follows)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (tuple(cb.shape), dtype, cb.device)
    if key not in buffers:
        buffers[key] = torch.empty(cb.shape, dtype=dtype, device=cb.device)
    return torch.mul(cb, scb.unsqueeze(1).mul(1.0 / 127.0), out=buffers[key])


def _int8_forward(module, original, x: torch.Tensor) -> torch.Tensor:
    state = module.state
    if (not module.training or x.device.type != "cpu" or state.CB is None or module.weight.CB is not None
            or state.has_fp16_weights or module.weight.requires_grad):
        return original(x)  # the first call (bitsandbytes sets up its state), inference, GPUs: bitsandbytes' own
    if module.bias is not None and module.bias.dtype != x.dtype:
        module.bias.data = module.bias.data.to(x.dtype)  # as bitsandbytes does
    return _FrozenInt8Matmul.apply(x, state.CB, state.SCB, module.bias)


def install_frozen_int8_matmul(model) -> int:
    """Give each bitsandbytes int8 linear of `model` `_int8_forward` (training on the CPU: `_FrozenInt8Matmul`;
    anything else: bitsandbytes' forward). Returns how many linears got it."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear8bitLt):
            module.forward = functools.partial(_int8_forward, module, module.forward)
            n += 1
    return n


def _own_storage(model, fresh: tuple[torch.Tensor, ...] = ()) -> None:
    """Copy into the process's memory the weights that still point into the safetensors file (the fp32 norms, kept
    as zero-copy views of the mapped file): any one of them keeps the whole file mapped, and every page the
    int8 quantization read of it stays in the RSS (the size of the fp32 model). `fresh`: tensors already copied
    (the embeddings just converted to bf16), left as they are."""
    with torch.no_grad():
        for module in model.modules():
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for _, tensor in tensors:
                if tensor is not None and tensor.dtype != torch.int8 and not any(tensor is f for f in fresh):
                    tensor.data = tensor.data.clone()


# glibc's malloc serves a freed-then-reallocated large block from its heap once it has raised its mmap threshold
# (dynamically, up to 32 MiB), and a training step's activations of varying sizes (chunks re-padded to their own
# longest row) then fragment that heap: the peak RSS was ~0.5 GB above the live tensors at a 512-token budget.
# A fixed threshold gives every tensor above it its own mapping, returned to the OS when freed.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def limit_heap_retention(threshold: int = MMAP_THRESHOLD) -> None:
    """Allocations of `threshold` bytes or more get their own mapping (glibc `mallopt(M_MMAP_THRESHOLD)`, which
    also stops glibc raising the threshold); a no-op off glibc, or when the environment tunes it already
    (MALLOC_MMAP_THRESHOLD_). Process-wide; set before the model is loaded."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # musl has no mallopt
        pass


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`); a no-op elsewhere.

    Loading the int8 base reads fp32 weights and quantizes them: the freed fp32 blocks stay in glibc's heap (and in
    the RSS) until trimmed."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # musl has no malloc_trim
        pass


def load_base_model(
    model_dir: str | os.PathLike, precision: str, gradient_checkpointing: bool = False, mixed_precision: str = "no"
):
    """The frozen base model: int8 (bitsandbytes), bf16 or fp32; safetensors only, no remote code.

    `mixed_precision` (resolved: bf16/fp16/no) is the autocast dtype training will use. With an int8 base the
    other weights are fp32 (peft's k-bit preparation), except the input embeddings (tied to lm_head, a fifth of a
    small model), stored in bf16 (fp16 under fp16 autocast): their output is cast back to fp32, so the residual
    stream stays fp32 as in the all-fp32 recipe, and lm_head upcasts the weight (`_head_forward`; the fused loss,
    `head_cross_entropy`, does it too), so without autocast the compute stays fp32 and only the storage is
    rounded to bf16 (the weights are not bf16-exact: losses move in the 3rd-4th digit).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(model_dir, None, "no config.json: not a Hugging Face model folder (run the base_model stage)")
    hardware.check_remote_code(model_dir)
    limit_heap_retention()
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if precision == "int8":
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32)
        kwargs["device_map"] = hardware.int8_device_map()
    else:  # placed by the Trainer (accelerate) on this process's device
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(model_dir, None, f"cannot load the base model: {str(exc).splitlines()[0]}") from None
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    ckpt_kwargs = {"use_reentrant": False}  # the non-reentrant variant works with frozen inputs and DDP
    if precision == "int8":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
        embeddings = model.get_input_embeddings()
        embeddings.to(torch.float16 if mixed_precision == "fp16" else torch.bfloat16)  # lm_head shares it
        embeddings.register_forward_hook(_upcast_output)
        _own_storage(model, fresh=(embeddings.weight,))  # after which the mapped file is closed (the fp32 weights were only read to quantize)
        install_frozen_int8_matmul(model)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    install_head(model)
    gc.collect()
    release_free_memory()
    return model


def activate_stack(model) -> None:
    """Both LoRAs in the forward pass; only the new one (`default`) trainable."""
    model.base_model.set_adapter(["default", STACK_NAME])  # marks both trainable...
    model.set_requires_grad(STACK_NAME, requires_grad=False)  # ...so the first is frozen again


def add_lora(model, params: TrainParams, stack_on: Path | None = None):
    """Rank-`lora_r` adapters on `target_modules`; everything else stays frozen.

    `stack_on`: an adapter folder loaded first, frozen, and kept active under the new LoRA (Baize v2).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in params.target_modules if m not in names]
    if missing:
        raise BaizeError(f"train.target_modules: {', '.join(missing)} not found in the base model")
    config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=list(params.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if stack_on is None:
        return get_peft_model(model, config)
    model = PeftModel.from_pretrained(model, str(stack_on), adapter_name=STACK_NAME, is_trainable=False)
    model.add_adapter("default", config)
    activate_stack(model)
    return model


# --------------------------------------------------------------------------- trainer


def split_by_tokens(inputs: dict[str, torch.Tensor], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """A padded batch as chunks of whole rows, each re-padded to its own longest row, of at most `max_tokens`
    padded tokens (a row longer than the budget is a chunk of its own). One chunk when the batch fits."""
    lengths = inputs["attention_mask"].sum(dim=1)
    rows, width = inputs["input_ids"].shape
    if max_tokens <= 0 or rows * width <= max_tokens or rows == 1:
        return [inputs]
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    groups: list[list[int]] = [[]]
    for i in order:
        longest = int(lengths[groups[-1][0]]) if groups[-1] else int(lengths[i])
        if groups[-1] and (len(groups[-1]) + 1) * longest > max_tokens:
            groups.append([])
        groups[-1].append(i)
    chunks = []
    for group in groups:
        index = torch.tensor(group)
        keep = int(lengths[index].max())  # right padding: columns past the longest row are padding only
        chunks.append({k: v[index, :keep] for k, v in inputs.items()})
    return chunks


def warmup_linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): a linear warm-up that reaches the full rate at step
    `warmup_steps`, then linear decay to 0 after the last step (as transformers' "linear"). The warm-up counts from
    1/(warmup_steps + 1), not from 0: transformers' gives the first step a learning rate of 0, so with
    `warmup_steps: 1` that step trained nothing."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


LOSS_CHUNK_ROWS = 256  # trained positions projected onto the vocabulary at a time (256 x 49k fp32: 48 MiB)
LOSS_VOCAB_ROWS = 8192  # lm_head rows taken at a time (upcast from bf16 storage: 8192 x 576 fp32 = 18 MiB)


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight.T, target_i), `rows` positions at a time, with the gradient computed in
    the same pass: the [positions, vocab] logits and their gradient never exist whole, and nothing is recomputed
    in the backward pass (what the GPU kernels of Liger and cut-cross-entropy do, in plain torch for the CPU).
    The weight is read `vocab_rows` rows at a time, so one stored in bf16 is never upcast whole: that copy (113 MB
    for SmolLM2) would sit on top of the step's peak, which is the end of the forward pass, where this runs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, vocab_rows, compute_dtype):
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab = weight.shape[0]
        slices = [slice(v, min(v + vocab_rows, vocab)) for v in range(0, vocab, vocab_rows)]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows].to(compute_dtype)
            t = targets[start : start + rows]
            at = torch.arange(t.shape[0], device=t.device)
            # Transposed, [vocab, positions]: each slice of the weight fills a contiguous block.
            logits = torch.empty((vocab, h.shape[0]), dtype=torch.float32, device=hidden.device)
            for s in slices:
                logits[s] = weight[s].to(compute_dtype) @ h.t()
            lse = torch.logsumexp(logits, dim=0)
            loss += (lse - logits[t, at]).sum()
            if needs_hidden or needs_weight:
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs[t, at] -= 1.0  # d loss / d logits
                grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if needs_hidden else None
                for s in slices:
                    d = probs[s].to(compute_dtype)
                    if needs_hidden:
                        grad_h += d.t() @ weight[s].to(compute_dtype)
                    if needs_weight:
                        grad_weight[s] += d @ h
                if needs_hidden:
                    grad_hidden[start : start + rows] = grad_h
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int = LOSS_CHUNK_ROWS,
    vocab_rows: int = LOSS_VOCAB_ROWS,
) -> torch.Tensor:
    """The summed next-token cross-entropy of `hidden` ([positions, hidden]) projected by lm_head's `weight`
    ([vocab, hidden]), equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` with
    the projection in the autocast dtype under autocast, else in the hidden states' dtype (fp32, the weight upcast
    from its bf16 storage), in chunks of `rows` positions and `vocab_rows` rows of the weight (see
    `_HeadCrossEntropy`)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # no trained position: a zero loss still connected to the graph
    with torch.autocast(device, enabled=False):
        return _HeadCrossEntropy.apply(hidden, weight, targets, rows, vocab_rows, dtype)


class BaizeTrainer(Trainer):
    """The Trainer with a loss over trained positions only, a token budget per forward pass and a hard stop on a
    NaN/inf loss.

    `max_batch_tokens`: a micro-batch with more padded tokens runs as chunks (`split_by_tokens`) whose losses are
    normalized by the same `num_items_in_batch` (trained tokens of the whole accumulated batch), so their
    gradients add up to exactly the gradient of the unsplit micro-batch.
    """

    trained_tokens = 0  # label tokens this process trained on (not counting a resumed run's earlier part)

    def __init__(self, *args, max_batch_tokens: int = 0, stacked: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_batch_tokens = max_batch_tokens
        self.stacked = stacked
        # compute_loss below normalizes by num_items_in_batch itself, whatever the model's forward accepts, so
        # the Trainer must always count it (chunks rely on it) and must not divide again by the accumulation.
        self.model_accepts_loss_kwargs = True

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' "linear" schedule with a warm-up that never starts at 0 (see `warmup_linear_factor`)."""
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else self.optimizer,
                functools.partial(
                    warmup_linear_factor,
                    warmup_steps=self.args.get_warmup_steps(num_training_steps),
                    total_steps=num_training_steps,
                ),
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.stacked:
            # The Trainer re-activates only the first active adapter after loading a multi-adapter checkpoint.
            activate_stack(model if model is not None else self.model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        budget = 0 if self.is_deepspeed_enabled else self.max_batch_tokens  # DeepSpeed owns its backward passes
        chunks = split_by_tokens(inputs, budget) if num_items_in_batch is not None else [inputs]
        total = None
        for i, chunk in enumerate(chunks):
            # Under DDP only the last chunk may all-reduce (the Trainer already holds back earlier micro-batches).
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, chunk, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        keep = trained_positions(labels)
        # Only the kept positions go through lm_head, and in chunks (`head_cross_entropy`): neither the
        # [batch, seq, 49k] logits nor the [trained positions, 49k] ones and their gradient exist whole. The model
        # returns the kept hidden states (lm_head passes them through) in `outputs.logits`.
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with hidden_only(head):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep)
        targets = labels[:, 1:][keep[:, :-1]]
        if head.bias is None:
            loss_sum = head_cross_entropy(outputs.logits, head.weight, targets)
        else:  # (no LLaMA-family head has a bias)
            loss_sum = F.cross_entropy(head(outputs.logits).float(), targets, reduction="sum")
        if model.training:
            if not torch.isfinite(loss_sum):
                raise LossDivergedError(
                    f"training loss became {loss_sum.item()} at step {self.state.global_step + 1}: stopped "
                    f"(lower train.learning_rate={self.args.learning_rate:g}, or check the data and base model); no adapter written"
                )
            self.trained_tokens += int(targets.numel())
        if num_items_in_batch is not None:
            # Normalised over the whole accumulated (and, with DDP, global) batch, as the Trainer's own loss is:
            # each trained token weighs the same whatever the length of the sample it is in.
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        else:
            loss = loss_sum / max(targets.numel(), 1)
        return (loss, outputs) if return_outputs else loss


class StepBar(TrainerCallback):
    """A tqdm bar over the optimizer steps with the last loss (and val loss) beside the rate and the ETA."""

    def __init__(self, desc: str = "train") -> None:
        self.bar = None
        self.eval_bar = None  # the val passes (before training: the base's loss; every eval_steps; at the end)
        self.desc = desc

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.eval_bar is None:
            from baize import progress

            total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
            self.eval_bar = progress.bar(total, desc=f"{self.desc}: val loss", unit="batch", leave=False)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from baize import progress  # a bar on a terminal, a line every 10 s off it (DVC queue logs, CI)

        self.bar = progress.bar(state.max_steps, initial=state.global_step, desc=self.desc, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if isinstance((logs or {}).get(k), (int, float))}
        if self.bar is not None and shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MlflowSteps(TrainerCallback):
    """Per-step metrics into the active MLflow run (rank 0 only): loss, learning_rate, eval_loss, ..."""

    def __init__(self):
        self.logged_steps: set[int] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        import mlflow

        if mlflow.active_run() is None:
            return
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)
            self.logged_steps.add(state.global_step)


def world_size() -> int:
    """Processes of this run: set by `accelerate launch` / torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_steps(params: TrainParams, processes: int | None = None) -> int:
    """Gradient accumulation for `train.batch_size` with the processes actually running (alpaca-lora's
    batch_size // micro_batch_size // world_size); `ParamsError` when they do not divide."""
    try:
        return params.gradient_accumulation_steps(world_size() if processes is None else processes)
    except ValueError as exc:
        raise ParamsError(f"params.yaml: train: {exc}") from None


def training_arguments(params: TrainParams, run_dir: Path, has_eval: bool) -> TrainingArguments:
    on_cpu = hardware.device_type() == "cpu"
    mixed = resolve_mixed_precision(params.mixed_precision)
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=params.micro_batch_size,
        per_device_eval_batch_size=params.micro_batch_size,
        gradient_accumulation_steps=accumulation_steps(params),
        num_train_epochs=params.num_epochs,
        max_steps=params.max_steps,
        learning_rate=params.learning_rate,
        warmup_steps=params.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        seed=params.seed,
        data_seed=params.seed,
        # Batches of similar lengths (the `length` column), padded per batch by `PadCollator`.
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        remove_unused_columns=False,
        logging_steps=params.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must be seen, not averaged away
        eval_strategy="steps" if has_eval else "no",
        eval_steps=params.eval_steps,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=2,  # the newest may be cut short by a kill -9; the one before is complete
        save_only_model=False,  # optimizer, scheduler and RNG state are what make a resume exact
        report_to="none",  # the stage owns the one MLflow run; see MlflowSteps
        use_cpu=on_cpu,
        bf16=mixed == "bf16",  # autocast (on the CPU too); the Trainer keeps adapters and optimizer in fp32
        fp16=mixed == "fp16",
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if on_cpu and world_size() > 1 else None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )


# --------------------------------------------------------------------------- checkpoints and fingerprint


def _sha256_files(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def data_digest(data_dir: str | os.PathLike, split: str) -> str:
    """sha256 of a saved split's files (content, not paths or mtimes)."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        return ""
    return _sha256_files([p for p in folder.rglob("*") if p.is_file()], folder)


def base_model_sha256(model_dir: str | os.PathLike) -> str:
    """The base model's weights sha256, from `source.json` (base_model stage) or hashed here."""
    model_dir = Path(model_dir)
    source = model_dir / "source.json"
    if source.is_file():
        files = (json.loads(source.read_text(encoding="utf-8")).get("files")) or {}
        weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
        if len(weights) == 1:
            return next(iter(weights.values()))
        if weights:
            return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()
    return _sha256_files(list(model_dir.glob("*.safetensors")), model_dir)


def run_fingerprint(params: TrainParams, data: dict[str, str], base_sha256: str) -> str:
    """What must be equal for a checkpoint to be resumable: params, data and base weights."""
    blob = json.dumps({"params": params.model_dump(mode="json"), "data": data, "base": base_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest `checkpoint-N` with a readable trainer_state.json (written last, so the save finished)."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        found.append((step, path))
    return max(found)[1] if found else None


def remove_stale_runs(checkpoints_dir: Path, keep: str) -> None:
    """Checkpoints of other params/data can never be resumed: delete them (they are large)."""
    if not checkpoints_dir.is_dir():
        return
    for child in checkpoints_dir.iterdir():
        if child.is_dir() and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------- outputs


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step from the Trainer's log history (which survives a resume): loss, lr, eval_loss."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        row = rows.setdefault(step, {"step": step, "loss": "", "learning_rate": "", "eval_loss": ""})
        for key in ("loss", "learning_rate", "eval_loss"):
            if key in entry:
                row[key] = entry[key]
    return [rows[s] for s in sorted(rows)]


def write_steps_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "learning_rate", "eval_loss"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def load_tokenizer(data_dir: Path, model_dir: Path):
    """The tokenizer the tokenize stage saved (with the Baize chat template), else the base model's."""
    from transformers import AutoTokenizer

    folder = data_dir / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        folder = model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _sort_config_sets(path: Path) -> None:
    """PEFT keeps `target_modules` as a set and writes it in set order, which changes with Python's hash seed
    from process to process: sorted, the adapter folder (a DVC output) is the same file for the same training."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(config.get(key), list) and all(isinstance(v, str) for v in config[key]):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def save_adapter(model, tokenizer, out_dir: Path, meta: dict[str, Any], stack_on: Path | None = None) -> None:
    """Adapter weights (safetensors) + tokenizer + baize_adapter.json, swapped in atomically.

    `stack_on`: the trained adapter is the second of a stack; the frozen first one is copied whole (its files,
    provenance included) into the subfolder `sft/` and `baize_adapter.json` names it (`stacked_on`), so the folder
    is self-contained: `baize.inference.load_model` loads both.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # PEFT: only the LoRA weights (of the new adapter, when stacked)
    model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"])
    _sort_config_sets(tmp / "adapter_config.json")
    if stack_on is not None:
        shutil.copytree(stack_on, tmp / STACK_NAME)
        meta = {**meta, "stacked_on": STACK_NAME}
    tokenizer.save_pretrained(str(tmp))
    clean_tokenizer_config(tmp)
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    swap_in(tmp, out_dir)


def swap_in(new: Path, dest: Path) -> None:
    """Put the folder `new` at `dest` so that a crash at any moment leaves a whole adapter, the old or the new.

    On Linux the two folders are exchanged in one atomic step (renameat2 RENAME_EXCHANGE); elsewhere, or on a file
    system without it, the old folder is renamed aside (`<dest>.old`), the new one renamed into place, then the old
    one deleted: a crash between the two renames leaves the old adapter in `<dest>.old`, put back by the next call.
    (The old code deleted `dest` before renaming: a crash in between left no adapter at all.)
    """
    new, dest = Path(new), Path(dest)
    aside = dest.with_name(dest.name + ".old")
    if aside.is_dir() and not dest.exists():  # a crash between the two renames last time: restore the old one
        os.replace(aside, dest)
    shutil.rmtree(aside, ignore_errors=True)
    if dest.is_dir() and _exchange(new, dest):
        shutil.rmtree(new)  # now the old folder
        return
    if dest.exists():
        os.replace(dest, aside)  # rename aside ...
    os.replace(new, dest)  # ... then swap
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# --------------------------------------------------------------------------- the whole run


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    steps: list[dict[str, Any]]
    resumed_from: str | None
    is_main_process: bool
    model: Any = None
    tokenizer: Any = None
    base_sha256: str = ""
    data_digests: dict[str, str] | None = None
    mlflow_logged_steps: set[int] | None = None


def train(
    params: TrainParams,
    *,
    data_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    checkpoints_dir: str | os.PathLike,
    callbacks: list[TrainerCallback] | None = None,
    stack_on: str | os.PathLike | None = None,
) -> TrainResult:
    """Train the adapter; resume from the last complete checkpoint of the same params+data+base, if any.

    `stack_on`: train a second LoRA on top of this frozen adapter folder (Baize v2, see `add_lora`).
    Returns the metrics (on every process) and the trained PEFT model; the caller saves it (rank 0).
    """
    data_dir, model_dir, checkpoints_dir = Path(data_dir), Path(model_dir), Path(checkpoints_dir)
    started = time.perf_counter()
    train_ds, val_ds = load_splits(data_dir)
    if not params.eval_val:  # (its digest below still names the data this adapter was made with)
        val_ds = None
    digests = {"train": data_digest(data_dir, "train"), "val": data_digest(data_dir, "val")}
    if stack_on is not None:
        from baize.inference import adapter_sha256, check_adapter_dir

        stack_on = check_adapter_dir(Path(stack_on))
        digests["stack_on"] = adapter_sha256(stack_on)  # another first adapter: another run
    base_sha = base_model_sha256(model_dir)
    fingerprint = run_fingerprint(params, digests, base_sha)
    run_dir = checkpoints_dir / fingerprint
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        remove_stale_runs(checkpoints_dir, keep=fingerprint)
        run_dir.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume is not None and is_main:
        # Said at the start (minutes before the last line): the steps before this one are not trained again.
        print(f"train: resuming from step {_checkpoint_step(resume)} (checkpoint {resume})", file=sys.stderr, flush=True)

    tokenizer = load_tokenizer(data_dir, model_dir)
    torch.manual_seed(params.seed)
    mixed = resolve_mixed_precision(params.mixed_precision)
    model = add_lora(
        load_base_model(model_dir, params.precision, params.gradient_checkpointing, mixed), params, stack_on
    )
    mlflow_steps = MlflowSteps()
    trainer = BaizeTrainer(
        model=model,
        args=training_arguments(params, run_dir, has_eval=val_ds is not None),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[mlflow_steps, *(callbacks or [])],
        max_batch_tokens=params.max_batch_tokens,
        stacked=stack_on is not None,
    )
    # A step bar (rate, ETA, the last loss) on stderr instead of a raw dict printed per logged step.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if int(os.environ.get("RANK", "0")) == 0:
        trainer.add_callback(StepBar())

    base_eval: dict[str, float] = {}
    if val_ds is not None:
        # LoRA's B matrices start at zero, so the untrained adapter *is* the base model (the v1.5 model
        # when stacked): its val loss is the
        # number to beat. Kept beside the checkpoints, so a resumed run reports it too; measured again (before the
        # checkpoint's weights are loaded, so still on the base) when a crashed run did not leave it.
        base_eval = _read_base_eval(run_dir) if resume is not None else {}
        if not base_eval:
            base_eval = trainer.evaluate(metric_key_prefix="base_eval")
            if is_main:
                _write_base_eval(run_dir, base_eval)
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final_eval = _final_eval(trainer) if val_ds is not None else {}

    trained_tokens = reduce_sum(trainer.accelerator, trainer.trained_tokens)
    runtime = float(out.metrics.get("train_runtime") or 0.0)
    rows = step_rows(trainer.state.log_history)
    losses = [r["loss"] for r in rows if r["loss"] != ""]
    metrics: dict[str, Any] = {
        # The mean of the logged step losses, not the Trainer's `training_loss`: that one only averages the steps
        # of this process, so after a resume it would differ from an uninterrupted run's.
        "train_loss": sum(losses) / len(losses) if losses else float(out.training_loss),
        "final_train_loss": float(losses[-1]) if losses else None,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": _ppl(final_eval.get("eval_loss")),
        "base_eval_loss": base_eval.get("base_eval_loss"),
        "base_eval_perplexity": _ppl(base_eval.get("base_eval_loss")),
        "steps": int(trainer.state.global_step),
        "epochs": float(trainer.state.epoch or 0.0),
        "train_samples": len(train_ds),
        "val_samples": len(val_ds) if val_ds is not None else 0,
        "trained_tokens": trained_tokens,
        "input_tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "trained_tokens_per_s": trained_tokens / runtime if runtime > 0 else None,
        "train_runtime_s": runtime,
        "total_runtime_s": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "resumed_from_step": _checkpoint_step(resume) if resume else 0,
        "num_processes": int(trainer.accelerator.num_processes),
        "effective_batch_size": params.micro_batch_size
        * trainer.args.gradient_accumulation_steps
        * int(trainer.accelerator.num_processes),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "weights_footprint_mb": model.get_memory_footprint() / 2**20,
        "mixed_precision": mixed,
        # Machine-dependent (run.json and MLflow tags, not the DVC-tracked report): where it ran, the base's dtype.
        "device": str(trainer.accelerator.device),
        "dtype": {"int8": "int8", "bf16": "bfloat16", "fp32": "float32"}[params.precision],
    }
    return TrainResult(
        metrics=metrics,
        steps=rows,
        resumed_from=str(resume) if resume else None,
        is_main_process=trainer.is_world_process_zero(),
        model=trainer.model if not hasattr(trainer.model, "module") else trainer.model.module,
        tokenizer=tokenizer,
        base_sha256=base_sha,
        data_digests={**digests, "fingerprint": fingerprint, "run_dir": str(run_dir)},
        mlflow_logged_steps=mlflow_steps.logged_steps,
    )


BASE_EVAL_FILE = "base_eval.json"


def reduce_sum(accelerator, count: int) -> int:
    """The sum of a per-process counter over all processes. The tensor is made on the process group's device
    (`accelerator.device`): NCCL cannot reduce a CPU tensor (a multi-GPU run crashed here, after its epoch and
    before saving the adapter, and again on every resume)."""
    mine = torch.tensor(count, dtype=torch.long, device=accelerator.device)
    return int(accelerator.reduce(mine, reduction="sum").item())


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def _read_base_eval(run_dir: Path) -> dict[str, float]:
    try:
        data = json.loads((run_dir / BASE_EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    loss = data.get("base_eval_loss") if isinstance(data, dict) else None
    return {"base_eval_loss": float(loss)} if isinstance(loss, (int, float)) else {}


def _write_base_eval(run_dir: Path, base_eval: dict[str, float]) -> None:
    if "base_eval_loss" in base_eval:
        atomic_write_text(run_dir / BASE_EVAL_FILE, json.dumps({"base_eval_loss": base_eval["base_eval_loss"]}) + "\n")


def _final_eval(trainer) -> dict[str, float]:
    """The val loss of the trained adapter: the Trainer's own eval at the last step when it ran one (the
    weights have not changed since; an int8 eval pass costs as much as a few training steps), else a new one."""
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == state.global_step:
                return {"eval_loss": float(entry["eval_loss"])}
            break
    return trainer.evaluate()


def _ppl(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))
