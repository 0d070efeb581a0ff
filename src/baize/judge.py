"""LLM judges: the paper's evaluation judge (reference first, 1-10) and the Baize v2 (SDF) judge (one score 1-100).

Evaluation (the Vicuna-style GPT-4 judge): for each question the judge sees a reference answer first (Assistant 1)
and the model's answer second (Assistant 2) and scores both from 1 to 10 for helpfulness, relevance, accuracy and
level of detail. The result is the model's total score relative to the reference's, in percent (the paper's
"relative score").

SDF (`judge_answers`): each sampled answer alone gets one score from 1 to 100 for the same four qualities, with
the packaged, versioned prompt `prompts/sdf_judge_v2.txt`, asked as structured output (a JSON schema through
`response_format` for OpenAI-compatible servers; for the local judge, decoding constrained to `{"score": N}`)
and parsed strictly (`parse_score`): a reply without a valid score is a recorded failure with its reason.

The judge is any self-chat backend (`baize.selfchat`: OpenAI, an OpenAI-compatible server, the local model);
every reply is recorded in a self-chat `Journal` keyed by the full request (judge model, prompt) and endpoint,
so a re-run pays nothing twice.
"""

from __future__ import annotations

import asyncio
import math
import json
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from baize.errors import BaizeError
from baize.selfchat.backend import Backend, BackendError, ChatRequest, Completion, PermanentError, journal_key, redact
from baize.selfchat.journal import Journal, complete_journaled
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


def verdict(scores: tuple[float, float] | None) -> str | None:
    """"first" / "second" / "tie" from the two scores of one judgment (None: unreadable)."""
    if scores is None:
        return None
    return "first" if scores[0] > scores[1] else "second" if scores[1] > scores[0] else "tie"


def combine_orders(ab: str | None, ba: str | None) -> str | None:
    """A's result from the judgment with A first (`ab`) and with B first (`ba`): "win", "loss", "tie", or
    "inconsistent" when swapping the order changed the verdict (position bias; MT-Bench counts it as a tie).
    None when either judgment was unreadable."""
    if ab is None or ba is None:
        return None
    a_ab = {"first": "win", "second": "loss", "tie": "tie"}[ab]
    a_ba = {"first": "loss", "second": "win", "tie": "tie"}[ba]
    return a_ab if a_ab == a_ba else "inconsistent"


async def pairwise(backend: Backend, journal: Journal, rows: Sequence[dict[str, Any]], a: str, b: str, *, model: str,
                   max_tokens: int = 256) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Model `a` against model `b` on every row, judged twice: A as Assistant 1, then B as Assistant 1 (the
    paper's judge prompt scores both 1-10). Returns per-row results and win/tie/loss (an order-inconsistent pair
    counts as a tie) with the share of inconsistent pairs."""
    stats = {"requests": 0, "cached": 0}

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        q, ta, tb = row["question"], row[a]["text"], row[b]["text"]
        first = await _cached(backend, journal, judge_request(q, ta, tb, model=model, max_tokens=max_tokens), stats)
        second = await _cached(backend, journal, judge_request(q, tb, ta, model=model, max_tokens=max_tokens), stats)
        ab, ba = verdict(parse_scores(first.text)), verdict(parse_scores(second.text))
        return {"id": row["id"], "category": row.get("category"), "a_first": ab, "b_first": ba,
                "result": combine_orders(ab, ba)}

    results = list(await asyncio.gather(*(one(r) for r in rows)))
    counted = [r["result"] for r in results if r["result"] is not None]
    n = len(counted)
    wins, losses = counted.count("win"), counted.count("loss")
    ties = counted.count("tie") + counted.count("inconsistent")
    summary = {
        "pairs": len(results),
        "judged": n,
        "unparsed": len(results) - n,
        "win": wins,
        "tie": ties,
        "loss": losses,
        "win_rate": wins / n if n else None,
        "inconsistent_share": counted.count("inconsistent") / n if n else None,
        **stats,
    }
    return results, summary


# --------------------------------------------------------------------------- SDF: one score from 1 to 100 per answer

SCORE_MIN, SCORE_MAX = 1, 100
LOCAL_CHOICES = [json.dumps({"score": n}) for n in range(10, 100, 10)]
"""What the local judge may write: exactly `{"score": N}`, N a multiple of 10 from 10 to 90 (no rationale: a 135M
model's would be noise, and tokens). Its greedy number is nearly always the same (with 1-100 a 135M judge wrote
100 for every answer), so the judgment is the probability-weighted mean of the numbers it could write (G-Eval's
score, `expected_score`); the first digit decides the number, so one step's distribution is the whole one."""
LOCAL_TOP_LOGPROBS = 10
SCORE_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer_score",
        "strict": True,
        "schema": {
            "type": "object",
            # The rationale first: a model that explains before it scores scores better.
            "properties": {
                "rationale": {"type": "string"},
                "score": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
            },
            "required": ["rationale", "score"],
            "additionalProperties": False,
        },
    },
}


def load_judge_prompt(spec: str, root: Path | None = None) -> str:
    """The SDF judge prompt: `packaged:<name>` (src/baize/prompts/<name>.txt) or a text file; it must hold the
    placeholders `{question}` and `{answer}` (other braces, e.g. JSON examples, are text)."""
    from baize import prompts

    if spec.startswith("packaged:"):
        try:
            text = prompts.load_text(spec.split(":", 1)[1])
        except KeyError:
            raise BaizeError(f"sdf_judge.prompt = {spec!r}: no such packaged prompt") from None
    else:
        path = (root or Path.cwd()) / spec
        if not path.is_file():
            raise BaizeError(f"sdf_judge.prompt = {spec!r}: file not found")
        text = path.read_text(encoding="utf-8")
    missing = [p for p in ("{question}", "{answer}") if p not in text]
    if missing:
        raise BaizeError(f"sdf_judge.prompt = {spec!r}: the prompt lacks {' and '.join(missing)}")
    return text


def score_request(question: str, answer: str, *, template: str, model: str, max_tokens: int,
                  constraint: str | None) -> ChatRequest:
    """The judge call for one answer. `constraint`: "choices" (local: constrained decoding), "schema" (an
    OpenAI-compatible server: `response_format`), or None (free text, parsed just as strictly)."""
    prompt = template.replace("{question}", question).replace("{answer}", answer)
    return ChatRequest(
        messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
        model=model,
        temperature=0.0,
        top_p=1.0,
        max_tokens=max_tokens,
        response_format=SCORE_SCHEMA if constraint == "schema" else None,
        choices=LOCAL_CHOICES if constraint == "choices" else None,
        top_logprobs=LOCAL_TOP_LOGPROBS if constraint == "choices" else None,
    )


def expected_score(text: str, top_logprobs: list[dict[str, float]] | None) -> float | None:
    """The probability-weighted mean of the scores the judge could have written at the step where its score
    begins (G-Eval), or None without log-probabilities there.

    The step is the first reply token with a digit; each alternative made of digits there gives the number it
    would have started, completed with the digits the judge wrote after that token (a tokenizer that spells
    numbers digit by digit: "3" + "0" = 30; one with whole-number tokens: "30"). Alternatives outside 1-100 and
    non-numbers are left out; the rest are renormalized.
    """
    if not top_logprobs:
        return None
    written = ""
    for step in top_logprobs:
        chosen = max(step, key=step.get) if step else ""
        if any(ch.isdigit() for ch in chosen) or not step:
            rest = re.match(r"\d*", text[len(written) + len(chosen):]).group(0) if text.startswith(written) else ""
            total = weighted = 0.0
            for token, logprob in step.items():
                digits = token.strip()
                if not digits.isdigit():
                    continue
                value = int(digits + rest)
                if SCORE_MIN <= value <= SCORE_MAX:
                    p = math.exp(logprob)
                    total += p
                    weighted += p * value
            return weighted / total if total > 0 else None
        written += chosen
    return None


@dataclass(frozen=True)
class Score:
    """A parsed judgment: `score` 1-100 and the rationale, or `score` None and the `failure` reason."""

    score: int | None
    rationale: str | None = None
    failure: str | None = None


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)


def parse_score(text: str, finish_reason: str | None = None) -> Score:
    """Strict: the whole reply is one JSON object (a Markdown code fence around it is tolerated) with an integer
    `score` from 1 to 100 and optionally a string `rationale`. Anything else is a failure with its reason; never a
    default score."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    cut = " (the reply was cut at max_tokens)" if finish_reason == "length" else ""
    if not body:
        return Score(None, failure=f"empty reply{cut}")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return Score(None, failure=f"not JSON: {exc.msg} at char {exc.pos}{cut}")
    if not isinstance(obj, dict):
        return Score(None, failure=f"not a JSON object: {type(obj).__name__}")
    if "score" not in obj:
        return Score(None, failure="no 'score' key")
    score = obj["score"]
    if isinstance(score, bool) or not isinstance(score, int):
        return Score(None, failure=f"score is not an integer: {score!r}")
    if not SCORE_MIN <= score <= SCORE_MAX:
        return Score(None, failure=f"score {score} outside {SCORE_MIN}-{SCORE_MAX}")
    rationale = obj.get("rationale")
    if rationale is not None and not isinstance(rationale, str):
        return Score(None, failure=f"rationale is not a string: {type(rationale).__name__}")
    return Score(score, rationale)


async def judge_answers(
    backend: Backend,
    journal: Journal,
    items: list[dict[str, Any]],
    *,
    template: str,
    model: str,
    max_tokens: int,
    constraint: str | None,
    progress: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every item (`question`, `answer`) once; returns one judgment per item, in order, and counters.
    `progress` is called once per item as it is scored (or fails).

    A judgment is `{"score", "rationale", "failure", "reply", "cached", "prompt_tokens", "completion_tokens"}`.
    A backend that gives up on one answer (retries exhausted, unusable reply) makes that answer a failure; one
    that can never succeed (bad key, bad request) stops the run (`PermanentError`).
    """
    stats = {"requests": 0, "cached": 0}

    async def one(item: dict[str, Any]) -> dict[str, Any]:
        request = score_request(item["question"], item["answer"], template=template, model=model,
                                max_tokens=max_tokens, constraint=constraint)
        try:
            completion, cached = await complete_journaled(backend, journal, request)
        except PermanentError:
            raise
        except BackendError as exc:
            return {"score": None, "rationale": None, "failure": f"{exc.reason}: {exc}", "reply": None,
                    "cached": False, "prompt_tokens": 0, "completion_tokens": 0}
        finally:
            if progress is not None:
                progress()
        stats["cached" if cached else "requests"] += 1
        parsed = parse_score(completion.text, completion.finish_reason)
        score = parsed.score
        if score is not None and completion.top_logprobs:
            # The mean of what it could have written, not only the likeliest number (ties become rare).
            weighted = expected_score(completion.text, completion.top_logprobs)
            score = round(weighted, 2) if weighted is not None else score
        return {"score": score, "rationale": parsed.rationale, "failure": parsed.failure,
                "reply": completion.text, "cached": cached, "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens}

    judged = await asyncio.gather(*(one(item) for item in items))
    return list(judged), stats
