"""LoRA adapters served unmerged over one base model, each row of a batch with its own adapter (or none).

PEFT loads the adapter folders (its key names, rank and alpha patterns, rsLoRA scaling); then the LoRA weights
are taken out of its layers and PEFT is unloaded. Each target linear layer becomes a `RowLoRALinear` holding every
served adapter: A stacked over all ranks, B side by side with each adapter's scaling folded in. One forward per
batch, whatever adapters its rows name:

- every row the base: the base layer alone (no LoRA work at all);
- every row one adapter: y = W x + B_k (A_k x), two small matmuls, the second adding into y in place;
- rows with different adapters: h = A_all x, masked per row to the columns of the row's own adapter (zeros for a
  base row), then y += B_all h: still two matmuls and one multiply per layer.

Why not PEFT's mixed-adapter batches (`adapter_names=`): per layer and forward they index-copy each adapter's rows,
run its LoRA, and scatter the result back, and even one adapter for every row goes through a loop of small
modules and dtype checks. Measured on the self-chat workload (benchmarks/selfchat_local.py, 1 thread), a 200-token
prefill cost 1.67x the base's CPU time through PEFT's mixed path and 1.04x through this one; a single-adapter
decode step, which PEFT gets right with one active adapter, costs the same here.

A stacked SDF folder (v2: a LoRA trained on top of a frozen first one) is one served adapter of rank r1 + r2:
its two A matrices stacked and its two B matrices side by side give exactly s1 B1 A1 x + s2 B2 A2 x.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from baize.errors import BaizeError

BASE = "__base__"  # a row without adapter


class _Rows:
    """What the current forward's rows use: None (all base), an adapter index (all rows one adapter), or a
    [rows, 1, total rank] mask (mixed). Shared by every wrapped layer of one model."""

    selection: None | int | torch.Tensor = None


class RowLoRALinear(nn.Module):
    """A frozen linear layer plus every served adapter's LoRA; which one applies to which row is in `rows`."""

    def __init__(self, base: nn.Linear, a: list[torch.Tensor], b: list[torch.Tensor], rows: _Rows) -> None:
        super().__init__()
        self.base_layer = base
        self.rows = rows
        weight = base.weight
        # Each adapter's own pair (the one-adapter path), contiguous; then all of them side by side (mixed rows).
        self.a = [t.to(weight.device, weight.dtype).contiguous() for t in a]
        self.b = [t.to(weight.device, weight.dtype).contiguous() for t in b]
        self.a_all = torch.cat(self.a, dim=0) if len(a) > 1 else self.a[0]
        self.b_all = torch.cat(self.b, dim=1) if len(b) > 1 else self.b[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        selection = self.rows.selection
        if selection is None:
            return y
        if isinstance(selection, int):
            h = F.linear(x, self.a[selection])
            b = self.b[selection]
        else:
            h = F.linear(x, self.a_all)
            h.mul_(selection if selection.device == h.device else selection.to(h.device))
            b = self.b_all
        # y += h @ b.T without another [tokens, out] temporary (y is this forward's own fresh tensor).
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t())
        return y


class MultiLoRA:
    """Adapters served by name over `model` (modified in place): `with loras.rows(names): model(...)`."""

    def __init__(self, model: nn.Module, adapters: dict[str, list[Path]]) -> None:
        """`adapters`: served name -> the adapter folders whose sum it is (one, or two for a stacked folder)."""
        self.names = list(adapters)
        self._rows = _Rows()
        self.model = self._install(model, adapters)
        ranks = self._ranks
        total = sum(ranks)
        # Row masks by adapter index (+1; 0 is the base): ones over the adapter's own columns of A_all.
        masks = torch.zeros((len(ranks) + 1, total), dtype=self._dtype, device=self._device)
        start = 0
        for i, rank in enumerate(ranks):
            masks[i + 1, start : start + rank] = 1
            start += rank
        self._masks = masks

    def _install(self, model: nn.Module, adapters: dict[str, list[Path]]) -> nn.Module:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        keys: list[list[str]] = []  # per served name, its PEFT adapter keys
        peft_model = model
        for i, folders in enumerate(adapters.values()):
            keys.append([])
            for j, folder in enumerate(folders):
                key = f"a{i}_{j}"
                if isinstance(peft_model, PeftModel):
                    peft_model.load_adapter(str(folder), adapter_name=key, is_trainable=False)
                else:
                    peft_model = PeftModel.from_pretrained(peft_model, str(folder), adapter_name=key, is_trainable=False)
                config = peft_model.peft_config[key]
                for feature in ("use_dora", "lora_bias"):
                    if getattr(config, feature, False):
                        raise BaizeError(f"{folder}: {feature} adapters are not served unmerged (merge it instead)")
                keys[-1].append(key)
        # Per wrapped layer and served adapter: (A, B) with the scaling folded into B, or None where that adapter
        # does not target the layer.
        found: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if not isinstance(module.get_base_layer(), nn.Linear):
                raise BaizeError(f"{name}: only LoRA on linear layers is served unmerged ({type(module).__name__})")
            pairs = []
            for served in keys:
                parts = [k for k in served if k in module.lora_A]
                if not parts:
                    pairs.append(None)
                    continue
                a = torch.cat([module.lora_A[k].weight.detach().float() for k in parts], dim=0)
                b = torch.cat([module.lora_B[k].weight.detach().float() * module.scaling[k] for k in parts], dim=1)
                pairs.append((a, b))
            found[name.removeprefix("base_model.model.")] = pairs
        model = peft_model.unload()  # the plain base model again, its layers unwrapped
        # One mask serves every layer, so each adapter gets the same columns everywhere: its largest rank, zero
        # rows of A and columns of B (which add nothing) where a layer has a smaller rank (rank_pattern) or none.
        self._ranks = [max((p[i][0].shape[0] for p in found.values() if p[i] is not None), default=1)
                       for i in range(len(keys))]
        for path, pairs in found.items():
            parent_name, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, leaf)
            a_list, b_list = [], []
            for rank, pair in zip(self._ranks, pairs):
                a = torch.zeros((rank, layer.in_features))
                b = torch.zeros((layer.out_features, rank))
                if pair is not None:
                    a[: pair[0].shape[0]] = pair[0]
                    b[:, : pair[1].shape[1]] = pair[1]
                a_list.append(a)
                b_list.append(b)
            setattr(parent, leaf, RowLoRALinear(layer, a_list, b_list, self._rows))
        weight = next(model.parameters())
        self._dtype, self._device = weight.dtype, weight.device
        return model

    @staticmethod
    def layers(model: nn.Module) -> list[RowLoRALinear]:
        return [m for m in model.modules() if isinstance(m, RowLoRALinear)]

    @contextmanager
    def rows(self, names: list[str]):
        """Within the block, the model's forward applies to row i the adapter `names[i]` (BASE: none)."""
        index = [0 if n == BASE else self.names.index(n) + 1 for n in names]
        if all(i == 0 for i in index):
            selection = None
        elif len(set(index)) == 1:
            selection = index[0] - 1
        else:
            selection = self._masks[torch.tensor(index, device=self._masks.device)].unsqueeze(1)
        self._rows.selection = selection
        try:
            yield
        finally:
            self._rows.selection = None
