"""Optional LLM judge, as in the paper's evaluation (the Vicuna-style GPT-4 judge).

For each question the judge sees a reference answer first (Assistant 1) and the model's answer second
(Assistant 2) and scores both from 1 to 10 for helpfulness, relevance, accuracy and level of detail. The
result is the model's total score relative to the reference's, in percent (the paper's "relative score").

The judge is any self-chat backend (`baize.selfchat`: OpenAI, an OpenAI-compatible server, the local model);
every reply is recorded in a self-chat `Journal` keyed by the full request, so a re-run pays nothing twice.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from baize.errors import BaizeError
from baize.selfchat.backend import Backend, BackendError, ChatRequest, Completion, PermanentError, journal_key, redact
from baize.selfchat.journal import Journal
from baize.selfchat.stopping import Interrupted, StopRequested, Stopper

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

JUDGE_TEMPLATE = """[Question]
{question}

[The Start of Assistant 1's Answer]
{reference}
[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{answer}
[The End of Assistant 2's Answer]

[System]
Please rate how well each AI assistant answered the user question above. Judge the helpfulness, relevance,
accuracy and level of detail of each answer, and give each assistant an overall score from 1 to 10, where a
higher score means a better answer. On the first line, write only the two scores, for Assistant 1 and
Assistant 2 in that order, separated by a space. Then explain your judgment on the following lines, without
letting the order of the answers or their length bias you."""

_SCORE = re.compile(r"(?<![\d.])(10|[1-9](?:\.\d+)?)(?![\d])")


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores on the judge's first non-empty line (e.g. "8 6" or "8, 6"); None if unreadable."""
    for line in text.strip().splitlines():
        if line.strip():
            found = _SCORE.findall(line)
            if len(found) >= 2:
                return float(found[0]), float(found[1])
            return None
    return None


def judge_request(question: str, reference: str, answer: str, *, model: str, max_tokens: int) -> ChatRequest:
    prompt = JUDGE_TEMPLATE.format(question=question, reference=reference, answer=answer)
    return ChatRequest(
        messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
        model=model,
        temperature=0.0,  # the judgment should not depend on the sampling luck of the judge
        top_p=1.0,
        max_tokens=max_tokens,
    )


def answer_request(question: str, *, model: str, max_tokens: int) -> ChatRequest:
    """The judge model answering the question itself: the reference when `reference: judge`."""
    return ChatRequest(messages=[{"role": "user", "content": question}], model=model, temperature=0.0, top_p=1.0,
                       max_tokens=max_tokens)


async def _cached(
    backend: Backend, journal: Journal, request: ChatRequest, stats: dict[str, int], stopper: Stopper | None = None
) -> Completion:
    key = journal_key(request, backend)
    hit = journal.get(key)
    if hit is not None:
        stats["cached"] += 1
        return hit
    if stopper is not None:
        stopper.check()  # stopping: no new request
    completion = await backend.complete(request)
    journal.record(key, completion)  # fsynced before we use it: a crash after this costs nothing on re-run
    stats["requests"] += 1
    return completion


async def judge_rows(
    backend: Backend,
    journal: Journal,
    rows: Sequence[dict[str, Any]],
    *,
    model: str,
    reference: str = "judge",
    answer_key: str = "adapter",
    max_tokens: int = 256,
    stopper: Stopper | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every row's `answer_key` answer against the reference; returns (per-row judgments, summary).

    `reference`: "judge" (the judge model's own answer, like ChatGPT's in the paper) or a model name present
    in the rows (e.g. "base"). A request the server refuses (400, 413, 422) or that fails after its retries leaves
    that row unjudged with its `error`; an error that concerns every request (401, 403, 404, no quota) or a signal
    (`stopper`) stops the judging as self-chat stops: no new request, those in flight finish and are journaled,
    then the error (or `Interrupted`) is raised with a one-line summary.
    """
    stats = {"requests": 0, "cached": 0}
    stopper = stopper or Stopper(what="judge")
    stopper.replies = lambda: stats["requests"]
    if hasattr(backend, "stopper"):
        backend.stopper = stopper

    async def judge_one(row: dict[str, Any]) -> dict[str, Any]:
        if reference == "judge":
            ref = (await _cached(backend, journal, answer_request(row["question"], model=model, max_tokens=max_tokens),
                                 stats, stopper)).text.strip()
        else:
            ref = row[reference]["text"]
        request = judge_request(row["question"], ref, row[answer_key]["text"], model=model, max_tokens=max_tokens)
        verdict = await _cached(backend, journal, request, stats, stopper)
        scores = parse_scores(verdict.text)
        return {
            "id": row["id"],
            "reference": ref,
            "reference_score": scores[0] if scores else None,
            "answer_score": scores[1] if scores else None,
            "judgment": verdict.text,
        }

    async def one(row: dict[str, Any]) -> dict[str, Any] | None:
        if stopper.stopping:
            return None
        try:
            return await judge_one(row)
        except StopRequested:
            return None
        except PermanentError as exc:
            stopper.stop(str(exc), exc)
            return None
        except BackendError as exc:  # this row only: a refused request, retries exhausted, an unusable reply
            error = {"reason": exc.reason, "detail": redact(str(exc))[:500]}
            if exc.status is not None:
                error["status"] = exc.status
            return {"id": row["id"], "reference": None, "reference_score": None, "answer_score": None,
                    "judgment": None, "error": error}
        except Exception as exc:  # noqa: BLE001 - an unwritable journal, a bug: stop cleanly, then raise it
            stopper.stop(str(exc), exc)
            return None

    tasks = [asyncio.create_task(one(r)) for r in rows]
    await stopper.wait(tasks)
    judged = [t.result() if t.done() and not t.cancelled() else None for t in tasks]
    if stopper.stopping:
        summary = (
            f"{sum(j is not None for j in judged)}/{len(rows)} rows judged, {stats['requests']} new replies journaled "
            f"in {journal.path}" + (f", {stopper.finished_after_stop()}" if stopper.finished_after_stop() else "")
            + ("; aborted: requests in flight cancelled" if stopper.aborted else "")
            + "; a re-run goes on from the journal"
        )
        if stopper.error is None:
            raise Interrupted(f"judge {stopper.reason}: {summary}", stopper.signum or 2)
        if isinstance(stopper.error, BaizeError):
            stopper.error.args = (f"{stopper.error}; {summary}",)
        raise stopper.error
    ok = [j for j in judged if j["reference_score"] is not None]
    ref_total = sum(j["reference_score"] for j in ok)
    ans_total = sum(j["answer_score"] for j in ok)
    summary = {
        "judged": len(ok),
        "unparsed": sum(j["reference_score"] is None and "error" not in j for j in judged),
        "failed": sum("error" in j for j in judged),
        "reference_mean": ref_total / len(ok) if ok else None,
        "answer_mean": ans_total / len(ok) if ok else None,
        "relative_score_pct": 100.0 * ans_total / ref_total if ref_total else None,
        "requests": stats["requests"],
        "cached": stats["cached"],
    }
    return list(judged), summary
