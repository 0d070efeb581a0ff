"""Validated transcripts -> tokenized Baize training samples with loss labels, split into train/val.

One transcript is one sample: its exact Baize training text (`baize.formats.render_training`, with the
transcript's own preamble when it was imported with one), tokenized with the base tokenizer (a BOS is added
when the tokenizer adds one; no EOS: every AI turn already ends with the `[|Human|]` marker, which is the
stop signal, and the reference `finetune.py` never added one), cut to `max_length` tokens. No padding: the
trainer pads each batch dynamically.

Labels (-100 = no loss):
- `all` (Baize v1): every token except a leading BOS.
- `ai_only` (Baize v1.5): the tokens of each AI turn's " {answer}\\n[|Human|]", i.e. the answer plus the
  marker that ends it, so the model learns to stop. Turn spans are found in characters on the rendered text
  and mapped to tokens with the tokenizer's offsets: a token is trained when it overlaps a span (the rule of
  `apply_chat_template(return_assistant_tokens_mask=True)`, whose `{% generation %}` blocks in our chat
  template cover the same spans). The human turns, the `[|AI|]` markers and the preamble are not trained.

A sample left with no loss target after the cut (ai_only, a first human turn longer than `max_length`) is
dropped and counted: a batch of such samples would make the loss 0/0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from baize.errors import BaizeError, InputError, ParamsError
from baize.formats import AI, HUMAN, PREAMBLE, TrainingFormatError, render_training
from baize.transcript import Transcript, read_jsonl

IGNORE_INDEX = -100
LossMode = Literal["all", "ai_only"]
LOSS_MODES: tuple[str, ...] = ("all", "ai_only")

TRAIN_DIR, VAL_DIR, TOKENIZER_DIR = "train", "val", "tokenizer"


# --------------------------------------------------------------------------------------------- text and spans


def render(transcript: Transcript) -> str:
    """The exact Baize training text of a transcript (its imported preamble kept, e.g. the Korean release's)."""
    return render_training(transcript.turns, preamble=transcript.meta.get("preamble", PREAMBLE))


def trained_char_spans(text: str, loss: LossMode) -> list[tuple[int, int]]:
    """[start, end) character spans of `text` (a rendered training text) that carry the loss.

    ai_only: from just after each `[|AI|]` (its space included) to the end of the next `[|Human|]`.
    render_training refuses marker text inside turns, so every marker found here is a real turn boundary.
    """
    if loss == "all":
        return [(0, len(text))]
    if loss != "ai_only":
        raise ParamsError(f"tokenize.loss = {loss!r}: expected one of {', '.join(LOSS_MODES)}")
    spans = []
    for m in re.finditer(re.escape(AI), text):
        end = text.find(HUMAN, m.end())
        if end < 0:  # not produced by render_training, which always closes an AI turn with [|Human|]
            raise TrainingFormatError(f"{AI} at character {m.start()} is not followed by {HUMAN}")
        spans.append((m.end(), end + len(HUMAN)))
    return spans


def labels_for(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
    special: Sequence[int],
) -> list[int]:
    """Token ids where a token overlaps a span, IGNORE_INDEX elsewhere and on added special tokens (BOS)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    s = 0
    for i, (start, end) in enumerate(offsets):
        if special[i]:
            continue
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:  # overlaps [span start, span end)
            labels[i] = input_ids[i]
    return labels


def count_targets(labels: Sequence[int]) -> int:
    """Tokens the loss is computed on: labels != -100, position 0 excluded (the causal shift never predicts it)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


# --------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir: str | os.PathLike):
    """The base model's tokenizer from a local folder (never remote code); must be a fast tokenizer (offsets)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BaizeError(f"{model_dir}: no such model folder (run the base_model stage first)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise BaizeError(f"{model_dir}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise BaizeError(f"{model_dir}: the tokenizer has no character offsets (not a fast tokenizer)")
    return tokenizer


def tokenize_texts(tokenizer, texts: list[str], loss: LossMode, max_length: int) -> dict[str, list]:
    """Tokenize rendered texts, cut to `max_length`, build labels.

    Returns columns input_ids, labels, length (after the cut), full_length (before), truncated, and
    targets (tokens that carry the loss, see `count_targets`).
    """
    enc = tokenizer(
        texts,
        add_special_tokens=True,  # BOS when the tokenizer adds one (LLaMA); SmolLM2 adds none
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        truncation=False,  # we cut below, so the untruncated length is known for the metrics
        verbose=False,  # no "longer than model_max_length" warning: we cut ourselves
    )
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "full_length", "truncated", "targets")}
    for text, ids, offsets, special in zip(
        texts, enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True
    ):
        labels = labels_for(ids, offsets, trained_char_spans(text, loss), special)
        full_length = len(ids)
        ids, labels = list(ids[:max_length]), labels[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["full_length"].append(full_length)
        out["truncated"].append(full_length > max_length)
        out["targets"].append(count_targets(labels))
    return out


# --------------------------------------------------------------------------------------------- transcripts


def _record_lines(path: Path) -> Iterable[int]:
    """Line numbers of the records `read_jsonl` yields (it skips blank lines), for file:line messages."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.decode("utf-8", errors="replace").strip():
                yield lineno


def render_file(path: str | os.PathLike) -> tuple[list[str], list[str], int]:
    """(ids, texts, duplicates dropped) for a transcripts JSONL file.

    A transcript whose text would not render exactly (marker text such as "[|AI|]" inside a turn, turns
    that do not alternate) stops everything with file:line and the reason: mis-splitting it into forged
    turns would silently train garbage. Validation should already have rejected it. A repeated id (same
    seed and turns) is kept once, so the same transcript cannot land in both train and val.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "no such file (run the validate stage first)")
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    for lineno, transcript in zip(_record_lines(path), read_jsonl(path)):
        try:
            text = render(transcript)
        except TrainingFormatError as exc:
            raise InputError(path, lineno, f"transcript {transcript.id}: {exc}") from None
        if transcript.id in seen:
            duplicates += 1
            continue
        seen.add(transcript.id)
        ids.append(transcript.id)
        texts.append(text)
    if not ids:
        raise InputError(path, None, "no transcripts to tokenize")
    return ids, texts, duplicates


# --------------------------------------------------------------------------------------------- split


def val_count(n: int, val_size: float | int) -> int:
    """Held-out sample count: a fraction (0 < f < 1, rounded up as `datasets` does) or a count.

    Both splits must keep at least one sample; otherwise a clear error, not an empty split.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, int | float) or val_size <= 0:
        raise ParamsError(f"tokenize.val_size = {val_size!r}: must be a fraction in (0, 1) or a count >= 1")
    if isinstance(val_size, float):
        if val_size >= 1:
            raise ParamsError(f"tokenize.val_size = {val_size!r}: a fraction must be < 1 (write a count as an integer)")
        k = math.ceil(val_size * n)
    else:
        k = val_size
    if n < 2 or not 1 <= k <= n - 1:
        raise BaizeError(
            f"tokenize.val_size = {val_size!r} gives {k} validation and {max(n - k, 0)} train samples out of {n}; "
            "each split needs at least 1 (change val_size or make more transcripts)"
        )
    return k


# --------------------------------------------------------------------------------------------- the whole stage


@dataclass(frozen=True)
class TokenizedSplits:
    train: Any  # datasets.Dataset
    val: Any
    dropped_no_targets: int
    duplicates: int


SAVED_COLUMNS = ("id", "input_ids", "labels", "length")


def _fingerprint(*parts: Any) -> str:
    """Content-derived `datasets` fingerprint: same inputs -> byte-identical output folders (stable DVC hashes)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build(
    ids: list[str],
    texts: list[str],
    tokenizer,
    *,
    loss: LossMode,
    max_length: int,
    val_size: float | int,
    seed: int,
    duplicates: int = 0,
) -> TokenizedSplits:
    """Tokenize (`datasets.map`), drop samples without targets, split train/val with a fixed seed."""
    import datasets

    if max_length < 2:
        raise ParamsError(f"tokenize.max_length = {max_length!r}: must be at least 2")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "full_length": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "targets": datasets.Value("int32"),
        }
    )
    fp = _fingerprint(ids, texts, loss, max_length, val_size, seed, _tokenizer_digest(tokenizer))
    raw = datasets.Dataset.from_dict({"id": ids, "text": texts})
    tokenized = raw.map(
        lambda batch: tokenize_texts(tokenizer, batch["text"], loss, max_length),
        batched=True,
        batch_size=256,
        remove_columns=["text"],
        features=features,
        new_fingerprint=f"{fp}-map",
        desc="tokenize",
    )
    kept = tokenized.filter(lambda t: t > 0, input_columns="targets", new_fingerprint=f"{fp}-filter")
    dropped = len(tokenized) - len(kept)
    k = val_count(len(kept), val_size)
    parts = kept.train_test_split(
        test_size=k,
        shuffle=True,
        seed=seed,
        train_new_fingerprint=f"{fp}-train",
        test_new_fingerprint=f"{fp}-val",
    )
    return TokenizedSplits(parts["train"], parts["test"], dropped, duplicates)


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual sample length, not an interpolation)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def metrics(splits: TokenizedSplits, *, loss: str, max_length: int) -> dict[str, Any]:
    """Samples, tokens, trained tokens (loss targets), truncated share, length percentiles (after the cut)."""
    out: dict[str, Any] = {"loss": loss, "max_length": max_length}
    cols = {}
    for name, ds in (("train", splits.train), ("val", splits.val)):
        cols[name] = {c: list(ds[c]) for c in ("length", "full_length", "truncated", "targets")}
    every = {c: cols["train"][c] + cols["val"][c] for c in cols["train"]}
    samples = len(every["length"])
    lengths = sorted(every["length"])
    tokens = sum(lengths)
    trained = sum(every["targets"])
    out["samples"] = {
        "train": len(cols["train"]["length"]),
        "val": len(cols["val"]["length"]),
        "total": samples,
        "dropped_no_targets": splits.dropped_no_targets,
        "duplicates_dropped": splits.duplicates,
    }
    out["tokens"] = {"train": sum(cols["train"]["length"]), "val": sum(cols["val"]["length"]), "total": tokens}
    out["trained_tokens"] = {
        "train": sum(cols["train"]["targets"]),
        "val": sum(cols["val"]["targets"]),
        "total": trained,
    }
    out["trained_share"] = round(trained / tokens, 4) if tokens else 0.0
    out["truncated_share"] = round(sum(every["truncated"]) / samples, 4) if samples else 0.0
    out["length"] = {f"p{q}": _percentile(lengths, q) for q in (50, 90, 99)}
    out["length"]["max"] = lengths[-1] if lengths else 0
    out["length"]["mean"] = round(tokens / samples, 1) if samples else 0.0
    full = sorted(every["full_length"])
    out["untruncated_length"] = {"p50": _percentile(full, 50), "p99": _percentile(full, 99), "max": full[-1]}
    return out


def save(splits: TokenizedSplits, tokenizer, out_dir: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
    """Write `train/` and `val/` (datasets `save_to_disk`), `tokenizer/` (with the Baize chat template) and
    `info.json` into `out_dir`, atomically: built in a sibling temp folder, then swapped in."""
    from baize.chat_template import set_baize_chat_template

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the output is an ordinary shared folder
        for name, ds in ((TRAIN_DIR, splits.train), (VAL_DIR, splits.val)):
            extra = [c for c in ds.column_names if c not in SAVED_COLUMNS]
            ds = ds.remove_columns(extra, new_fingerprint=f"{ds._fingerprint}-save")
            ds.save_to_disk(str(tmp / name))
        set_baize_chat_template(tokenizer).save_pretrained(str(tmp / TOKENIZER_DIR))
        (tmp / "info.json").write_text(json.dumps(info or {}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize_transcripts(
    transcripts: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    loss: LossMode = "ai_only",
    max_length: int = 512,
    val_size: float | int = 0.2,
    seed: int = 42,
) -> dict[str, Any]:
    """The `tokenize` stage without DVC/MLflow: read, render, tokenize, split, save; returns the metrics."""
    ids, texts, duplicates = render_file(transcripts)
    tokenizer = load_tokenizer(model_dir)
    splits = build(
        ids, texts, tokenizer, loss=loss, max_length=max_length, val_size=val_size, seed=seed, duplicates=duplicates
    )
    result = metrics(splits, loss=loss, max_length=max_length)
    info = {
        "format": "baize-training-text",
        "loss": loss,
        "max_length": max_length,
        "ignore_index": IGNORE_INDEX,
        "columns": list(SAVED_COLUMNS),
        "bos_added": tokenizer.bos_token_id is not None and splits.train[0]["input_ids"][0] == tokenizer.bos_token_id,
        "eos_added": False,
        "samples": result["samples"],
    }
    save(splits, tokenizer, out_dir, info)
    return result
