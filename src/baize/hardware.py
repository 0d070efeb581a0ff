"""What the machine computes natively, for the `auto` precision settings of training and generation."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (Intel AMX, or AVX512-BF16): there bf16 matmuls run faster
    than fp32 ones, so `auto` picks bf16 (elsewhere bf16 is emulated and slower)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in probes)


def resolve_mixed_precision(setting: str) -> str:
    """`bf16`, `fp16` or `no`: `auto` picks what this machine computes natively (see TrainParams.mixed_precision)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "no"
