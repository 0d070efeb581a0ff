"""A briefly trained LoRA adapter and a tokenized val split, for the evaluate/chat/export tests.

Built like the pipeline's own outputs (peft LoRA r=8/alpha=16 on q,k,v,gate,up,down; `baize.tokenization`
labels in ai_only mode; `datasets.save_to_disk`), trained for a few CPU steps on Baize-format text, and cached
under .pytest_cache (keyed by VERSION) so the test sessions after the first reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

VERSION = "v3"
ROOT = Path(__file__).resolve().parents[1]

TOPICS = [
    "tea", "rivers", "chess", "bicycles", "volcanoes", "bread", "owls", "glass", "maps", "kites", "honey", "tides",
    "clocks", "salt", "comets", "bridges", "ferns", "violins", "deserts", "paper", "magnets", "lanterns",
    "coral", "wool",
]


def transcripts():
    from baize.transcript import Transcript, Turn

    out = []
    for topic in TOPICS:
        turns = [
            Turn(role="human", text=f"Tell me about {topic}."),
            Turn(role="ai", text=f"Sure! {topic.capitalize()} are a fine subject. Here is a short answer about {topic}."),
        ]
        out.append(Transcript.create(seed=f"Tell me about {topic}.", turns=turns, source="test"))
    return out


def _tokenized(tokenizer, items):
    from baize.formats import render_training
    from baize.tokenization import tokenize_texts

    cols = tokenize_texts(tokenizer, [render_training(t) for t in items], "ai_only", 128)
    return {"input_ids": cols["input_ids"], "labels": cols["labels"], "length": cols["length"],
            "id": [t.id for t in items]}


def build(base_dir: Path, out: Path, steps: int = 12) -> None:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baize.chat_template import set_baize_chat_template

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    items = transcripts()
    train, val = items[:16], items[16:]
    train_cols = _tokenized(tok, train)

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    ))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        idx = [(step * 4 + j) % len(train) for j in range(4)]
        width = max(len(train_cols["input_ids"][i]) for i in idx)
        ids = torch.full((4, width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((4, width), -100, dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for j, i in enumerate(idx):
            n = len(train_cols["input_ids"][i])
            ids[j, :n] = torch.tensor(train_cols["input_ids"][i])
            labels[j, :n] = torch.tensor(train_cols["labels"][i])
            mask[j, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter = tmp / "adapter"
    model.save_pretrained(str(adapter), safe_serialization=True)
    set_baize_chat_template(tok)
    tok.save_pretrained(str(adapter))
    (adapter / "baize_adapter.json").write_text(json.dumps({"params": {"steps": steps}}))
    datasets.Dataset.from_dict(_tokenized(tok, val)).save_to_disk(str(tmp / "tokenized" / "val"))
    datasets.Dataset.from_dict(train_cols).save_to_disk(str(tmp / "tokenized" / "train"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def tiny_adapter(base_dir: Path) -> Path:
    """Folder with `adapter/` (PEFT LoRA + tokenizer + baize_adapter.json) and `tokenized/{train,val}`."""
    from filelock import FileLock

    out = ROOT / ".pytest_cache" / f"baize-eval-adapter-{VERSION}"
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):  # pytest-xdist workers: one trains it, the others wait
        if not (out / "adapter" / "adapter_model.safetensors").is_file():
            build(base_dir, out)
    return out
