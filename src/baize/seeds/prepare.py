"""From raw source rows to the seed list: normalize, filter, de-duplicate, sample by weight.

Deterministic: the same params and inputs give the same seeds in the same order. Sampling does not use a
shuffled RNG stream but a keyed hash per seed (sha256 of `random_seed` and the seed id): each source's
seeds are taken in that order. So the choice is independent of the input's row order, and raising
`num_seeds` keeps every seed chosen before (only adds new ones) - small params changes give small diffs.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from baize.config import SeedParams
from baize.errors import InputError, json_line
from baize.seeds.dedupe import dedupe_key, near_duplicates
from baize.seeds.sources import LoadedSource, load_source

# Markers of the self-chat and training formats: a seed containing one would corrupt the transcript.
MARKERS = ("[Human]", "[AI]", "[|Human|]", "[|AI|]")
DROP_REASONS = ("empty", "too_short", "too_long", "marker", "domain", "duplicate", "near_duplicate")


@dataclass(frozen=True)
class Seed:
    id: str
    """sha256 of the normalized text, 16 hex digits: the same question always gets the same id."""
    text: str
    source: str
    """The source label, e.g. `packaged:medical`, `file:data/my.csv`, `hf:quora`."""
    domain: str

    def to_json_line(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class PrepareResult:
    seeds: list[Seed]
    requested: int
    loaded: dict[str, int]
    dropped: dict[str, int]
    available: dict[str, int]
    """Seeds left per source after filtering and de-duplication (what sampling chose from)."""
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def shortfall(self) -> int:
        return max(0, self.requested - len(self.seeds))

    def metrics(self) -> dict:
        return {
            "requested": self.requested,
            "written": len(self.seeds),
            "shortfall": self.shortfall,
            "loaded_total": sum(self.loaded.values()),
            "loaded": self.loaded,
            "dropped_total": sum(self.dropped.values()),
            "dropped": self.dropped,
            "available": self.available,
            "sampled": {
                "by_source": dict(sorted(Counter(s.source for s in self.seeds).items())),
                "by_domain": dict(sorted(Counter(s.domain for s in self.seeds).items())),
            },
        }


_INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\u200c\u200d\u2060"))  # BOM and zero-width characters


def normalize_text(text: str) -> str:
    """NFC, no BOM/zero-width characters, every run of whitespace (newlines, tabs, NBSP) to one space, trimmed."""
    return " ".join(unicodedata.normalize("NFC", text).translate(_INVISIBLE).split())


def seed_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _priority(random_seed: int, sid: str) -> str:
    return hashlib.sha256(f"{random_seed}:{sid}".encode()).hexdigest()


def allocate(num: int, weights: Sequence[float], available: Sequence[int]) -> list[int]:
    """How many seeds to take from each source: shares proportional to weight (largest remainder), and
    what a source cannot supply goes to the others, again by weight."""
    quotas = [0] * len(weights)
    remaining = min(num, sum(available))
    while remaining > 0:
        active = [i for i in range(len(weights)) if quotas[i] < available[i]]
        total = sum(weights[i] for i in active)
        exact = {i: remaining * weights[i] / total for i in active}
        share = {i: int(exact[i]) for i in active}
        leftover = remaining - sum(share.values())
        for i in sorted(active, key=lambda i: (-(exact[i] - share[i]), i))[:leftover]:
            share[i] += 1
        for i in active:
            take = min(share[i], available[i] - quotas[i])
            quotas[i] += take
            remaining -= take
    return quotas


def prepare_seeds(params: SeedParams, loaded: Iterable[LoadedSource] | None = None) -> PrepareResult:
    """Load every source of `params` (or take already `loaded` ones), filter, de-duplicate and sample."""
    sources = list(loaded) if loaded is not None else [load_source(s, i) for i, s in enumerate(params.sources)]
    # Two entries may have the same label (same file twice with different fields): number them apart.
    labels = [s.label for s in sources]
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels[i] = f"{lab}#{i}"
    dropped = dict.fromkeys(DROP_REASONS, 0)
    domains = set(params.domains) if params.domains is not None else None

    # 1. Normalize and filter row by row; exact duplicates (same normalized text = same id) go here too.
    candidates: list[Seed] = []
    by_id: set[str] = set()
    for src, label in zip(sources, labels):
        for raw in src.items:
            text = normalize_text(raw.text or "")
            reason = None
            if not text or not dedupe_key(text):  # nothing, or no letters/digits at all ("?????")
                reason = "empty"
            elif len(text) < params.min_chars:
                reason = "too_short"
            elif len(text) > params.max_chars:
                reason = "too_long"
            elif any(m in text for m in MARKERS):
                reason = "marker"
            elif domains is not None and raw.domain not in domains:
                reason = "domain"
            if reason is None:
                sid = seed_id(text)
                if sid in by_id:
                    reason = "duplicate"
                else:
                    by_id.add(sid)
                    candidates.append(Seed(sid, text, label, raw.domain))
            if reason:
                dropped[reason] += 1

    # 2. Near duplicates across all sources (first occurrence in source order wins).
    near = near_duplicates([s.text for s in candidates], params.near_duplicate_threshold)
    dropped["near_duplicate"] = len(near)
    kept = [s for i, s in enumerate(candidates) if i not in near]

    # 3. Sample each source's quota in keyed-hash order.
    pools: dict[str, list[Seed]] = {label: [] for label in labels}
    for s in kept:
        pools[s.source].append(s)
    for pool in pools.values():
        pool.sort(key=lambda s: _priority(params.random_seed, s.id))
    quotas = allocate(params.num_seeds, [s.weight for s in sources], [len(pools[lab]) for lab in labels])
    chosen = [s for lab, q in zip(labels, quotas) for s in pools[lab][:q]]
    chosen.sort(key=lambda s: _priority(params.random_seed, s.id))  # mix sources in the output

    return PrepareResult(
        seeds=chosen,
        requested=params.num_seeds,
        loaded={lab: len(src.items) for lab, src in zip(labels, sources)},
        dropped=dropped,
        available={lab: len(pools[lab]) for lab in labels},
        weights={lab: src.weight for lab, src in zip(labels, sources)},
    )


# --------------------------------------------------------------------------- seeds.jsonl


def write_seeds(path: str | Path, seeds: Iterable[Seed]) -> None:
    """Write seeds.jsonl atomically (temp file + rename): a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for s in seeds:
            fh.write(s.to_json_line() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_seeds(path: str | Path) -> list[Seed]:
    """Read seeds.jsonl (the `selfchat` stage's input); a bad line raises InputError naming file:line."""
    path = Path(path)
    out: list[Seed] = []
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise InputError(path, None, "seeds file not found (run the `seed` stage first)") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json_line(line, path, lineno)
            try:
                seed = Seed(**{k: rec[k] for k in ("id", "text", "source", "domain")})
            except (KeyError, TypeError) as exc:
                raise InputError(path, lineno, f"not a seed record (needs id, text, source, domain): {exc}") from None
            if not all(isinstance(v, str) for v in asdict(seed).values()) or not seed.text:
                raise InputError(path, lineno, "seed fields must be non-empty strings")
            out.append(seed)
    return out
