"""Run self-chat for every seed: many seeds in flight, replies journaled, a budget, and a record for every seed.

Every seed ends as a `Transcript` or as a failure `{seed_id, seed, reason, detail}`; results come back in seed
order and depend only on the journal's replies, so a re-run over the same journal writes the same files.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from baize.selfchat import prompts
from baize.selfchat.backend import Backend, BackendError, ChatRequest, Completion, PermanentError, redact
from baize.selfchat.journal import Journal
from baize.selfchat_parse import parse_selfchat
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
    concurrency: int = 16  # seeds in flight
    max_cost_usd: float | None = None
    max_total_tokens: int | None = None
    price_in_per_1m: float = 0.0
    price_out_per_1m: float = 0.0


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


class Engine:
    def __init__(self, backend: Backend, journal: Journal, cfg: EngineConfig, *, progress: bool | None = None):
        self.backend = backend
        self.journal = journal
        self.cfg = cfg
        self.progress = progress  # None: a bar only on a terminal
        self.price_factor = getattr(backend, "price_factor", 1.0)  # the Batch API costs half
        self.total = Usage()  # every reply used by this run, from the journal or new
        self.new = Usage()  # replies paid for in this run
        self._inflight: dict[str, asyncio.Future] = {}
        self.budget_hit = False

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
        key = request.key(self.backend.name)
        completion = self.journal.get(key)
        if completion is None:
            if key in self._inflight:  # the same request already on its way: wait for it, pay once
                completion = await asyncio.shield(self._inflight[key])
            else:
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
        """v1.5 way: per round, one call writes the human turn, a plain chat call answers it."""
        cfg = self.cfg
        human_stop = prompts.HUMAN_STOP + [s for s in (cfg.stop or []) if s not in prompts.HUMAN_STOP]
        turns: list[Turn] = []
        for _ in range(cfg.max_rounds):
            if not turns and cfg.first_human == "seed":
                # A question seed asked as is: small models often answer the human-turn prompt as the AI
                # (an empty human turn), which would end every conversation before it starts.
                human = seed.text.strip()
                run.raw.append({"role": "human", "text": human, "finish_reason": "seed"})
            else:
                human = await self._human_turn(seed, turns, human_stop, run)
                if human is None:
                    return turns, "human_done"
                if human is False:
                    return turns, "truncated"
            ai, a = await self._turn(
                "ai", prompts.ai_turn_messages([*turns, Turn(role="human", text=human)]), cfg.max_tokens, cfg.stop, run
            )
            if not ai:
                run.dropped += [{"reason": "empty", "role": "ai", "text": ""}]
                return turns, "empty_ai"
            if a.finish_reason == "length" and cfg.keep_truncated:
                run.truncated_turns.append(len(turns) + 1)  # index the AI turn will have
            elif a.finish_reason == "length":
                run.dropped += [
                    {"reason": "truncated", "role": "human", "text": human},
                    {"reason": "truncated", "role": "ai", "text": ai},
                ]
                return turns, "truncated"
            turns += [Turn(role="human", text=human), Turn(role="ai", text=ai)]
        return turns, "max_rounds"

    async def _turn(self, role: str, messages: list[dict], max_tokens: int, stop, run: _SeedRun) -> tuple[str, Completion]:
        """One turn's call: the raw reply is recorded, then cleaned; text past the turn is recorded as dropped."""
        reply = await self.call(self._request(messages, max_tokens=max_tokens, stop=stop), run)
        run.raw.append({"role": role, "text": reply.text, "finish_reason": reply.finish_reason})
        text, tail = prompts.clean_turn(reply.text)
        if tail:
            run.dropped.append({"reason": "overrun", "role": role, "text": tail})
        return text, reply

    async def _human_turn(self, seed: Seed, turns: list[Turn], stop: list[str], run: _SeedRun) -> str | None | bool:
        """The next human turn; None when the human has nothing more to ask, False when it was cut by max_tokens."""
        human, h = await self._turn(
            "human",
            prompts.human_turn_messages(seed.text, turns),
            self.cfg.human_max_tokens or self.cfg.max_tokens,
            stop[:4],  # the API takes at most 4 stop strings
            run,
        )
        if not human:
            return None
        if h.finish_reason == "length":
            run.dropped.append({"reason": "truncated", "role": "human", "text": human})
            return False
        return human

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
        except BackendError as exc:
            return _failure(seed, exc.reason, redact(str(exc)))
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
        bar = _progress(len(seeds), self.progress)
        done = {"transcripts": 0}

        if self.cfg.mode == "transcript" and hasattr(self.backend, "complete_many"):
            # Batch API: submit every request not yet journaled in one go; the seeds then read the journal.
            if not self._over_budget():
                pending = [r for r in map(self.transcript_request, seeds) if not self.journal.get(r.key(self.backend.name))]
                for completion in await self.backend.complete_many(pending, self.journal):
                    self.new.add(completion, self.cost(completion))

        next_index = iter(range(len(seeds)))

        async def worker() -> None:
            for i in next_index:  # a shared iterator: each seed is taken by exactly one worker
                results[i] = await self.one_seed(seeds[i])
                if isinstance(results[i], Transcript):
                    done["transcripts"] += 1
                if bar is not None:
                    minutes = max(time.monotonic() - started, 1e-6) / 60
                    bar.set_postfix_str(
                        f"{done['transcripts'] / minutes:.1f} transcripts/min, "
                        f"{self.total.tokens} tok, ${self.total.cost_usd:.4f}",
                        refresh=False,
                    )
                    bar.update(1)

        try:
            async with asyncio.TaskGroup() as group:  # a PermanentError in one worker cancels the others
                for _ in range(min(self.cfg.concurrency, max(len(seeds), 1))):
                    group.create_task(worker())
        except BaseExceptionGroup as group:
            # Surface the one error that stopped the run (a PermanentError first), not a group traceback.
            first = next((e for e in group.exceptions if isinstance(e, PermanentError)), group.exceptions[0])
            raise first from None
        finally:
            if bar is not None:
                bar.close()

        transcripts = [r for r in results if isinstance(r, Transcript)]
        failures = [r for r in results if isinstance(r, dict)]
        wall = time.monotonic() - started
        message = None
        if self.budget_hit:
            message = (
                f"budget reached: {self._over_budget() or 'limit'}; {len(transcripts)} transcripts kept, "
                f"{sum(f['reason'] == 'budget_exhausted' for f in failures)} seeds left for a re-run with a higher budget"
            )
        return RunResult(transcripts, failures, self._metrics(seeds, transcripts, failures, wall), message)

    def _metrics(self, seeds, transcripts, failures, wall: float) -> dict[str, Any]:
        stats = getattr(self.backend, "stats", None)
        turns = [len(t.turns) for t in transcripts]
        return {
            "seeds": len(seeds),
            "transcripts": len(transcripts),
            "failures": len(failures),
            "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
            "turns_per_transcript": round(sum(turns) / len(turns), 4) if turns else 0.0,
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
            "wall_s": round(wall, 3),
            "transcripts_per_min": round(len(transcripts) / wall * 60, 3) if wall > 0 else 0.0,
        }


def _failure(seed: Seed, reason: str, detail: str) -> dict[str, Any]:
    return {"seed_id": seed.id, "seed": seed.text, "reason": reason, "detail": detail}


def _progress(total: int, enabled: bool | None):
    if enabled is False:
        return None
    from tqdm import tqdm

    # disable=None: tqdm draws only on a terminal (DVC passes it through; tests and logs stay clean).
    return tqdm(total=total, unit="seed", desc="selfchat", disable=None if enabled is None else False, mininterval=1.0)
