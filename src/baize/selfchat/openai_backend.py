"""`openai` backend: Chat Completions through the official async client, for api.openai.com or any
OpenAI-compatible server (`base_url`: vLLM, Ollama, `transformers serve`).

Throughput comes from keeping `concurrency` requests in flight while staying under the requests-per-minute and
tokens-per-minute limits with our own token buckets; errors are retried here (the client's own retries are off,
so every retry is counted), with exponential backoff and jitter, and never sooner than the server's Retry-After,
unless that is longer than `max_retry_after_s`: then the seed is a recorded failure instead of a sleep of hours.

Errors by what they concern (the client's typed errors): one request (400 `BadRequestError`, 413, 422
`UnprocessableEntityError`) -> `RequestError`, that seed's recorded failure; every request (401
`AuthenticationError`, 403 `PermissionDeniedError`, 404 `NotFoundError` for an unknown model, 429
`insufficient_quota`) -> `PermanentError`, the run stops once the requests in flight are journaled.
"""

from __future__ import annotations

import asyncio
import os
import random

import openai

from baize.errors import BaizeError
from baize.selfchat.backend import (
    BackendStats,
    BadResponseError,
    ChatRequest,
    Completion,
    PermanentError,
    RequestError,
    RetryAfterTooLong,
    TransientError,
    normalize_endpoint,
    redact,
)
from baize.selfchat.ratelimit import TokenBucket

LOCAL_PLACEHOLDER_KEY = "not-needed-for-a-local-server"


def api_key(base_url: str | None) -> str:
    """The key comes from OPENAI_API_KEY only (never params); a local server gets a placeholder."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url:
        return LOCAL_PLACEHOLDER_KEY
    raise BaizeError("OPENAI_API_KEY is not set (needed for selfchat.backend openai without selfchat.base_url)")


def chat_body(request: ChatRequest) -> dict:
    """The Chat Completions request body (also the `body` of each Batch API line)."""
    body = {
        "model": request.model,
        "messages": request.messages,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
    }
    if request.stop:
        body["stop"] = request.stop
    if request.seed is not None:
        body["seed"] = request.seed
    if request.response_format is not None:
        body["response_format"] = request.response_format
    if request.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = request.top_logprobs
    return body


def completion_body(request: ChatRequest) -> dict:
    """The (legacy) Completions request body for a raw-prompt request: no chat template on the server."""
    body = {k: v for k, v in chat_body(request).items()
            if k not in ("messages", "response_format", "logprobs", "top_logprobs")}
    body["prompt"] = request.prompt
    if request.top_logprobs:  # the Completions API's form: an integer
        body["logprobs"] = request.top_logprobs
    return body


def _top_logprobs(choice, raw_prompt: bool) -> list[dict[str, float]] | None:
    """`[{token: logprob}]` per reply token from a reply's `logprobs` (Chat: `content[i].top_logprobs`;
    Completions: `top_logprobs[i]`), or None when the server sent none."""
    logprobs = getattr(choice, "logprobs", None)
    if logprobs is None:
        return None
    if raw_prompt:
        steps = getattr(logprobs, "top_logprobs", None) or []
        return [dict(step or {}) for step in steps] or None
    content = getattr(logprobs, "content", None) or []
    return [{alt.token: alt.logprob for alt in (step.top_logprobs or [])} for step in content] or None


def retry_after_s(response) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds); None when absent or unreadable."""
    if response is None:
        return None
    headers = response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue  # an HTTP date: fall back to our own backoff
    return None


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str | None = None,
        concurrency: int = 16,
        requests_per_minute: int = 3000,
        tokens_per_minute: int = 1_000_000,
        timeout_s: float = 60.0,
        max_retries: int = 8,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 120.0,
    ):
        # max_retries=0: the retries are ours (counted, Retry-After honoured, same policy for every error).
        self.client = openai.AsyncOpenAI(
            api_key=api_key(base_url), base_url=base_url, max_retries=0, timeout=timeout_s
        )
        self.where = base_url or "api.openai.com"
        self.endpoint = normalize_endpoint(base_url)  # in every journal key (backend.journal_key)
        self.max_retries = max_retries
        self.max_retry_after_s = max_retry_after_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._slots = asyncio.Semaphore(concurrency)
        self._rpm = TokenBucket.per_minute(requests_per_minute)
        # Tokens: allow 10 s worth of burst so one long request is not throttled below the per-minute budget.
        self._tpm = TokenBucket.per_minute(tokens_per_minute, burst_s=10.0)
        self.stats = BackendStats()
        self.stopper = None  # set by the engine: once the run stops, no request or retry is sent

    async def complete(self, request: ChatRequest) -> Completion:
        # Estimate before the call (4 chars per token + the reply budget), correct with the real usage after.
        if request.choices is not None:
            raise PermanentError(f"{self.where}: the openai backend has no `choices` constraint; use response_format")
        chars = len(request.prompt) if request.prompt is not None else sum(len(m["content"]) for m in request.messages)
        estimate = chars / 4 + request.max_tokens
        attempt = 0
        while True:
            wait = None
            async with self._slots:
                # Take the rate tokens only once a slot is free, or they would be spent while queueing
                # and the requests would then leave in a burst.
                await self._rpm.acquire(1)
                await self._tpm.acquire(estimate)
                if self.stopper is not None:
                    self.stopper.check()  # queued or retrying when the run stopped: nothing was paid, send nothing
                self.stats.requests += 1
                try:
                    if request.prompt is not None:
                        response = await self.client.completions.create(**completion_body(request))
                    else:
                        response = await self.client.chat.completions.create(**chat_body(request))
                    completion = self._completion(response, raw_prompt=request.prompt is not None)
                    self._tpm.debit(completion.prompt_tokens + completion.completion_tokens - estimate)
                    return completion
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
                    # 401 bad key, 403 no access, 404 unknown model: no request can succeed.
                    raise PermanentError(self._message(exc), status=exc.status_code) from None
                except openai.RateLimitError as exc:
                    if "insufficient_quota" in (_code(exc), getattr(exc, "type", None)):  # out of credit: waiting will not help
                        raise PermanentError(self._message(exc), status=429) from None
                    self.stats.error("429")
                    wait, last = retry_after_s(exc.response), exc
                except openai.InternalServerError as exc:
                    self.stats.error(str(exc.status_code))
                    wait, last = retry_after_s(exc.response), exc
                except openai.APITimeoutError as exc:
                    self.stats.error("timeout")
                    last = exc
                except openai.APIConnectionError as exc:
                    self.stats.error("connection")
                    last = exc
                except openai.APIStatusError as exc:
                    if exc.status_code in (408, 409) or exc.status_code >= 500:  # "try again" statuses
                        self.stats.error(str(exc.status_code))
                        wait, last = retry_after_s(exc.response), exc
                    else:  # 400 (context length, a bad value), 413, 422, ...: this request only, no retry fixes it
                        self.stats.error(str(exc.status_code))
                        raise RequestError(self._message(exc), status=exc.status_code) from None
            if wait is not None and wait > self.max_retry_after_s:
                status = getattr(last, "status_code", None)
                raise RetryAfterTooLong(
                    f"{self._message(last)} (Retry-After {wait:.0f} s is over the {self.max_retry_after_s:g} s cap "
                    "selfchat.max_retry_after_s; a re-run tries again)",
                    status=status,
                )
            attempt += 1
            if attempt > self.max_retries:
                raise TransientError(f"gave up after {self.max_retries} retries: {self._message(last)}")
            self.stats.retries += 1
            backoff = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
            delay = random.uniform(backoff / 2, backoff)  # jitter: spread the retries of a 429 storm
            if self.stopper is not None:
                await self.stopper.sleep(max(delay, wait or 0.0))
            else:
                await asyncio.sleep(max(delay, wait or 0.0))

    def _completion(self, response, raw_prompt: bool = False) -> Completion:
        choices = getattr(response, "choices", None)
        if not choices:
            raise BadResponseError(f"{self.where}: reply without choices")
        choice = choices[0]
        if raw_prompt:  # a Completions reply
            text = getattr(choice, "text", None)
        else:
            text = choice.message.content if choice.message else None
        if text is None:
            raise BadResponseError(f"{self.where}: reply without text (finish_reason {choice.finish_reason})")
        usage = response.usage
        return Completion(
            text=text,
            finish_reason=choice.finish_reason,
            prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
            completion_tokens=(usage.completion_tokens or 0) if usage else 0,
            model=response.model or "",
            top_logprobs=_top_logprobs(choice, raw_prompt),
        )

    def _message(self, exc: BaseException) -> str:
        status = getattr(exc, "status_code", None)
        what = f"HTTP {status}" if status else type(exc).__name__
        body = getattr(exc, "message", None) or str(exc)
        return redact(f"{self.where}: {what}: {body}")[:500]

    async def aclose(self) -> None:
        await self.client.close()


def _code(exc: openai.APIStatusError) -> str | None:
    return getattr(exc, "code", None)
