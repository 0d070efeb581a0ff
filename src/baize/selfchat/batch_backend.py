"""`openai-batch` backend: the OpenAI Batch API (half the price, results within 24 h), `transcript` mode only.

Builds the request JSONL (`custom_id` = the request key), uploads it, creates the batch, records the batch id in
the journal *before* polling, polls, then downloads the results into the journal. A run interrupted while
waiting finds the batch id in the journal and polls that batch again instead of paying for a second one.
"""

from __future__ import annotations

import asyncio
import json
import random

import openai

from baize.selfchat.backend import (
    BackendStats,
    BadResponseError,
    ChatRequest,
    Completion,
    PermanentError,
    RequestError,
    TransientError,
    journal_key,
    normalize_endpoint,
    redact,
)
from baize.selfchat.journal import Journal
from baize.selfchat.openai_backend import api_key, chat_body

FINAL = {"completed", "failed", "expired", "cancelled"}
MAX_REQUESTS_PER_BATCH = 50_000  # the Batch API's limit per input file


class OpenAIBatchBackend:
    name = "openai-batch"
    price_factor = 0.5  # Batch API prices are half the synchronous ones

    def __init__(
        self,
        *,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 8,
        poll_interval_s: float = 30.0,
        max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
    ):
        self.client = openai.AsyncOpenAI(api_key=api_key(base_url), base_url=base_url, max_retries=0, timeout=timeout_s)
        self.where = base_url or "api.openai.com"
        self.endpoint = normalize_endpoint(base_url)  # in every journal key (backend.journal_key)
        self.stopper = None  # set by the engine: a stop ends the polling (the batch id is journaled)
        self.max_retries = max_retries
        self.poll_interval_s = poll_interval_s
        self.max_requests_per_batch = max_requests_per_batch
        self.errors: dict[str, Exception] = {}  # request key -> why the batch gave no reply for it
        self.stats = BackendStats()
        self.batch_ids: list[str] = []

    async def complete_many(self, requests: list[ChatRequest], journal: Journal) -> list[Completion]:
        """Get a reply for every request into the journal (or into `errors`); returns the replies paid for now."""
        new: list[Completion] = []
        for batch_id in journal.pending_batches():  # resume: poll what an interrupted run submitted
            new += await self._collect(batch_id, journal)
        missing = {journal_key(r, self): r for r in requests}
        missing = {k: r for k, r in missing.items() if journal.get(k) is None and k not in self.errors}
        items = list(missing.items())
        for start in range(0, len(items), self.max_requests_per_batch):
            chunk = items[start : start + self.max_requests_per_batch]
            lines = [
                json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": chat_body(r)})
                for k, r in chunk
            ]
            upload = await self._api(
                self.client.files.create,
                file=("selfchat-batch.jsonl", ("\n".join(lines) + "\n").encode("utf-8"), "application/jsonl"),
                purpose="batch",
            )
            batch = await self._api(
                self.client.batches.create,
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"created_by": "baize selfchat"},
            )
            journal.record_batch(batch.id, [k for k, _ in chunk])  # on disk before we wait for it
            new += await self._collect(batch.id, journal)
        return new

    async def _collect(self, batch_id: str, journal: Journal) -> list[Completion]:
        self.batch_ids.append(batch_id)
        while True:
            if self.stopper is not None:
                self.stopper.check()  # stopping: the batch id is in the journal, a re-run polls it again
            batch = await self._api(self.client.batches.retrieve, batch_id)
            if batch.status in FINAL:
                break
            if self.stopper is not None:
                await self.stopper.sleep(self.poll_interval_s)
            else:
                await asyncio.sleep(self.poll_interval_s)
        new = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._api(self.client.files.content, file_id)
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key = item.get("custom_id")
                response = item.get("response") or {}
                try:
                    status = response.get("status_code")
                    if status != 200:
                        error = (response.get("body") or {}).get("error") or item.get("error") or {}
                        message = redact(f"batch {batch_id}: HTTP {status}: {error.get('message', 'no reply')}")
                        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429):
                            raise RequestError(message, status=status)  # this request only: a recorded failure
                        raise TransientError(message, status=status if isinstance(status, int) else None)
                    completion = _completion(response.get("body") or {}, self.where)
                except (TransientError, BadResponseError, RequestError) as exc:
                    self.errors[key] = exc
                    continue
                journal.record(key, completion)
                new.append(completion)
        if batch.status == "failed":
            errors = getattr(batch, "errors", None)
            detail = "; ".join(e.message or "" for e in (errors.data or [])) if errors and errors.data else "no detail"
            journal.record_batch(batch_id, [], done=True)
            raise PermanentError(redact(f"{self.where}: batch {batch_id} failed: {detail}"))
        for key in journal.batches.get(batch_id, []):
            if journal.get(key) is None and key not in self.errors:
                self.errors[key] = TransientError(f"batch {batch_id} ended {batch.status} without a reply")
        journal.record_batch(batch_id, [], done=True)
        return new

    async def complete(self, request: ChatRequest) -> Completion:
        # The engine asks only for requests complete_many could not answer: report why.
        key = journal_key(request, self)
        raise self.errors.get(key) or TransientError("not answered by the batch")

    async def _api(self, fn, *args, **kwargs):
        """One Files/Batches call with the same retry policy as the openai backend."""
        for attempt in range(self.max_retries + 1):
            self.stats.requests += 1
            try:
                return await fn(*args, **kwargs)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as exc:
                last = exc
            except openai.APIStatusError as exc:
                raise PermanentError(redact(f"{self.where}: HTTP {exc.status_code}: {exc.message}")[:500]) from None
            if attempt < self.max_retries:
                self.stats.retries += 1
                await asyncio.sleep(random.uniform(0.5, 1.0) * min(60, 2**attempt))
        raise TransientError(redact(f"{self.where}: gave up after {self.max_retries} retries: {last}"))

    async def aclose(self) -> None:
        await self.client.close()


def _completion(body: dict, where: str) -> Completion:
    choices = body.get("choices") or []
    if not choices or (choices[0].get("message") or {}).get("content") is None:
        raise BadResponseError(f"{where}: batch reply without message content")
    usage = body.get("usage") or {}
    return Completion(
        text=choices[0]["message"]["content"],
        finish_reason=choices[0].get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        model=body.get("model") or "",
    )
