"""Run self-chat for every seed: many seeds in flight, replies journaled, a budget, and a record for every seed.

Every seed ends as a `Transcript` or as a failure `{seed_id, seed, reason, detail}` (and `status`, the HTTP status,
when the server refused the request); results come back in seed order and depend only on the journal's replies, so
a re-run over the same journal writes the same files.

A run stops early only on an error that concerns every request (`PermanentError`), an error writing the journal,
or a signal (`baize.selfchat.stopping`): then no new request starts, the requests in flight finish and are
journaled (for at most `stop_grace_s`), and the run raises with a one-line summary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from baize.selfchat import prompts
from baize.errors import BaizeError
from baize.selfchat.backend import (
    Backend,
    BackendError,
    ChatRequest,
    Completion,
    PermanentError,
    journal_key,
    redact,
)
from baize.selfchat.journal import Journal
from baize.selfchat.parse import parse_selfchat
from baize.selfchat.stopping import Interrupted, StopRequested, Stopper
from baize.transcript import Transcript, Turn


@dataclass(frozen=True)
class Seed:
    id: str
    text: str
    source: str = ""
    domain: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    model: str
    mode: str = "turns"  # "transcript" | "turns"
    max_rounds: int = 3
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    human_max_tokens: int | None = None  # turns mode: budget of a human turn (None: max_tokens)
    stop: list[str] | None = None
    keep_truncated: bool = False  # turns mode: keep an AI turn cut by max_tokens (marked in meta)
    first_human: str = "generate"  # turns mode: "generate" the first question, or use the "seed" itself
    human_prompt: str = "template"  # turns mode: "template" (the paper's) or "followup" (a short instruction)
    min_rounds: int = 1  # turns mode: a "no more questions" before this many rounds is re-asked
    max_reasks: int = 2  # turns mode: re-asks of one unusable human turn before the conversation ends
    max_answer_reasks: int = 1  # turns mode: re-asks of an AI answer cut by max_tokens (or empty)
    ai_system_prompt: str | None = None  # turns mode: system message of the AI-side call
    concurrency: int = 16  # seeds in flight
    max_cost_usd: float | None = None
    max_total_tokens: int | None = None
    price_in_per_1m: float = 0.0
    price_out_per_1m: float = 0.0
    stop_grace_s: float = 60.0  # on a stop: how long the requests in flight may take to finish and be journaled


class BudgetExhausted(Exception):
    pass


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    requests: int = 0

    def add(self, c: Completion, cost: float) -> None:
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.cost_usd += cost
        self.requests += 1

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RunResult:
    transcripts: list[Transcript]
    failures: list[dict[str, Any]]
    metrics: dict[str, Any]
    budget_message: str | None = None


@dataclass
class _SeedRun:
    """What one seed's conversation used and produced, for its transcript's meta."""

    usage: Usage = field(default_factory=Usage)
    raw: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    served_model: str = ""
    truncated_turns: list[int] = field(default_factory=list)  # AI turns cut by max_tokens, kept (keep_truncated)
    reasks: Counter[str] = field(default_factory=Counter)  # turns asked again, by problem (and ok_after_<problem>)


class Engine:
    def __init__(
        self,
        backend: Backend,
        journal: Journal,
        cfg: EngineConfig,
        *,
        progress: bool | None = None,
        stopper: Stopper | None = None,
    ):
        self.backend = backend
        self.journal = journal
        self.cfg = cfg
        self.progress = progress  # None: a bar only on a terminal
        self.price_factor = getattr(backend, "price_factor", 1.0)  # the Batch API costs half
        self.total = Usage()  # every reply used by this run, from the journal or new
        self.new = Usage()  # replies paid for in this run
        self._inflight: dict[str, asyncio.Future] = {}
        self.budget_hit = False
        self.ai_replies: Counter[str] = Counter()  # turns mode: every AI answer, "finished" or "cut" by max_tokens
        self.stopper = stopper or Stopper(cfg.stop_grace_s, what="selfchat")
        self.stopper.replies = lambda: self.new.requests
        if hasattr(backend, "stopper"):  # the openai backends stop retrying (and polling) when the run stops
            backend.stopper = self.stopper
        self._unsubmitted: dict[str, str] = {}  # openai-batch: request key -> why the budget kept it out of a batch

    # ---------------------------------------------------------------- one request

    def cost(self, c: Completion) -> float:
        return (
            c.prompt_tokens * self.cfg.price_in_per_1m + c.completion_tokens * self.cfg.price_out_per_1m
        ) / 1e6 * self.price_factor

    def _over_budget(self) -> str | None:
        if self.cfg.max_cost_usd is not None and self.total.cost_usd >= self.cfg.max_cost_usd:
            return f"cost ${self.total.cost_usd:.4f} reached selfchat.max_cost_usd = {self.cfg.max_cost_usd}"
        if self.cfg.max_total_tokens is not None and self.total.tokens >= self.cfg.max_total_tokens:
            return f"{self.total.tokens} tokens reached selfchat.max_total_tokens = {self.cfg.max_total_tokens}"
        return None

    async def call(self, request: ChatRequest, run: _SeedRun) -> Completion:
        key = journal_key(request, self.backend)
        completion = self.journal.get(key)
        if completion is None:
            if key in self._inflight:  # the same request already on its way: wait for it, pay once
                completion = await asyncio.shield(self._inflight[key])
            else:
                self.stopper.check()  # stopping: no new request
                if key in self._unsubmitted:  # openai-batch: left out of the batches by the budget
                    self.budget_hit = True
                    raise BudgetExhausted(self._unsubmitted[key])
                # Replies already journaled are free to reuse; only a new request is refused past the budget.
                if reason := self._over_budget():
                    self.budget_hit = True
                    raise BudgetExhausted(reason)
                future = asyncio.get_running_loop().create_future()
                self._inflight[key] = future
                try:
                    completion = await self.backend.complete(request)
                    self.journal.record(key, completion)  # on disk before it is counted
                    self.new.add(completion, self.cost(completion))
                    future.set_result(completion)
                except BaseException as exc:
                    future.set_exception(exc)
                    future.exception()  # mark retrieved: nobody else may be waiting
                    raise
                finally:
                    del self._inflight[key]
        cost = self.cost(completion)
        self.total.add(completion, cost)
        run.usage.add(completion, cost)
        run.served_model = run.served_model or completion.model
        return completion

    def _request(self, messages: list[dict[str, str]], *, max_tokens: int, stop: list[str] | None) -> ChatRequest:
        c = self.cfg
        return ChatRequest(
            messages=messages, model=c.model, temperature=c.temperature, top_p=c.top_p, max_tokens=max_tokens, stop=stop
        )

    def transcript_request(self, seed: Seed) -> ChatRequest:
        return self._request(prompts.transcript_messages(seed.text), max_tokens=self.cfg.max_tokens, stop=self.cfg.stop)

    # ---------------------------------------------------------------- one seed

    async def transcript_mode(self, seed: Seed, run: _SeedRun) -> tuple[list[Turn], str]:
        """The paper's way: one call writes the whole conversation; keep every complete pair."""
        c = await self.call(self.transcript_request(seed), run)
        run.raw.append({"text": c.text, "finish_reason": c.finish_reason})
        parsed = parse_selfchat(c.text, truncated=c.finish_reason == "length")
        run.dropped += [{"reason": d.reason, "role": d.role, "text": d.text} for d in parsed.dropped]
        return parsed.turns, "truncated" if c.finish_reason == "length" else "complete"

    async def turns_mode(self, seed: Seed, run: _SeedRun) -> tuple[list[Turn], str]:
        """v1.5 way: per round, one call writes the human turn, a plain chat call answers it.

        A human turn that would end the conversation before `min_rounds`, repeats the seed or an earlier
        question, is cut by its token limit, or (followup prompt) is not a question is asked again with another
        sampling seed, at most `max_reasks` times per round; then the conversation ends with the pairs it has.
        So is an AI answer cut by `max_tokens` or empty (`max_answer_reasks` times, `_ai_turn`); with
        `keep_truncated` a cut answer is kept, listed in meta.truncated_turns, and ends the conversation (no question
        follows an unfinished answer).
        """
        cfg = self.cfg
        turns: list[Turn] = []
        while len(turns) // 2 < cfg.max_rounds:
            if not turns and cfg.first_human == "seed":
                # A question seed asked as is: small models often answer the human-turn prompt as the AI
                # (an empty human turn), which would end every conversation before it starts.
                human = seed.text.strip()
                run.raw.append({"role": "human", "text": human, "finish_reason": "seed"})
            else:
                human, ended = await self._human_turn(seed, turns, run)
                if human is None:
                    return turns, ended
            ai, cut = await self._ai_turn([*turns, Turn(role="human", text=human)], run)
            if ai is None:  # empty, or cut every time: the question goes with it, and the conversation ends here
                run.dropped.append({"reason": "unanswered", "role": "human", "text": human})
                return turns, "truncated" if cut else "empty_ai"
            turns += [Turn(role="human", text=human), Turn(role="ai", text=ai)]
            if cut:  # keep_truncated: kept and marked; the next question would follow an answer that never ended
                run.truncated_turns.append(len(turns) - 1)
                return turns, "truncated"
        return turns, "max_rounds"

    async def _ai_turn(self, turns: list[Turn], run: _SeedRun) -> tuple[str | None, bool]:
        """(answer, cut): the answer to the last human turn. An answer cut by `max_tokens` is never kept as a
        finished one: it is dropped (counted in `ai_cut`) and asked again with another sampling seed, up to
        `max_answer_reasks` times, or kept and marked cut with `keep_truncated`. (None, cut) when none is usable."""
        cfg = self.cfg
        messages = prompts.ai_turn_messages(turns, cfg.ai_system_prompt)
        cut = False
        for attempt in range(cfg.max_answer_reasks + 1):
            ai, a = await self._turn("ai", messages, cfg.max_tokens, cfg.stop, run, sample_seed=attempt or None)
            cut = a.finish_reason == "length"
            self.ai_replies["cut" if cut else "finished"] += 1
            if not ai:
                run.dropped.append({"reason": "empty", "role": "ai", "text": ""})
                problem = "empty_answer"
            elif not cut or cfg.keep_truncated:
                if attempt:
                    run.reasks[f"ok_after_{problem}"] += 1
                return ai, cut
            else:
                run.dropped.append({"reason": "truncated", "role": "ai", "text": ai})
                problem = "cut_answer"
            run.reasks[problem] += 1
        return None, cut

    async def _turn(
        self, role: str, messages: list[dict], max_tokens: int, stop, run: _SeedRun, sample_seed: int | None = None
    ) -> tuple[str, Completion]:
        """One turn's call: the raw reply is recorded, then cleaned; text past the turn is recorded as dropped."""
        request = self._request(messages, max_tokens=max_tokens, stop=stop)
        if sample_seed is not None:
            request = replace(request, seed=sample_seed)
        reply = await self.call(request, run)
        run.raw.append({"role": role, "text": reply.text, "finish_reason": reply.finish_reason})
        text, tail = prompts.clean_turn(reply.text)
        if tail:
            run.dropped.append({"reason": "overrun", "role": role, "text": tail})
        return text, reply

    async def _human_turn(self, seed: Seed, turns: list[Turn], run: _SeedRun) -> tuple[str | None, str]:
        """(the next human turn, "") or (None, why the conversation ends there), re-asking a turn that cannot be
        used (see turns_mode) up to `max_reasks` times."""
        cfg = self.cfg
        followup = cfg.human_prompt == "followup"
        # followup: the reply is one question, so it ends at its question mark (a small model otherwise rambles on
        # to human_max_tokens: a third of all generated tokens in one measured run).
        base = (prompts.QUESTION_STOP if followup else []) + prompts.HUMAN_STOP
        stop = base + [s for s in (cfg.stop or []) if s not in base]
        messages = (
            prompts.followup_messages(seed.text, turns) if followup else prompts.human_turn_messages(seed.text, turns)
        )
        # The opening question may paraphrase the seed (that is its job); a follow-up may not.
        earlier = [seed.text] + [t.text for t in turns if t.role == "human"] if turns else []
        rounds = len(turns) // 2
        problem = ""
        for attempt in range(cfg.max_reasks + 1):
            human, h = await self._turn(
                "human",
                messages,
                cfg.human_max_tokens or cfg.max_tokens,
                stop[:4],  # the API takes at most 4 stop strings
                run,
                sample_seed=attempt or None,  # attempt 0 is the plain request (its journal key is unchanged)
            )
            if followup:
                if h.finish_reason == "stop" and human and human[-1] not in ".!?\u3002\uff01\uff1f":
                    human += "?"  # the stop string is not part of the reply; put back the question mark it cut
                # The question is taken out of whatever the model wrapped it in.
                question = prompts.extract_question(human)
                human = human if question is None else question
            if prompts.is_done(human):
                if rounds >= cfg.min_rounds:
                    return None, "human_done"
                problem = "done_early"
            elif followup and question is None:
                problem = "not_a_question"
            elif not followup and h.finish_reason == "length":
                problem = "truncated"
            elif prompts.repeats(human, earlier):
                problem = "repeat"
            else:
                if attempt:
                    run.reasks[f"ok_after_{problem}"] += 1
                return human, ""
            run.dropped.append({"reason": f"reasked_{problem}", "role": "human", "text": human})
            run.reasks[problem] += 1
        return None, f"gave_up_{problem}"

    async def one_seed(self, seed: Seed) -> Transcript | dict[str, Any]:
        run = _SeedRun()
        try:
            if self.cfg.mode == "transcript":
                turns, ended = await self.transcript_mode(seed, run)
            else:
                turns, ended = await self.turns_mode(seed, run)
        except BudgetExhausted as exc:
            return _failure(seed, "budget_exhausted", str(exc))
        except PermanentError:
            raise
        except BackendError as exc:  # this seed only: retries exhausted, an unusable reply, a refused request
            return _failure(seed, exc.reason, redact(str(exc)), exc.status)
        if not turns:
            first = run.raw[0]["text"] if run.raw else ""
            return _failure(
                seed,
                "no_complete_pair",
                f"ended: {ended}; dropped {[d['reason'] for d in run.dropped]}; reply starts {first[:200]!r}",
            )
        cfg = self.cfg
        meta = {
            "backend": self.backend.name,
            "model": cfg.model,
            "served_model": run.served_model,
            "mode": cfg.mode,
            "sampling": {
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "max_tokens": cfg.max_tokens,
                "human_max_tokens": cfg.human_max_tokens,
                "stop": cfg.stop,
                "max_rounds": cfg.max_rounds if cfg.mode == "turns" else None,
                "first_human": cfg.first_human if cfg.mode == "turns" else None,
                "human_prompt": cfg.human_prompt if cfg.mode == "turns" else None,
                "min_rounds": cfg.min_rounds if cfg.mode == "turns" else None,
                "ai_system_prompt": cfg.ai_system_prompt if cfg.mode == "turns" else None,
            },
            "usage": {
                "prompt_tokens": run.usage.prompt_tokens,
                "completion_tokens": run.usage.completion_tokens,
                "requests": run.usage.requests,
            },
            "cost_usd": round(run.usage.cost_usd, 8),
            "ended": ended,
            "raw": run.raw,
            "dropped": run.dropped,
            "truncated_turns": run.truncated_turns,
            "reasks": dict(run.reasks),
            "seed_source": seed.source,
            "seed_domain": seed.domain,
        }
        return Transcript.create(
            seed=seed.text, turns=turns, source=f"selfchat:{self.backend.name}", seed_id=seed.id, meta=meta
        )

    # ---------------------------------------------------------------- all seeds

    async def run(self, seeds: list[Seed]) -> RunResult:
        started = time.monotonic()
        results: list[Transcript | dict[str, Any] | None] = [None] * len(seeds)
        done = {"transcripts": 0}

        def postfix() -> str:
            minutes = max(time.monotonic() - started, 1e-6) / 60
            return (f"{done['transcripts'] / minutes:.1f} transcripts/min, {self.total.tokens} tok, "
                    f"${self.total.cost_usd:.4f}")

        bar = _progress(len(seeds), self.progress, postfix)

        if self.cfg.mode == "transcript" and hasattr(self.backend, "complete_many"):
            await self._run_batches(seeds)

        next_index = iter(range(len(seeds)))

        async def worker() -> None:
            for i in next_index:  # a shared iterator: each seed is taken by exactly one worker
                if self.stopper.stopping:
                    return
                try:
                    results[i] = await self.one_seed(seeds[i])
                except StopRequested:  # the seed stays unfinished: its replies so far are journaled
                    return
                except Exception as exc:  # noqa: BLE001 - PermanentError, an unwritable journal, a bug: stop cleanly
                    self.stopper.stop(str(exc), exc)
                    return
                if isinstance(results[i], Transcript):
                    done["transcripts"] += 1
                bar.set_postfix_str(postfix(), refresh=False)
                bar.update(1)

        # No TaskGroup: an error in one worker must not cancel the requests in flight in the others (replies paid
        # for but not yet journaled would be lost): it stops the run, and the others finish what they started.
        tasks = [
            asyncio.create_task(worker())
            for _ in range(0 if self.stopper.stopping else min(self.cfg.concurrency, max(len(seeds), 1)))
        ]
        try:
            await self.stopper.wait(tasks)
        finally:
            bar.close()
        if self.stopper.stopping:
            raise self._stopped(sum(r is not None for r in results), len(seeds))

        transcripts = [r for r in results if isinstance(r, Transcript)]
        failures = [r for r in results if isinstance(r, dict)]
        wall = time.monotonic() - started
        message = None
        if self.budget_hit:
            message = (
                f"budget reached: {self._over_budget() or next(iter(self._unsubmitted.values()), 'limit')}; "
                f"{len(transcripts)} transcripts kept, "
                f"{sum(f['reason'] == 'budget_exhausted' for f in failures)} seeds left for a re-run with a higher budget"
            )
        return RunResult(transcripts, failures, self._metrics(seeds, transcripts, failures, wall), message)

    async def _run_batches(self, seeds: list[Seed]) -> None:
        """Batch API: submit every request not yet journaled that the budget allows; the seeds then read the journal.

        The budget is checked before submitting, on an estimate (prompt characters / 4 + max_tokens, at the batch
        price): requests are taken in seed order, replies already journaled counted at their real cost, until the
        next one would pass `max_cost_usd` or `max_total_tokens`; the rest are not submitted, and their seeds are
        recorded as `budget_exhausted` failures (a re-run with a higher budget submits them).
        """
        pending: dict[str, ChatRequest] = {}
        cost, tokens = 0.0, 0
        for request in map(self.transcript_request, seeds):
            key = journal_key(request, self.backend)
            reply = self.journal.get(key)
            if reply is not None:
                cost += self.cost(reply)
                tokens += reply.prompt_tokens + reply.completion_tokens
                continue
            if key in self._unsubmitted or key in pending:  # two seeds with the same text: one request
                continue
            prompt = sum(len(m["content"]) for m in request.messages) // 4 + 1
            est_tokens = prompt + request.max_tokens
            est_cost = self.cost(Completion("", None, prompt, request.max_tokens))
            over = None
            if self.cfg.max_cost_usd is not None and cost + est_cost > self.cfg.max_cost_usd:
                over = f"not submitted: estimated ${cost + est_cost:.4f} would pass selfchat.max_cost_usd = {self.cfg.max_cost_usd}"
            elif self.cfg.max_total_tokens is not None and tokens + est_tokens > self.cfg.max_total_tokens:
                over = (
                    f"not submitted: estimated {tokens + est_tokens} tokens would pass "
                    f"selfchat.max_total_tokens = {self.cfg.max_total_tokens}"
                )
            if over or self._unsubmitted:  # in seed order: once one is out, the later ones are out too
                self._unsubmitted[key] = over or next(iter(self._unsubmitted.values()))
                continue
            cost += est_cost
            tokens += est_tokens
            pending[key] = request
        try:
            for completion in await self.backend.complete_many(list(pending.values()), self.journal):
                self.new.add(completion, self.cost(completion))
        except StopRequested:
            pass
        except PermanentError as exc:
            self.stopper.stop(str(exc), exc)

    def _stopped(self, finished: int, total: int) -> BaseException:
        """The error that ends a stopped run: the one that stopped it, or `Interrupted`, with a one-line summary."""
        st = self.stopper
        parts = [f"{finished}/{total} seeds finished", f"{self.new.requests} new replies journaled in {self.journal.path}"]
        if st.finished_after_stop():
            parts.append(st.finished_after_stop())
        if st.aborted:
            parts.append(f"aborted: {st.cancelled_tasks} seeds' requests in flight cancelled (a reply on its way is paid again)")
        summary = "; ".join(parts) + "; a re-run goes on from the journal"
        error = st.error
        if error is None:
            return Interrupted(f"selfchat {st.reason}: {summary}", st.signum or 2)
        if isinstance(error, BaizeError):
            error.args = (f"{error}; {summary}",)
        return error

    def _metrics(self, seeds, transcripts, failures, wall: float) -> dict[str, Any]:
        stats = getattr(self.backend, "stats", None)
        return {
            "seeds": len(seeds),
            "transcripts": len(transcripts),
            "failures": len(failures),
            "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
            **conversation_stats(transcripts),
            # Every AI answer written (turns mode), also those whose pair was dropped or whose seed failed.
            "ai_cut_share": round(self.ai_replies["cut"] / sum(self.ai_replies.values()), 4) if self.ai_replies else 0.0,
            "tokens": {"prompt": self.total.prompt_tokens, "completion": self.total.completion_tokens},
            "cost_usd": round(self.total.cost_usd, 6),
            "new": {
                "replies": self.new.requests,
                "prompt_tokens": self.new.prompt_tokens,
                "completion_tokens": self.new.completion_tokens,
                "cost_usd": round(self.new.cost_usd, 6),
            },
            "replies_from_journal": self.total.requests - self.new.requests,
            # Backends keep their own counters (each attempt, retries); the local one has no retries.
            "requests": getattr(stats, "requests", self.new.requests),
            "retries": getattr(stats, "retries", 0),
            "errors_by_kind": dict(sorted((getattr(stats, "errors", None) or {}).items())),
            "budget_exhausted": self.budget_hit,
            # openai-batch: requests the budget kept out of the batches (their seeds are budget_exhausted failures)
            **({"batch_not_submitted": len(self._unsubmitted)} if hasattr(self.backend, "complete_many") else {}),
            "wall_s": round(wall, 3),
            "transcripts_per_min": round(len(transcripts) / wall * 60, 3) if wall > 0 else 0.0,
        }


def conversation_stats(transcripts: list[Transcript]) -> dict[str, Any]:
    """What the conversations look like: rounds, turn lengths (words), how they ended, cut answers, re-asked
    human turns, and the share of follow-up questions that merely repeat the seed or an earlier question."""
    n = len(transcripts)
    humans = [t.text for tr in transcripts for t in tr.turns if t.role == "human"]
    ais = [t.text for tr in transcripts for t in tr.turns if t.role == "ai"]
    followups = repeated = 0
    for tr in transcripts:
        asked = [tr.seed]
        for i, t in enumerate(x for x in tr.turns if x.role == "human"):
            if i:
                followups += 1
                repeated += prompts.repeats(t.text, asked)
            asked.append(t.text)
    dropped = Counter(d["reason"] for tr in transcripts for d in tr.meta.get("dropped", []) if d.get("role") == "ai")
    reasks: Counter[str] = Counter()
    for tr in transcripts:
        reasks.update(tr.meta.get("reasks") or {})

    def mean_words(texts: list[str]) -> float:
        return round(sum(len(x.split()) for x in texts) / len(texts), 2) if texts else 0.0

    return {
        "turns_per_transcript": round(sum(len(t.turns) for t in transcripts) / n, 4) if n else 0.0,
        "rounds_per_transcript": round(len(ais) / n, 4) if n else 0.0,
        "human_words": mean_words(humans),
        "ai_words": mean_words(ais),
        "followup_repeat_share": round(repeated / followups, 4) if followups else 0.0,
        # AI answers cut by max_tokens: dropped with their pair (kept ones are in meta.truncated_turns)
        "ai_cut": {
            "dropped": dropped.get("truncated", 0),
            "kept": sum(len(t.meta.get("truncated_turns") or []) for t in transcripts),
        },
        "ended": dict(sorted(Counter(str(t.meta.get("ended")) for t in transcripts).items())),
        "reasks": dict(sorted(reasks.items())),
    }


def _failure(seed: Seed, reason: str, detail: str, status: int | None = None) -> dict[str, Any]:
    failure = {"seed_id": seed.id, "seed": seed.text, "reason": reason, "detail": detail}
    if status is not None:  # the HTTP status of a refused request (400, 413, 422, a capped 429 ...)
        failure["status"] = status
    return failure


def _progress(total: int, enabled: bool | None, postfix=None):
    """Seeds done, with transcripts/min, tokens and cost so far (refreshed while a batch is under way), on a
    terminal as a bar, off it as a line every 10 s (see baize.progress); `enabled=False`: none."""
    from baize import progress

    return progress.bar(total, desc="selfchat", unit="seed", enabled=None if enabled is None else enabled,
                        postfix=postfix)
