"""Self-chat throughput against a rate-limited OpenAI-compatible stub: the paper's loop vs the `openai` backend.

    .venv/bin/python benchmarks/selfchat_throughput.py [--seeds 2500] [--reference-s 25]

The stub (tests/selfchat_stub.py) answers after 300 ms and allows 3,000 requests/min (429 + Retry-After beyond).
The reference loop is the paper's collection code: one request at a time, `sleep(1)` before each. Ours is the
stage's engine (transcript mode, journal on disk, every reply fsynced) with the `openai` backend.
Prints transcripts/min for each, the ratio, the fraction of the rate limit reached, and lost/duplicated counts.
(Part 2, local backend vs served, lives with the local backend.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import openai  # noqa: E402
from selfchat_stub import StubServer  # noqa: E402

from baize.selfchat import prompts  # noqa: E402
from baize.selfchat.engine import Engine, EngineConfig, Seed  # noqa: E402
from baize.selfchat.journal import Journal  # noqa: E402
from baize.selfchat.openai_backend import OpenAIBackend  # noqa: E402
from baize.selfchat.parse import parse_selfchat  # noqa: E402

LATENCY_S = 0.3
RPM_LIMIT = 3000


def reference_loop(url: str, seeds: list[Seed], seconds: float) -> tuple[int, float]:
    """The paper's collect loop: sleep(1), one request, parse; for `seconds`. Returns (transcripts, wall)."""
    client = openai.OpenAI(api_key="benchmark", base_url=url, max_retries=5)
    done, start = 0, time.monotonic()
    for seed in seeds:
        if time.monotonic() - start >= seconds:
            break
        time.sleep(1)
        reply = client.chat.completions.create(
            model="stub", messages=prompts.transcript_messages(seed.text), temperature=0.7, top_p=0.95, max_tokens=256
        )
        if parse_selfchat(reply.choices[0].message.content).turns:
            done += 1
    return done, time.monotonic() - start


async def ours(url: str, seeds: list[Seed], journal_path: Path):
    backend = OpenAIBackend(base_url=url, concurrency=64, requests_per_minute=RPM_LIMIT, max_retries=8)
    try:
        with Journal(journal_path) as journal:
            engine = Engine(backend, journal, EngineConfig(model="stub", mode="transcript", concurrency=64), progress=False)
            return await engine.run(seeds), backend.stats
    finally:
        await backend.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2500, help="seeds for our backend (2500 = 50 s at the limit)")
    ap.add_argument("--reference-s", type=float, default=25.0, help="how long to run the reference loop")
    args = ap.parse_args()
    os.environ.pop("OPENAI_API_KEY", None)
    seeds = [Seed(f"seed-{i:05d}", f"benchmark topic number {i}") for i in range(args.seeds)]

    with StubServer(latency_s=LATENCY_S, rpm_limit=RPM_LIMIT) as stub:
        ref_done, ref_wall = reference_loop(stub.url, seeds, args.reference_s)
    ref_rate = ref_done / ref_wall * 60

    with tempfile.TemporaryDirectory() as tmp, StubServer(latency_s=LATENCY_S, rpm_limit=RPM_LIMIT) as stub:
        start = time.monotonic()
        result, stats = asyncio.run(ours(stub.url, seeds, Path(tmp) / "journal.jsonl"))
        wall = time.monotonic() - start
        paid_twice = sum(1 for n in stub.state.ok_counts.values() if n > 1)
        answered = len(stub.state.ok_counts)
        rejected_429 = stub.state.statuses[429]
    ids = [t.seed_id for t in result.transcripts]
    lost = len(seeds) - len(set(ids))
    duplicated = len(ids) - len(set(ids)) + paid_twice
    rate = len(result.transcripts) / wall * 60

    rows = [
        ("reference loop (sleep(1), 1 at a time)", ref_done, ref_wall, ref_rate, ref_rate / RPM_LIMIT, "-", "-", "-"),
        ("baize openai backend (engine+journal)", len(result.transcripts), wall, rate, rate / RPM_LIMIT, lost, duplicated, stats.retries),
    ]
    print(f"\nstub: {LATENCY_S * 1000:.0f} ms latency, {RPM_LIMIT} requests/min limit (429 + Retry-After beyond); "
          f"{os.cpu_count()} CPU cores")
    print(f"{'':42} {'transcripts':>11} {'wall s':>7} {'per min':>8} {'of limit':>8} {'lost':>5} {'dup':>4} {'retries':>7}")
    for name, n, w, r, frac, lo, du, re in rows:
        print(f"{name:42} {n:>11} {w:>7.1f} {r:>8.1f} {frac:>8.1%} {lo!s:>5} {du!s:>4} {re!s:>7}")
    print(f"\nratio ours / reference: {rate / ref_rate:.1f}x; stub answered {answered} distinct requests, "
          f"{rejected_429} answered 429, {paid_twice} paid twice; failures: {result.metrics['failures_by_reason']}")
    target = rate / RPM_LIMIT >= 0.9 and lost == 0 and duplicated == 0
    print(f"target (>= 90% of the limit, 0 lost, 0 duplicated): {'met' if target else 'NOT met'}")


if __name__ == "__main__":
    main()
