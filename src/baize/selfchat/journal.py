"""Append-only JSONL record of every reply the stage received, keyed by the hash of the full request.

Why: a paid reply must survive kill -9, and a re-run must not pay for it again. Each reply is written as one
line, flushed and fsynced before the engine counts it; a re-run loads the file and answers recorded requests
from it. The key covers backend, model, messages and sampling, so a new model or template never reuses a stale
reply. Besides replies the journal records submitted OpenAI batches (`{"batch": id, "keys": [...]}`) so an
interrupted run polls the same batch instead of paying for a second one.

The file sits outside the DVC outs' clean-up (`persist: true` in dvc.yaml), so `dvc repro` keeps it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from baize.errors import BaizeError, InputError
from baize.selfchat.backend import Completion


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.replies: dict[str, Completion] = {}
        self.batches: dict[str, list[str]] = {}  # batch id -> request keys
        self.finished_batches: set[str] = set()
        self.torn_bytes = 0  # a half-written last line cut off at load (kill -9 during a write)
        self._fh = None

    # ---------------------------------------------------------------- open / load

    def open(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._break_links()
        self._fh = open(self.path, "a+b")  # noqa: SIM115 - held for the whole run
        try:
            # One writer at a time: two runs appending to one journal would pay twice for the same seeds.
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise BaizeError(f"{self.path}: another selfchat run is using this journal") from None
        self._load()
        return self

    def _break_links(self) -> None:
        # DVC may check a cached file out as a hard link or symlink into its cache; appending to it would
        # corrupt the cache. Work on a private copy.
        p = self.path
        if p.is_symlink() or (p.exists() and p.stat().st_nlink > 1):
            tmp = p.with_name(p.name + ".copy")
            shutil.copyfile(p, tmp)
            os.replace(tmp, p)

    def _load(self) -> None:
        self._fh.seek(0)
        data = self._fh.read()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline; otherwise a line cut by kill -9
        good_end = 0
        for lineno, raw in enumerate(lines, start=1):
            if raw.strip():
                try:
                    entry = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    if lineno == len(lines) and not tail:  # an unreadable last line: a torn write too
                        break
                    raise InputError(
                        self.path, lineno, f"corrupt journal line ({exc}); move the file away to start over"
                    ) from None
                self._apply_line(entry, lineno)  # valid JSON but no record: never a torn write, always an error
            good_end += len(raw) + 1
        if tail:
            try:  # the whole record made it to disk but not its newline: keep it (it was paid for)
                entry = json.loads(tail)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry = None  # a torn write: cut off below
            if entry is not None:
                self._apply_line(entry, len(lines) + 1)
                self._fh.seek(0, os.SEEK_END)
                self._fh.write(b"\n")
                good_end = len(data) + 1
        size = self._fh.seek(0, os.SEEK_END)
        if good_end < size:
            self.torn_bytes = size - good_end
            self._fh.truncate(good_end)
        os.fsync(self._fh.fileno())
        self._fh.seek(0, os.SEEK_END)

    def _apply_line(self, entry: Any, lineno: int) -> None:
        problem = _record_problem(entry)
        if problem:
            raise InputError(
                self.path, lineno, f"not a journal record ({problem}); move the file away to start over"
            )
        self._apply(entry)

    def _apply(self, entry: dict[str, Any]) -> None:
        if "reply" in entry:
            self.replies[entry["key"]] = Completion.from_dict(entry["reply"])
        elif entry.get("done"):
            self.finished_batches.add(entry["batch"])
        else:
            self.batches[entry["batch"]] = list(entry["keys"])

    # ---------------------------------------------------------------- use

    def get(self, key: str) -> Completion | None:
        return self.replies.get(key)

    def record(self, key: str, completion: Completion) -> None:
        """Append, flush and fsync; only then is the reply in `replies` (and counted by the engine)."""
        if key in self.replies:
            return
        self._append({"key": key, "reply": completion.to_dict()})
        self.replies[key] = completion

    def record_batch(self, batch_id: str, keys: list[str], *, done: bool = False) -> None:
        if done:
            self._append({"batch": batch_id, "done": True})
            self.finished_batches.add(batch_id)
        else:
            self._append({"batch": batch_id, "keys": keys})
            self.batches[batch_id] = list(keys)

    def pending_batches(self) -> dict[str, list[str]]:
        """Submitted batches not yet collected: a re-run polls these instead of submitting again."""
        return {b: k for b, k in self.batches.items() if b not in self.finished_batches}

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            self._fh.write(line)  # one write per line: a crash leaves at most one torn last line
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise BaizeError(f"{self.path}: cannot write the journal ({exc.strerror}); replies so far are kept") from None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Journal:
        return self.open() if self._fh is None else self

    def __exit__(self, *exc) -> None:
        self.close()


def request_key(request, backend_name: str, endpoint: str | None = None) -> str:
    """The journal key of a request: the request itself, the backend and, for a server, its endpoint (two servers
    under one model name are two models)."""
    from baize.selfchat.backend import normalize_endpoint

    return request.key(backend_name, normalize_endpoint(endpoint))


async def complete_journaled(backend, journal: Journal, request) -> tuple[Completion, bool]:
    """(completion, was it in the journal): ask the backend only for what the journal does not hold, and record the
    reply (fsynced) before it is used, so a kill -9 after this costs nothing on the re-run. Keyed by
    `backend.journal_key`: the backend's name and, for a `base_url`, its endpoint."""
    from baize.selfchat.backend import journal_key

    key = journal_key(request, backend)
    hit = journal.get(key)
    if hit is not None:
        return hit, True
    completion = await backend.complete(request)
    journal.record(key, completion)
    return completion, False


_REPLY_FIELDS = {"text": (str,), "finish_reason": (str, type(None)), "prompt_tokens": (int, type(None)),
                 "completion_tokens": (int, type(None)), "model": (str, type(None))}


def _record_problem(entry: Any) -> str | None:
    """What makes a parsed line no journal record (a reply or a batch entry), or None when it is one."""
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not an object"
    if "reply" in entry:
        if not isinstance(entry.get("key"), str):
            return '"key" is not a string'
        reply = entry["reply"]
        if not isinstance(reply, dict):
            return f'"reply" is a {type(reply).__name__}, not an object'
        if not isinstance(reply.get("text"), str):
            return '"reply.text" is not a string'
        for name, types in _REPLY_FIELDS.items():
            if isinstance(reply.get(name), bool) or not isinstance(reply.get(name), types):
                return f'"reply.{name}" is a {type(reply.get(name)).__name__}'
        return None
    if "batch" in entry:
        if not isinstance(entry["batch"], str):
            return '"batch" is not a string'
        if not entry.get("done") and not (
            isinstance(entry.get("keys"), list) and all(isinstance(k, str) for k in entry["keys"])
        ):
            return '"keys" is not a list of strings'
        return None
    return 'neither "reply" nor "batch"'
