"""Benchmark: the seed stage's preparation (normalize, filter, exact + near de-duplication, sampling) at scale.

    python benchmarks/seed_dedupe.py [--n 50000] [--check 1500]

Generates `n` Quora/Stack-Overflow-like questions (word sequences drawn with a Zipf-like distribution from
the packaged seed vocabulary, 10% of them perturbed copies of others: case, punctuation, one word changed or
dropped), writes them to a temp txt file and times `prepare_seeds` on it, then compares the MinHash-LSH
near-duplicate search with a brute-force all-pairs Jaccard on the first `check` questions (same result
expected) and reports the speed-up. Prints a table.
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import tempfile
import time
from pathlib import Path

from baize.config import SeedParams, SeedSource
from baize.seeds import load_packaged, near_duplicates, normalize_text
from baize.seeds.dedupe import shingles


def synthetic_questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = sorted({w for s in load_packaged("all") for w in re.findall(r"[A-Za-z']+", s.text.lower())})
    weights = [1 / (i + 1) for i in range(len(words))]  # Zipf-like: a few very common words
    rng.shuffle(words)
    starts = ["how do i", "what is the", "why does", "how to", "what are the", "is it", "how can i", "what is"]
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.10:  # a near or exact copy of an earlier question
            base = rng.choice(out).split()
            op = rng.randrange(4)
            if op == 0:
                base = [w.upper() if rng.random() < 0.3 else w for w in base]
            elif op == 1 and len(base) > 6:
                del base[rng.randrange(len(base))]
            elif op == 2:
                base[rng.randrange(len(base))] = rng.choice(words)
            out.append(" ".join(base) + rng.choice(["", "?", "??", " ."]))
            continue
        body = rng.choices(words, weights, k=rng.randint(4, 14))
        out.append(f"{rng.choice(starts)} {' '.join(body)}?".capitalize())
    return out


def brute_force(texts: list[str], threshold: float) -> set[int]:
    sets = [shingles(t) for t in texts]
    dropped, kept = set(), []
    for i, s in enumerate(sets):
        if any(len(s & sets[j]) / len(s | sets[j]) >= threshold - 1e-9 for j in kept):
            dropped.add(i)
        else:
            kept.append(i)
    return dropped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--check", type=int, default=1500)
    ap.add_argument("--threshold", type=float, default=SeedParams().near_duplicate_threshold)
    args = ap.parse_args()

    texts = synthetic_questions(args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seeds.txt"
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
        from baize.seeds import prepare_seeds

        params = SeedParams(
            sources=[SeedSource(type="file", name=str(path))], num_seeds=1000,
            near_duplicate_threshold=args.threshold, max_chars=1000,
        )
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0, c0 = time.perf_counter(), time.process_time()
        result = prepare_seeds(params)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = result.metrics()
    rows.append((f"prepare_seeds, {args.n:,} questions (load+filter+dedupe+sample)", f"{elapsed:.2f} s",
                 f"{m['dropped']['duplicate']:,} exact + {m['dropped']['near_duplicate']:,} near dropped, "
                 f"CPU {cpu:.2f} s, peak RSS {peak:.0f} MiB (was {rss0:.0f} MiB before)"))

    sub = [normalize_text(t) for t in texts[: args.check]]
    sub = list(dict.fromkeys(sub))  # exact duplicates are removed before near-duplicate search
    t0 = time.perf_counter()
    fast = set(near_duplicates(sub, args.threshold))
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = brute_force(sub, args.threshold)
    t_slow = time.perf_counter() - t0
    rows.append((f"near_duplicates, first {len(sub):,} (MinHash LSH + exact check)", f"{t_fast:.3f} s", f"{len(fast)} dropped"))
    rows.append((f"brute-force all pairs, same {len(sub):,}", f"{t_slow:.3f} s",
                 f"{len(slow)} dropped; identical result: {fast == slow}; speed-up {t_slow / t_fast:.0f}x"))

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'time':>9}  result")
    for what, t, res in rows:
        print(f"{what:<{width}}  {t:>9}  {res}")


if __name__ == "__main__":
    main()
