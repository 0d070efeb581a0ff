"""Baize training text, and reading/writing interchange formats (Baize JSON, OpenAI JSONL, HF messages)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from baize.errors import BaizeError, InputError
from baize.transcript import Transcript, Turn, atomic_write_text, iter_json_lines

PREAMBLE = "The conversation between human and AI assistant.\n"
HUMAN = "[|Human|]"
AI = "[|AI|]"

_MARKER = re.compile(re.escape(HUMAN) + "|" + re.escape(AI))


class TrainingFormatError(BaizeError, ValueError):
    """Text or turns that do not fit the Baize training format."""


class MarkerCollisionError(TrainingFormatError):
    """A turn (or preamble) contains [|Human|] or [|AI|], which would forge a turn boundary."""


# --- Baize training text ---------------------------------------------------------------------------------------


def render_training(turns: Sequence[Turn] | Transcript, preamble: str = PREAMBLE) -> str:
    """`preamble + "[|Human|] {h}\\n[|AI|] {a}\\n"... + "[|Human|] "`; turns must alternate human, ai."""
    if isinstance(turns, Transcript):
        turns = turns.turns
    if _MARKER.search(preamble):
        raise MarkerCollisionError(f"preamble contains a training marker: {preamble!r}")
    if len(turns) % 2:
        raise TrainingFormatError(f"{len(turns)} turns: the training format needs complete human/ai pairs")
    parts = [preamble]
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "ai"
        if turn.role != expected:
            raise TrainingFormatError(f"turn {i} is {turn.role!r}, expected {expected!r} (turns must alternate)")
        if m := _MARKER.search(turn.text):
            raise MarkerCollisionError(f"turn {i} ({turn.role}) contains {m.group(0)!r}, which would forge a turn")
        parts.append(f"{HUMAN if expected == 'human' else AI} {turn.text}\n")
    parts.append(f"{HUMAN} ")
    return "".join(parts)


def parse_training(text: str) -> tuple[str, list[Turn]]:
    """Exact inverse of render_training: (preamble, turns). Raises TrainingFormatError on anything else."""
    start = text.find(HUMAN + " ")
    if start < 0:
        raise TrainingFormatError(f"no '{HUMAN} ' marker")
    preamble, body = text[:start], text[start:]
    if m := _MARKER.search(preamble):
        raise TrainingFormatError(f"marker {m.group(0)!r} before the first '{HUMAN} '")
    if not body.endswith(HUMAN + " "):
        raise TrainingFormatError(f"does not end with the dangling '{HUMAN} '")
    body = body[: -len(HUMAN) - 1]

    marks = list(_MARKER.finditer(body))
    turns: list[Turn] = []
    for i, m in enumerate(marks):
        expected = HUMAN if i % 2 == 0 else AI
        if m.group(0) != expected:
            raise TrainingFormatError(f"turn {i}: found {m.group(0)!r} where {expected!r} was expected")
        if body[m.end() : m.end() + 1] != " ":
            raise TrainingFormatError(f"turn {i}: {m.group(0)!r} is not followed by a space")
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        segment = body[m.end() + 1 : end]
        if not segment.endswith("\n"):
            raise TrainingFormatError(f"turn {i}: text does not end with a newline before the next marker")
        turns.append(Turn(role="human" if expected == HUMAN else "ai", text=segment[:-1]))
    if len(turns) % 2:
        raise TrainingFormatError(f"turn {len(turns) - 1}: human turn without an {AI} answer")
    return preamble, turns


# --- Released Baize JSON: [{"topic": ..., "input": ...}] -------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(path, data.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start}") from None


def _iter_json_array(path: Path, text: str) -> Iterable[tuple[int, int, Any]]:
    """Yield (index, line, value) for each element of a top-level JSON array, so errors can name a line."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = ws.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        raise InputError(path, line_at(pos), "expected a JSON list of {\"topic\", \"input\"} records")
    pos = ws.match(text, pos + 1).end()
    index = 0
    if text[pos : pos + 1] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise InputError(path, e.lineno, f"record {index}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield index, line_at(pos), value
            index += 1
            pos = ws.match(text, end).end()
            sep = text[pos : pos + 1]
            if sep == "]":
                pos += 1
                break
            if sep != ",":
                what = "end of file" if not sep else repr(sep)
                raise InputError(path, line_at(pos), f"after record {index - 1}: expected ',' or ']', got {what}")
            pos = ws.match(text, pos + 1).end()
    pos = ws.match(text, pos).end()
    if pos != len(text):
        raise InputError(path, line_at(pos), "extra data after the JSON list")


def import_baize_json(path: str | os.PathLike) -> list[Transcript]:
    """Read a released Baize data file; seed = topic, meta keeps the exact preamble and the record index."""
    path = Path(path)
    text = _read_text(path)
    out = []
    for index, line, rec in _iter_json_array(path, text):
        where = f"record {index}"
        if not isinstance(rec, dict):
            raise InputError(path, line, f"{where}: expected an object, got {type(rec).__name__}")
        if not isinstance(rec.get("input"), str):
            raise InputError(path, line, f"{where}: 'input' must be a string")
        topic = rec.get("topic")
        if topic is not None and not isinstance(topic, str):
            raise InputError(path, line, f"{where}: 'topic' must be a string or null")
        try:
            preamble, turns = parse_training(rec["input"])
        except TrainingFormatError as e:
            raise InputError(path, line, f"{where}: 'input': {e}") from None
        meta: dict[str, Any] = {"preamble": preamble, "record_index": index}
        if topic is None:
            meta["topic_null"] = True  # some released records have "topic": null; keep it for export
        extra = {k: v for k, v in rec.items() if k not in ("topic", "input")}
        if extra:
            meta["extra"] = extra
        out.append(
            Transcript.create(seed=topic or "", turns=turns, source=f"baize-json:{path.name}", meta=meta)
        )
    return out


def to_baize_record(transcript: Transcript) -> dict[str, Any]:
    """One {"topic", "input"} record, with the transcript's own preamble if it was imported with one."""
    t = transcript
    topic = None if (t.meta.get("topic_null") and not t.seed) else t.seed
    rec = {"topic": topic, "input": render_training(t.turns, preamble=t.meta.get("preamble", PREAMBLE))}
    rec.update(t.meta.get("extra") or {})
    return rec


def export_baize_json(transcripts: Iterable[Transcript], path: str | os.PathLike, *, indent: int | None = 1) -> int:
    """Write the released Baize JSON list (atomically); returns the record count.

    indent=1 matches the English release files, indent=None the compact one-line files.
    """
    records = [to_baize_record(t) for t in transcripts]
    atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=indent))
    return len(records)


# --- Chat messages: Hugging Face `messages` and OpenAI fine-tuning JSONL ----------------------------------------

_TO_CHAT = {"human": "user", "ai": "assistant"}
_FROM_CHAT = {"user": "human", "assistant": "ai"}


def to_messages(transcript: Transcript, system: str | None = None) -> list[dict[str, str]]:
    """[{"role", "content"}]: an optional system message (`system`, else meta["system"]), then user/assistant."""
    system = system if system is not None else transcript.meta.get("system")
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs += [{"role": _TO_CHAT[t.role], "content": t.text} for t in transcript.turns]
    return msgs


def from_messages(
    messages: Sequence[Mapping[str, Any]],
    seed: str | None = None,
    *,
    source: str = "messages",
    seed_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Transcript:
    """Inverse of to_messages; a leading system message goes to meta["system"]. Seed defaults to the first
    user message. Raises ValueError naming the message index on a bad message or role."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("'messages' must be a list")
    meta = dict(meta or {})
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {i}: expected an object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' must be a string")
        if role == "system" and i == 0:
            meta["system"] = content
        elif role in _FROM_CHAT:
            turns.append(Turn(role=_FROM_CHAT[role], text=content))
        else:
            where = "only first" if role == "system" else "unsupported"
            raise ValueError(f"message {i}: role {role!r} ({where}; expected system first, then user/assistant)")
    if seed is None:
        seed = next((t.text for t in turns if t.role == "human"), "")
    return Transcript.create(seed=seed, turns=turns, source=source, seed_id=seed_id, meta=meta)


def export_openai_jsonl(
    transcripts: Iterable[Transcript], path: str | os.PathLike, system: str | None = None
) -> int:
    """OpenAI fine-tuning JSONL, one {"messages": [...]} per line (atomically); returns the line count."""
    lines = [json.dumps({"messages": to_messages(t, system)}, ensure_ascii=False) + "\n" for t in transcripts]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def import_openai_jsonl(path: str | os.PathLike) -> list[Transcript]:
    """Read OpenAI fine-tuning JSONL; user -> human, assistant -> ai, system kept in meta["system"]."""
    path = Path(path)
    out = []
    for lineno, obj in iter_json_lines(path):
        if not isinstance(obj, dict) or "messages" not in obj:
            raise InputError(path, lineno, "expected an object with a 'messages' list")
        try:
            t = from_messages(obj["messages"], source=f"openai-jsonl:{path.name}", meta={"line": lineno})
        except ValueError as e:
            raise InputError(path, lineno, str(e)) from None
        out.append(t)
    return out


def to_hf_dataset(transcripts: Iterable[Transcript]):
    """A `datasets.Dataset` with columns id, seed, messages."""
    import datasets  # heavy import; only this function needs it

    rows = [{"id": t.id, "seed": t.seed, "messages": to_messages(t)} for t in transcripts]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "seed": datasets.Value("string"),
            # A plain list means "list of" in every datasets version (datasets.List is 4.x only).
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def from_hf_records(rows: Iterable[Mapping[str, Any]], *, source: str = "hf-messages") -> list[Transcript]:
    """Transcripts from rows with a `messages` column (and optional seed, seed_id); ids are recomputed."""
    out = []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise ValueError(f"row {i}: no 'messages' column")
        try:
            out.append(
                from_messages(row["messages"], row.get("seed"), source=source, seed_id=row.get("seed_id"))
            )
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None
    return out
