"""Near-duplicate detection for short questions: character 3-gram Jaccard, deterministic, fast.

Two seeds are near duplicates when the Jaccard similarity of the character 3-gram sets of their *keys*
(case-folded, punctuation removed, whitespace collapsed) is at least the threshold.

Candidates come from MinHash LSH (128 hash functions, content-seeded, so the same text always gets the
same signature: deterministic and independent of input order); every candidate pair is then checked with
the exact Jaccard, so nothing below the threshold is ever dropped. The band width is chosen from the
threshold so that a pair *at* the threshold is missed with probability <= 0.1% (far less above it).
Exact all-pairs search (prefix filtering) was tried first: 3-grams come from a small alphabet, so even
the rarest grams of a question are shared by thousands of others and it grew quadratically (4.9 s for
10k questions); MinHash LSH does 50k in seconds (benchmarks/seed_dedupe.py).

Why character 3-grams: on questions of 5-20 words, word sets jump too much for a one-word change; 3-grams
catch "What's"/"What is", plurals, case and punctuation variants at 0.85 while keeping templated but
distinct questions ("symptoms of Cowden syndrome" vs "... of Cohen syndrome": 0.83) apart.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

SHINGLE = 3
_NON_WORD = re.compile(r"[\W_]+")


def dedupe_key(text: str) -> str:
    """What near-duplicate detection compares: case-folded words without punctuation."""
    return " ".join(_NON_WORD.sub(" ", text.casefold()).split())


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    key = f" {dedupe_key(text)} "  # padded so that first and last words count as much as middle ones
    if len(key) <= n:
        return {key}
    return {key[i : i + n] for i in range(len(key) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


NUM_HASHES = 128
MAX_MISS = 1e-3  # probability that a pair exactly at the threshold shares no LSH band


def lsh_bands(threshold: float, num_hashes: int = NUM_HASHES) -> tuple[int, int]:
    """(rows per band, bands): the widest band (fewest false candidates) that still misses a pair at the
    threshold with probability <= MAX_MISS, i.e. (1 - t**rows) ** bands <= MAX_MISS."""
    for rows in range(num_hashes, 0, -1):
        bands = num_hashes // rows
        if (1 - threshold**rows) ** bands <= MAX_MISS:
            return rows, bands
    return 1, num_hashes


def _gram_hashes(grams: Sequence[str]) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little") for g in grams],
        dtype=np.uint64,
    )


def _signatures(docs: Sequence[np.ndarray], gram_table: np.ndarray) -> np.ndarray:
    """MinHash signature (num_docs, NUM_HASHES) uint32: per hash function, the minimum over the doc's grams.
    (A plain loop of row-gathers + min is ~20x faster here than one np.minimum.reduceat over all docs.)"""
    out = np.empty((len(docs), gram_table.shape[1]), dtype=np.uint32)
    for i, ids in enumerate(docs):
        out[i] = gram_table[ids].min(axis=0)
    return out


def near_duplicates(texts: Sequence[str], threshold: float) -> dict[int, int]:
    """Indices of texts that nearly duplicate an earlier kept text: {dropped index: kept index}.

    The first of a group is kept (input order), each later one is compared with kept texts only, so the
    result does not depend on chains (a ~ b ~ c with a !~ c keeps a and c).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not texts:
        return {}
    # 1. Each text as its set of integer gram ids (for the exact check) and an id array (for MinHash).
    # Tuples, not sets: a tuple of 60 ints is ~4x smaller than a frozenset (50k texts: ~30 MB, not ~200 MB).
    vocab: dict[str, int] = {}
    grams: list[tuple[int, ...]] = []
    for text in texts:
        grams.append(tuple(vocab.setdefault(g, len(vocab)) for g in shingles(text)))
    docs = [np.array(g, dtype=np.int64) for g in grams]
    # 2. K hash values per gram, from the gram's text (multiply-shift hashing with fixed odd multipliers).
    rng = np.random.default_rng(20230403)  # fixed: the same text gets the same signature in every run
    mult = rng.integers(1, 2**63, size=NUM_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    add = rng.integers(0, 2**63, size=NUM_HASHES, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around modulo 2**64 is the point
        table = ((_gram_hashes(list(vocab))[:, None] * mult[None, :] + add[None, :]) >> np.uint64(32)).astype(np.uint32)
    sig = _signatures(docs, table)
    rows, bands = lsh_bands(threshold)
    # One 64-bit key per band (its `rows` values folded together); a collision only adds a candidate,
    # which the exact check then rejects. Python ints as keys: ~3x less memory than bytes keys + lists.
    band_keys = np.zeros((len(texts), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            for col in sig[:, b * rows : (b + 1) * rows].T:
                band_keys[:, b] = band_keys[:, b] * np.uint64(0x100000001B3) + col
    # 3. Walk the texts in order; candidates share a band with a kept text; verify exactly.
    # A bucket holds one kept index (the common case) or a list of them.
    buckets: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
    dropped: dict[int, int] = {}
    for i, doc in enumerate(grams):
        mine = set(doc)
        keys = band_keys[i].tolist()
        match = None
        seen: set[int] = set()
        for b, key in enumerate(keys):
            found = buckets[b].get(key)
            for j in (found,) if isinstance(found, int) else found or ():
                if j in seen:
                    continue
                seen.add(j)
                other = grams[j]
                overlap = len(mine.intersection(other))
                if overlap / (len(mine) + len(other) - overlap) >= threshold - 1e-9:
                    match = j
                    break
            if match is not None:
                break
        if match is not None:
            dropped[i] = match
            continue
        for b, key in enumerate(keys):
            found = buckets[b].get(key)
            if found is None:
                buckets[b][key] = i
            elif isinstance(found, int):
                buckets[b][key] = [found, i]
            else:
                found.append(i)
    return dropped
