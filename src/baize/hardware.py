"""What the machine computes natively, for the `auto` precision settings of training and generation."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (Intel AMX, or AVX512-BF16): there bf16 matmuls run faster
    than fp32 ones, so `auto` picks bf16 (elsewhere bf16 is emulated and slower)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in probes)
