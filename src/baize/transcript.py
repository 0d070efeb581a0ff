"""The one model of a transcript that every stage reads and writes, and its JSONL storage."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from baize.errors import InputError

Role = Literal["human", "ai"]


class Turn(BaseModel):
    """One utterance. Content is free text; marker-like text is rejected later by validation, not here."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    text: str


class Transcript(BaseModel):
    """A seed and its ordered turns, with where it came from (`source`) and how it was made (`meta`)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    seed: str
    seed_id: str | None = None
    source: str
    turns: list[Turn] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @staticmethod
    def content_id(seed: str, turns: Iterable[Turn]) -> str:
        """First 16 hex chars of sha256 over seed and turns: the same content always gets the same id."""
        payload = json.dumps(
            {"seed": seed, "turns": [[t.role, t.text] for t in turns]},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        # surrogatepass: a lone surrogate (from a JSON "\ud800" escape) must reach validation, not crash here.
        return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    @classmethod
    def create(
        cls,
        *,
        seed: str,
        turns: Iterable[Turn | dict[str, Any]],
        source: str,
        seed_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Transcript:
        """Build a transcript whose id is derived from its seed and turns."""
        turns = [t if isinstance(t, Turn) else Turn.model_validate(t) for t in turns]
        return cls(
            id=cls.content_id(seed, turns),
            seed=seed,
            seed_id=seed_id,
            source=source,
            turns=turns,
            meta=dict(meta or {}),
        )

    def pairs(self) -> list[tuple[str, str]]:
        """The (human, ai) text pairs; raises ValueError unless turns alternate human, ai, ... ending with ai."""
        if len(self.turns) % 2:
            raise ValueError(f"transcript {self.id}: odd number of turns ({len(self.turns)})")
        out = []
        for i in range(0, len(self.turns), 2):
            h, a = self.turns[i], self.turns[i + 1]
            if h.role != "human" or a.role != "ai":
                raise ValueError(
                    f"transcript {self.id}: turns {i}-{i + 1} are {h.role}/{a.role}, expected human/ai"
                )
            out.append((h.text, a.text))
        return out

    def to_json_line(self) -> str:
        """One JSON object, no trailing newline, non-ASCII kept as is."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False)

    @classmethod
    def from_json_line(cls, line: str) -> Transcript:
        """Inverse of to_json_line; raises json.JSONDecodeError or pydantic.ValidationError."""
        return cls.model_validate(json.loads(line))


def describe_validation_error(err: ValidationError) -> str:
    """Pydantic errors as one line naming each field, e.g. `turns.0.role: Input should be 'human' or 'ai'`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(record)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each non-blank line; bad UTF-8 or JSON is an InputError at file:line.

    A UTF-8 BOM on the first line is accepted (editors on Windows write one)."""
    path = Path(path)
    # Binary mode: split on b"\n" only, so U+2028 or a stray \r inside a string can't cut a record.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(path, lineno, f"invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:
                # Without its line end: an error at the end of the line is at its real column, not at column 1.
                yield lineno, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise InputError(path, lineno, f"invalid or truncated JSON: {e.msg} (column {e.colno})") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[Transcript]:
    """Yield transcripts from a JSONL file; blank lines are skipped, anything malformed is an InputError."""
    for lineno, obj in iter_json_lines(path):
        try:
            yield Transcript.model_validate(obj)
        except ValidationError as e:
            raise InputError(path, lineno, f"invalid transcript: {describe_validation_error(e)}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to a temp file beside `path`, fsync, then os.replace: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; keep the old file's mode, or a normal 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, transcripts: Iterable[Transcript]) -> int:
    """Write transcripts as JSONL atomically; returns the number written."""
    lines = [t.to_json_line() + "\n" for t in transcripts]
    atomic_write_text(path, "".join(lines))
    return len(lines)
