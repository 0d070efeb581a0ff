"""Where models run and in which dtype: the one place that decides it, for every stage and command.

- Device: CUDA when available (the process's own GPU under `accelerate launch`), else Apple MPS where usable,
  else the CPU (the default on the offline machine, where nothing changes: float32 and the `auto` rules below).
  `BAIZE_DEVICE=cpu|cuda|mps` overrides the choice (e.g. keep a GPU free for another job).
- Dtype of a `*dtype` param set to `auto`: bf16 on GPUs that compute it natively, fp16 on older ones and on MPS
  (bf16 there needs macOS 14 and is not in every kernel; training's autocast stays off on MPS), on the CPU bf16
  only with native bf16 matmuls (AMX / AVX512-BF16), else float32. An explicit dtype is always kept.
- int8 (bitsandbytes) frozen bases: the weights are placed at load time, on this process's GPU.
- Models that do not fit one GPU: `device_map="auto"` (accelerate spreads the layers over the visible GPUs, and
  the CPU after them), chosen automatically when the weights in the target dtype exceed 90% of the first GPU's
  free memory and there is more than one GPU (see `placement`).

Each stage records the result (`Placement.tags()`: `baize.device`, `baize.dtype`) in its MLflow run and its
run.json (machine-dependent, so not in the DVC-tracked reports: the same inputs give the same outputs on the CPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from baize.errors import BaizeError, ParamsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_ENV = "BAIZE_DEVICE"
FIT_FRACTION = 0.9
"""Share of one GPU's free memory the weights may take before `device_map="auto"` spreads them (the rest: the
KV cache / activations)."""


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (Intel AMX, or AVX512-BF16): there bf16 matmuls run faster
    than fp32 ones, so `auto` picks bf16 (elsewhere bf16 is emulated and slower)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in probes)


def mps_usable() -> bool:
    backends = getattr(torch, "backends", None)
    mps = getattr(backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def device_type() -> str:
    """`cuda`, `mps` or `cpu`: the accelerator this process computes on (`BAIZE_DEVICE` overrides)."""
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced:
        if forced not in ("cpu", "cuda", "mps"):
            raise ParamsError(f"{DEVICE_ENV}={forced!r}: expected cpu, cuda or mps")
        if forced == "cuda" and not torch.cuda.is_available():
            raise BaizeError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device (a CPU build of torch?)")
        if forced == "mps" and not mps_usable():
            raise BaizeError(f"{DEVICE_ENV}=mps but MPS is not available on this machine")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if mps_usable():
        return "mps"
    return "cpu"


def device() -> torch.device:
    """The torch device of this process: under `accelerate launch` / torchrun each process its own GPU
    (LOCAL_RANK), as accelerate's `PartialState` assigns it."""
    kind = device_type()
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device(kind)


def resolve_dtype(setting: str, kind: str | None = None) -> str:
    """A dtype name for `setting` (`auto` or a name of DTYPES) on the device type `kind` (default: this one's)."""
    if setting not in (*DTYPES, "auto"):
        raise ParamsError(f"dtype: {setting!r} is not one of auto, {', '.join(DTYPES)}")
    if setting != "auto":
        return setting
    kind = kind or device_type()
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "mps":
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def resolve_mixed_precision(setting: str) -> str:
    """`bf16`, `fp16` or `no`: `auto` picks what this machine computes natively (see TrainParams.mixed_precision)."""
    if setting != "auto":
        return setting
    kind = device_type()
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "mps":
        return "no"  # fp32 training on MPS: autocast there depends on the macOS and torch versions (inference: fp16)
    return "bf16" if cpu_has_native_bf16() else "no"


def weights_bytes(model_dir: str | Path, dtype: str) -> int:
    """Size of the model's weights once loaded in `dtype` (from the safetensors headers' element counts)."""
    import struct

    count = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                count += n
    return count * DTYPES[dtype].itemsize


def _needs_spreading(model_dir: str | Path | None, dtype: str) -> bool:
    if model_dir is None or torch.cuda.device_count() < 2:
        return False
    free, _total = torch.cuda.mem_get_info(0)
    return weights_bytes(model_dir, dtype) > FIT_FRACTION * free


@dataclass(frozen=True)
class Placement:
    """Where one model is loaded: `device` (str, e.g. `cpu`, `cuda:0`), `dtype` (a name of DTYPES) and the
    `device_map` handed to `from_pretrained` (None on the CPU: the plain load, byte for byte today's)."""

    device: str
    dtype: str
    device_map: Any = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def input_device(self) -> torch.device:
        """Where input tensors go: the device of the first layers (the embeddings) under a spread model."""
        if self.device_map == "auto":
            return torch.device("cuda", 0)
        return torch.device(self.device)

    def load_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keywords: the dtype, and on an accelerator the device the weights are loaded onto
        (directly, not through a CPU copy: a 7B model in fp32 would not fit the RAM of many GPU machines)."""
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs

    def tags(self) -> dict[str, str]:
        """MLflow tags naming what was used."""
        return {"baize.device": "auto (spread over GPUs)" if self.device_map == "auto" else self.device,
                "baize.dtype": self.dtype}

    def run_keys(self) -> dict[str, str]:
        """The same for a stage's run.json (machine-dependent: not in its DVC-tracked report.json, which the
        inputs alone decide)."""
        tags = self.tags()
        return {"device": tags["baize.device"], "dtype": tags["baize.dtype"]}


def placement(dtype: str = "auto", model_dir: str | Path | None = None) -> Placement:
    """Device, dtype (`dtype` resolved, see `resolve_dtype`) and device_map for loading `model_dir` here."""
    dev = device()
    name = resolve_dtype(dtype, dev.type)
    if dev.type == "cpu":
        return Placement("cpu", name, None)
    if dev.type == "cuda" and _needs_spreading(model_dir, name):
        return Placement(str(dev), name, "auto")
    return Placement(str(dev), name, {"": str(dev)})


def int8_device_map() -> dict | None:
    """bitsandbytes wants int8 weights placed at load time: this process's GPU (one per process under DDP);
    None on the CPU (bitsandbytes' CPU backend) where the model stays put."""
    if device_type() == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def input_device(model) -> torch.device:
    """Where a model's inputs go: its (first) device; the embeddings' under a model spread over GPUs."""
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def check_remote_code(model_dir: str | Path) -> None:
    """Loaders after `base_model` never run a model's own Python code: a folder whose model or tokenizer needs it
    (`auto_map` in config.json / tokenizer_config.json) is refused with one line instead of transformers' long
    error. (`model.trust_remote_code` lets the base_model stage run such code; training and inference load
    transformers' built-in architectures only, whatever that param says.)"""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(model_dir) / name).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # the loader's own check reports a missing or broken file
        if auto_map:
            raise BaizeError(
                f"{model_dir}: this model needs its own Python code ({name} auto_map), which baize runs only in "
                "the base_model stage (model.trust_remote_code); use a model of a transformers architecture"
            )
