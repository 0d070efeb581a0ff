"""The interface between the self-chat engine and whatever writes the text (OpenAI, a local server, a local model).

A backend is anything with `async def complete(request: ChatRequest) -> Completion`. It raises
`TransientError` when it gave up after its own retries (the seed becomes a recorded failure and a re-run tries
again), `BadResponseError` when the server answered something unusable (a recorded failure too), `RequestError`
when the server refused this one request (400, 413, 422: too long a prompt, a bad value; a recorded failure with
its HTTP status), and `PermanentError` when no further request can succeed (401, 403, 404 unknown model, 429
out of quota): the stage stops starting requests, lets those in flight finish and journals them, then stops.

A backend with an `endpoint` (the `base_url` of an OpenAI-compatible server) has it in every journal key: two
servers that serve the same model name do not answer each other's requests (`journal_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from baize.errors import BaizeError


@dataclass(frozen=True)
class ChatRequest:
    """One Chat Completions call. `messages` are OpenAI-style `{"role", "content"}` dicts.

    Two optional extensions (None: an ordinary chat call, with the same journal key as before they existed):
    `prompt`, a raw text prompt sent as is instead of `messages` (a completion call: no chat template; the Baize
    inference prompt is plain text), and the structured-output constraints `response_format` (OpenAI's JSON-schema
    `response_format`, for servers that support it) and `choices` (the reply must be exactly one of these strings:
    the local backend enforces it by constrained decoding, so even a tiny model returns a parseable reply).
    """

    messages: list[dict[str, str]]
    model: str
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    stop: list[str] | None = None
    seed: int | None = None
    """Sampling seed (OpenAI's `seed`): a re-asked turn sends the same messages with another seed."""
    prompt: str | None = None
    """A raw prompt (completion call); `messages` is then empty."""
    response_format: dict[str, Any] | None = None
    """OpenAI `response_format`, e.g. `{"type": "json_schema", "json_schema": {...}}`."""
    choices: list[str] | None = None
    """The reply must be one of these strings (constrained decoding in the local backend)."""
    top_logprobs: int | None = None
    """Return this many most likely tokens, with their log-probabilities, at each step of the reply (OpenAI's
    `logprobs` / `top_logprobs`): how sure the model was, e.g. of the score a judge wrote."""

    def key(self, backend: str, endpoint: str | None = None) -> str:
        """sha256 of the whole request, the backend and its endpoint: a different model, template, sampling or
        server is a new key. `endpoint` None (api.openai.com, the local model) leaves the key as it always was."""
        fields = asdict(self)
        for name in ("seed", "prompt", "response_format", "choices", "top_logprobs"):
            if fields[name] is None:  # requests journaled before the field existed keep their keys
                del fields[name]
        if endpoint:  # likewise: added only when there is one
            fields["endpoint"] = endpoint
        payload = json.dumps({"backend": backend, **fields}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def sampling(self) -> dict[str, Any]:
        out = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "stop": self.stop}
        if self.seed is not None:
            out["seed"] = self.seed
        return out


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None  # "stop", "length", ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    top_logprobs: list[dict[str, float]] | None = None
    """Per reply token, `{token text: log-probability}` of the most likely tokens there (when requested)."""
    stop_string: str | None = None
    """The stop string that ended the reply (local backend; `finish_reason` "stop" without one: an EOS token)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("top_logprobs", "stop_string"):
            if out[name] is None:  # journal lines as before the fields existed
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        return cls(**{k: data.get(k) for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "model",
                                               "top_logprobs", "stop_string")})


@runtime_checkable
class Backend(Protocol):
    name: str
    """Goes into the request key and the transcript's meta (`openai`, `openai-batch`, `local`)."""

    async def complete(self, request: ChatRequest) -> Completion: ...


def journal_key(request: ChatRequest, backend) -> str:
    """The journal key of `request` sent through `backend`: its name and, for a `base_url`, its endpoint."""
    return request.key(backend.name, getattr(backend, "endpoint", None))


def normalize_endpoint(base_url: str | None) -> str | None:
    """`base_url` as it goes into a journal key: None for the default API, no trailing slash."""
    return base_url.strip().rstrip("/") or None if base_url else None


@dataclass
class BackendStats:
    """Counters a backend keeps for the metrics: calls sent (each attempt), retries, errors by kind."""

    requests: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class BackendError(BaizeError):
    reason = "backend_error"
    status: int | None = None
    """The HTTP status behind the error, when there is one (recorded with the seed's failure)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class TransientError(BackendError):
    """Retries exhausted on 429/5xx/timeouts/dropped connections. The seed is a failure; a re-run retries it."""

    reason = "transient_error"


class BadResponseError(BackendError):
    """The server answered, but not with a usable completion (no choices, no text)."""

    reason = "bad_response"


class RequestError(BackendError):
    """The server refused this one request (400 e.g. a context-length error, 413, 422): no retry can fix it, but
    the other requests may well succeed. The seed is a recorded failure with the status; the run goes on."""

    reason = "request_rejected"


class RetryAfterTooLong(BackendError):
    """The server asked to wait longer than the `max_retry_after_s` cap: the seed is a recorded failure (a
    re-run tries it again) instead of a sleep of hours."""

    reason = "retry_after_too_long"


class PermanentError(BackendError):
    """Nothing will succeed (401, 403, 404 unknown model, 429 out of quota): stop the run with this message."""

    reason = "permanent_error"


_SECRET_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{6,}")


def redact(text: str) -> str:
    """Remove the API key (and anything that looks like an OpenAI key) from a message before it is shown or stored.

    Servers echo keys in their errors ("Incorrect API key provided: sk-ab***yz"); that must not reach a log.
    """
    key = os.environ.get("OPENAI_API_KEY")
    if key and len(key) >= 4:
        text = text.replace(key, "[redacted]")
    return _SECRET_LIKE.sub("sk-[redacted]", text)
