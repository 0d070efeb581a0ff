"""Validated transcripts -> tokenized Baize training samples with loss labels, split into train/val.

One transcript is one sample: its exact Baize training text (`baize.formats.render_training`, with the
transcript's own preamble when it was imported with one), tokenized with the base tokenizer (a BOS is added
when the tokenizer adds one; no EOS: every AI turn already ends with the `[|Human|]` marker, which is the
stop signal, and the reference `finetune.py` never added one). No padding: the trainer pads each batch
dynamically.

Labels (-100 = no loss):
- `all` (Baize v1): every token except a leading BOS.
- `ai_only` (Baize v1.5): the tokens of each AI turn's " {answer}\\n[|Human|]", i.e. the answer plus the
  marker that ends it, so the model learns to stop. Turn spans are found in characters on the rendered text
  and mapped to tokens with the tokenizer's offsets: a token is trained when it overlaps a span (the rule of
  `apply_chat_template(return_assistant_tokens_mask=True)`, whose `{% generation %}` blocks in our chat
  template cover the same spans). The human turns, the `[|AI|]` markers and the preamble are not trained.

A truthful stop signal. The "\\n[|Human|]" after an AI answer teaches the model that the answer is finished,
so it is never trained after an answer that was CUT (in both loss modes; the answer's own text is still
trained, and a token that touches such a marker is not trained at all):
- cut by the self-chat generator's max_tokens and kept (`meta["truncated_turns"]`, indices into `turns`);
- cut by `max_length`. With `keep_truncated: false` (default) a longer sample is cut right after the
  closing `[|Human|]` of the last AI turn that fits whole, so its last trained token is a real stop
  marker; the pairs after it are dropped and counted (`pairs_dropped_at_max_length`), and a sample where
  not even the first answer and its marker fit is dropped and counted (`samples.dropped_too_long`). With
  `keep_truncated: true` the sample is cut at exactly `max_length` tokens (the v1 recipe) and no marker
  token after the last complete marker is trained, also when the cut falls inside the marker
  (`answers_cut_at_max_length`).

Turn text that spells a special token ("<|im_end|>", "</s>", ...) is tokenized as ordinary text
(`split_special_tokens=True`): otherwise a chat transcript quoting one would put a real end-of-turn or
end-of-text id into the training data (`special_token_text` counts such samples).

The chat template's assistant mask equals the `ai_only` labels for transcripts without cut turns, that fit
`max_length` and spell no special token; the template does not know about cut turns (it has no meta) nor
split special tokens (`apply_chat_template` does not), and it need not: training uses these labels.

A sample left with no loss target after the cut (ai_only with `keep_truncated: true`, a first human turn
longer than `max_length`) is dropped and counted: a batch of such samples would make the loss 0/0.
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
from typing import Any, Literal, NamedTuple

from baize.base_model import clean_tokenizer_config
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


def ai_turn_spans(text: str) -> list[tuple[int, int, int]]:
    """(answer_start, marker_start, marker_end) of each AI turn of a rendered training text, in characters.

    [answer_start, marker_start) is " {answer}" (from just after `[|AI|]`, its space included) and
    [marker_start, marker_end) is the "\\n[|Human|]" that ends it: the stop signal. render_training refuses
    marker text inside turns, so every marker found here is a real turn boundary.
    """
    out = []
    for m in re.finditer(re.escape(AI), text):
        end = text.find(HUMAN, m.end())
        if end < 0 or text[end - 1] != "\n":  # not produced by render_training
            raise TrainingFormatError(f"{AI} at character {m.start()} is not followed by \\n{HUMAN}")
        out.append((m.end(), end - 1, end + len(HUMAN)))
    return out


def trained_char_spans(text: str, loss: LossMode, cut_answers: Iterable[int] = ()) -> list[tuple[int, int]]:
    """[start, end) character spans of `text` (a rendered training text) that carry the loss.

    ai_only: from just after each `[|AI|]` (its space included) to the end of the next `[|Human|]`; for the
    answers in `cut_answers` (0-based among the AI turns) only to the end of the answer: a cut answer's
    end marker is never trained (see `stop_marker_spans`, which `all` needs too).
    """
    if loss == "all":
        return [(0, len(text))]
    if loss != "ai_only":
        raise ParamsError(f"tokenize.loss = {loss!r}: expected one of {', '.join(LOSS_MODES)}")
    cut = set(cut_answers)
    return [(a, ms if k in cut else me) for k, (a, ms, me) in enumerate(ai_turn_spans(text))]


def _overlapping(
    offsets: Sequence[tuple[int, int]], special: Sequence[int], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """Per token: does it overlap one of `spans` (sorted, disjoint)? Added special tokens (BOS) never do."""
    hit = [False] * len(offsets)
    s = 0
    for i, (start, end) in enumerate(offsets):
        if special[i]:
            continue
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:  # overlaps [span start, span end)
            hit[i] = True
    return hit


def labels_for(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
    special: Sequence[int],
    untrained: Sequence[tuple[int, int]] = (),
) -> list[int]:
    """Token ids where a token overlaps a span, IGNORE_INDEX elsewhere and on added special tokens (BOS).

    A token overlapping one of `untrained` (stop markers after cut answers) is IGNORE_INDEX even when it
    also overlaps a trained span: no part of such a marker may be learned.
    """
    trained = _overlapping(offsets, special, spans)
    banned = _overlapping(offsets, special, untrained) if untrained else [False] * len(offsets)
    return [t if ok and not no else IGNORE_INDEX for t, ok, no in zip(input_ids, trained, banned, strict=True)]


def _tokens_before(offsets: Sequence[tuple[int, int]], special: Sequence[int], positions: Sequence[int]) -> list[int]:
    """For each character position p (ascending): how many tokens there are up to the last (non-special)
    token that starts before p, i.e. the token count of the shortest prefix that covers text[:p]."""
    out: list[int] = []
    last = k = 0
    for i, (start, _end) in enumerate(offsets):
        if special[i]:
            continue
        while k < len(positions) and start >= positions[k]:
            out.append(last)
            k += 1
        last = i + 1
    out += [last] * (len(positions) - k)
    return out


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


def special_token_spellings(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (BOS/EOS/chat markers and added special tokens)."""
    names = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    return sorted((n for n in names if n), key=lambda n: (-len(n), n))


TOKENIZED_COLUMNS = (
    "input_ids",
    "labels",
    "length",
    "full_length",
    "truncated",
    "targets",
    "too_long",
    "pairs_dropped",
    "rounds",
    "answer_cut",
    "selfchat_cut",
    "special_text",
)


def tokenize_texts(
    tokenizer,
    texts: list[str],
    loss: LossMode,
    max_length: int,
    *,
    cut_turns: Sequence[Sequence[int]] | None = None,
    keep_truncated: bool = False,
) -> dict[str, list]:
    """Tokenize rendered texts, cut to `max_length`, build labels.

    `cut_turns`: per text, the turn indices (into the transcript's turns, as in `meta["truncated_turns"]`)
    of AI answers cut at self-chat time: their stop marker is not trained. `keep_truncated`: see the module
    docstring. Special-token spellings in the text stay ordinary text (`split_special_tokens=True`).

    Returns columns input_ids, labels, length (after the cut), full_length (before), truncated (longer than
    max_length), targets (tokens that carry the loss, see `count_targets`), too_long (nothing fits: the
    sample must be dropped; its input_ids are empty), pairs_dropped (human/AI pairs with no answer token
    left after the cut), answer_cut (an answer cut by max_length is kept without its stop marker),
    selfchat_cut (answers of `cut_turns` in the sample) and special_text (the text spells a special token).
    """
    if cut_turns is not None and len(cut_turns) != len(texts):
        raise ValueError(f"cut_turns has {len(cut_turns)} entries for {len(texts)} texts")
    enc = tokenizer(
        texts,
        add_special_tokens=True,  # BOS when the tokenizer adds one (LLaMA); SmolLM2 adds none
        split_special_tokens=True,  # "<|im_end|>" typed in a turn is text, never the special token
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        truncation=False,  # we cut below, so the untruncated length is known for the metrics
        verbose=False,  # no "longer than model_max_length" warning: we cut ourselves
    )
    spellings = special_token_spellings(tokenizer)
    spelled = re.compile("|".join(map(re.escape, spellings))) if spellings else None
    out: dict[str, list] = {k: [] for k in TOKENIZED_COLUMNS}
    for n, (text, ids, offsets, special) in enumerate(
        zip(texts, enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
    ):
        turns = ai_turn_spans(text)
        cut = _cut_answers(cut_turns[n] if cut_turns is not None else (), len(turns))
        full_length = len(ids)
        # tokens needed to hold each answer's stop marker whole, and the tokens before each answer
        closes = _tokens_before(offsets, special, [me for _, _, me in turns])
        opens = _tokens_before(offsets, special, [a for a, _, _ in turns])
        too_long = False
        if full_length <= max_length:
            keep = full_length
        elif keep_truncated:
            keep = max_length
        else:
            fitting = sum(1 for c in closes if c <= max_length)
            too_long = fitting == 0
            keep = 0 if too_long else closes[fitting - 1]
        untrained = [(ms, me) for k, (_, ms, me) in enumerate(turns) if k in cut or closes[k] > keep]
        labels = labels_for(ids, offsets, trained_char_spans(text, loss, cut), special, untrained)
        ids, labels = list(ids[:keep]), labels[:keep]
        dropped = sum(1 for o in opens if o >= keep)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["full_length"].append(full_length)
        out["truncated"].append(full_length > max_length)
        out["targets"].append(count_targets(labels))
        out["too_long"].append(too_long)
        out["pairs_dropped"].append(dropped)
        out["rounds"].append(len(turns) - dropped)  # human/AI pairs with at least one answer token in the sample
        out["answer_cut"].append(any(o < keep < c for o, c in zip(opens, closes)))
        out["selfchat_cut"].append(sum(1 for k in cut if opens[k] < keep))
        out["special_text"].append(bool(spelled and spelled.search(text)))
    return out


def _cut_answers(turn_indices: Iterable[int], n_answers: int) -> set[int]:
    """Turn indices of cut AI turns -> their 0-based positions among the AI turns (turns alternate h, ai)."""
    out = set()
    for i in turn_indices:
        if isinstance(i, bool) or not isinstance(i, int) or i % 2 != 1 or not 0 < i < 2 * n_answers:
            raise TrainingFormatError(f"cut turn {i!r} is not the index of an AI turn (1, 3, ... < {2 * n_answers})")
        out.add(i // 2)
    return out


# --------------------------------------------------------------------------------------------- transcripts


def _record_lines(path: Path) -> Iterable[int]:
    """Line numbers of the records `read_jsonl` yields (it skips blank lines), for file:line messages."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.decode("utf-8", errors="replace").strip():
                yield lineno


class RenderedFile(NamedTuple):
    ids: list[str]
    texts: list[str]
    cut_turns: list[list[int]]  # per sample: indices of AI turns cut by the self-chat generator (sorted)
    duplicates: int


def cut_turns_of(transcript: Transcript) -> list[int]:
    """`meta["truncated_turns"]`: the AI turns the self-chat generator cut at max_tokens and kept (sorted).

    A missing key, or a value that is not a list (e.g. null), means none. A list must hold integer indices
    of AI turns; anything else raises TrainingFormatError (a wrong index would train a cut answer's stop
    marker, or hide a complete one's).
    """
    value = transcript.meta.get("truncated_turns")
    if not isinstance(value, list):
        return []
    turns = transcript.turns
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TrainingFormatError(f"meta.truncated_turns: {i!r} is not a turn index")
        if not 0 <= i < len(turns) or turns[i].role != "ai":
            raise TrainingFormatError(
                f"meta.truncated_turns: {i} is not the index of an AI turn ({len(turns)} turns, AI at 1, 3, ...)"
            )
    return sorted(set(value))


def render_file(path: str | os.PathLike) -> RenderedFile:
    """(ids, texts, cut_turns, duplicates dropped) for a transcripts JSONL file.

    A transcript whose text would not render exactly (marker text such as "[|AI|]" inside a turn, turns
    that do not alternate) or whose `meta.truncated_turns` does not name AI turns (`cut_turns_of`) stops
    everything with file:line and the reason: mis-splitting it into forged turns would silently train
    garbage. Validation should already have rejected it. A repeated id (same seed and turns) is kept once,
    so the same transcript cannot land in both train and val.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "no such file (run the validate stage first)")
    ids: list[str] = []
    texts: list[str] = []
    cut_turns: list[list[int]] = []
    seen: set[str] = set()
    duplicates = 0
    for lineno, transcript in zip(_record_lines(path), read_jsonl(path)):
        try:
            text = render(transcript)
            cut = cut_turns_of(transcript)
        except TrainingFormatError as exc:
            raise InputError(path, lineno, f"transcript {transcript.id}: {exc}") from None
        if transcript.id in seen:
            duplicates += 1
            continue
        seen.add(transcript.id)
        ids.append(transcript.id)
        texts.append(text)
        cut_turns.append(cut)
    if not ids:
        raise InputError(path, None, "no transcripts to tokenize")
    return RenderedFile(ids, texts, cut_turns, duplicates)


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
    dropped_too_long: int = 0  # keep_truncated false: not even the first answer and its stop marker fit


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
    cut_turns: list[list[int]] | None = None,
    keep_truncated: bool = False,
) -> TokenizedSplits:
    """Tokenize (`datasets.map`), drop samples too long or without targets, split train/val with a fixed seed.

    `cut_turns` (per sample, from `render_file`) and `keep_truncated`: see `tokenize_texts`.
    """
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
            "too_long": datasets.Value("bool"),
            "pairs_dropped": datasets.Value("int32"),
            "rounds": datasets.Value("int32"),
            "answer_cut": datasets.Value("bool"),
            "selfchat_cut": datasets.Value("int32"),
            "special_text": datasets.Value("bool"),
        }
    )
    if cut_turns is None:
        cut_turns = [[] for _ in ids]
    fp = _fingerprint(
        ids, texts, cut_turns, loss, max_length, keep_truncated, val_size, seed, _tokenizer_digest(tokenizer)
    )
    raw = datasets.Dataset.from_dict(
        {"id": ids, "text": texts, "cut_turns": cut_turns},
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "text": datasets.Value("string"),
                "cut_turns": datasets.Sequence(datasets.Value("int32")),
            }
        ),
    )
    tokenized = raw.map(
        lambda batch: tokenize_texts(
            tokenizer,
            batch["text"],
            loss,
            max_length,
            cut_turns=batch["cut_turns"],
            keep_truncated=keep_truncated,
        ),
        batched=True,
        batch_size=256,
        remove_columns=["text", "cut_turns"],
        features=features,
        new_fingerprint=f"{fp}-map",
        desc="tokenize",
    )
    too_long = sum(tokenized["too_long"])
    kept = tokenized.filter(
        lambda t, long: t > 0 and not long, input_columns=["targets", "too_long"], new_fingerprint=f"{fp}-filter"
    )
    dropped = len(tokenized) - len(kept) - too_long
    k = val_count(len(kept), val_size)
    parts = kept.train_test_split(
        test_size=k,
        shuffle=True,
        seed=seed,
        train_new_fingerprint=f"{fp}-train",
        test_new_fingerprint=f"{fp}-val",
    )
    return TokenizedSplits(parts["train"], parts["test"], dropped, duplicates, too_long)


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual sample length, not an interpolation)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


METRIC_COLUMNS = (
    "length", "full_length", "truncated", "targets", "pairs_dropped", "rounds", "answer_cut", "selfchat_cut",
    "special_text",
)


def metrics(splits: TokenizedSplits, *, loss: str, max_length: int, keep_truncated: bool = False) -> dict[str, Any]:
    """Samples, tokens, trained tokens (loss targets), truncated share, length percentiles (after the cut),
    and what the stop-signal rules cost (counted over the kept samples; dropped samples in `samples`):

    - pairs_dropped_at_max_length: human/AI pairs cut away by max_length (no token of the answer left);
    - answers_cut_at_max_length: answers kept partly, without their stop marker (keep_truncated true);
    - answers_cut_at_selfchat: answers of meta.truncated_turns, trained without their stop marker;
    - special_token_text: samples whose text spells a special token (tokenized as plain text).
    """
    out: dict[str, Any] = {"loss": loss, "max_length": max_length, "keep_truncated": keep_truncated}
    cols = {}
    for name, ds in (("train", splits.train), ("val", splits.val)):
        cols[name] = {c: list(ds[c]) for c in METRIC_COLUMNS}
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
        "dropped_too_long": splits.dropped_too_long,
        "duplicates_dropped": splits.duplicates,
    }
    # Rounds (human/AI pairs) per sample as trained, after the max_length cut: Baize's multi-turn point.
    out["rounds_per_sample"] = {
        name: round(sum(c["rounds"]) / len(c["rounds"]), 4) if c["rounds"] else 0.0 for name, c in cols.items()
    }
    out["rounds_per_sample"]["total"] = round(sum(every["rounds"]) / samples, 4) if samples else 0.0
    out["pairs_dropped_at_max_length"] = sum(every["pairs_dropped"])
    out["answers_cut_at_max_length"] = sum(every["answer_cut"])
    out["answers_cut_at_selfchat"] = sum(every["selfchat_cut"])
    out["special_token_text"] = sum(every["special_text"])
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
        clean_tokenizer_config(tmp / TOKENIZER_DIR)
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
    keep_truncated: bool = False,
) -> dict[str, Any]:
    """The `tokenize` stage without DVC/MLflow: read, render, tokenize, split, save; returns the metrics."""
    rendered = render_file(transcripts)
    tokenizer = load_tokenizer(model_dir)
    splits = build(
        rendered.ids,
        rendered.texts,
        tokenizer,
        loss=loss,
        max_length=max_length,
        val_size=val_size,
        seed=seed,
        duplicates=rendered.duplicates,
        cut_turns=rendered.cut_turns,
        keep_truncated=keep_truncated,
    )
    result = metrics(splits, loss=loss, max_length=max_length, keep_truncated=keep_truncated)
    info = {
        "format": "baize-training-text",
        "loss": loss,
        "max_length": max_length,
        "keep_truncated": keep_truncated,
        "split_special_tokens": True,
        "ignore_index": IGNORE_INDEX,
        "columns": list(SAVED_COLUMNS),
        "bos_added": tokenizer.bos_token_id is not None and splits.train[0]["input_ids"][0] == tokenizer.bos_token_id,
        "eos_added": False,
        "samples": result["samples"],
        "rounds_per_sample": result["rounds_per_sample"],
    }
    save(splits, tokenizer, out_dir, info)
    return result
