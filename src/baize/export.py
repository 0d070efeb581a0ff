"""Merge a LoRA adapter into its base model and save a standalone Hugging Face folder.

The folder holds safetensors weights in bf16/fp16/fp32, config and generation config, the tokenizer with the
Baize chat template (`baize.chat_template`), and `baize_export.json` (where it came from). No PEFT is
needed to load it: `AutoModelForCausalLM.from_pretrained(folder)`, vLLM, or `transformers serve folder`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from baize.errors import BaizeError

EXPORT_META = "baize_export.json"


def export_merged(base: str | Path, adapter: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16",
                  force: bool = False) -> dict[str, Any]:
    """Merge `adapter` (folder or MLflow URI) into `base`; write `out_dir` atomically (temp folder, rename)."""
    import torch

    from baize import inference
    from baize.chat_template import set_baize_chat_template

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise BaizeError(f"{out_dir}: already exists (pass --force to replace it)")
    adapter_dir = inference.resolve_adapter(adapter)
    # Merge in float32: adding the LoRA product to bf16 weights would round it away for small updates.
    model, tokenizer = inference.load_model(base, adapter_dir, dtype="float32")
    merged = model.merge_and_unload()
    merged = merged.to({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype])
    merged.config.dtype = dtype

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        set_baize_chat_template(tokenizer)
        tokenizer.save_pretrained(str(tmp))
        meta_file = adapter_dir / "baize_adapter.json"
        info = {
            "base": str(base),
            "adapter": str(adapter),
            "dtype": dtype,
            "num_parameters": sum(p.numel() for p in merged.parameters()),
            "stop_strings": list(inference.STOP_STRINGS),
            "adapter_meta": json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else None,
        }
        (tmp / EXPORT_META).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
