"""Seed questions for self-chat: packaged sets, local files and Hub datasets, mixed by weight.

    from baize.seeds import prepare_seeds, write_seeds, read_seeds
    result = prepare_seeds(SeedParams(...))   # load, normalize, filter, de-duplicate, sample
    write_seeds("data/seeds/seeds.jsonl", result.seeds)
    seeds = read_seeds("data/seeds/seeds.jsonl")   # list[Seed(id, text, source, domain)]
"""

from baize.seeds.dedupe import dedupe_key, jaccard, near_duplicates
from baize.seeds.prepare import (
    DROP_REASONS,
    PrepareResult,
    Seed,
    allocate,
    normalize_text,
    prepare_seeds,
    read_seeds,
    seed_id,
    write_seeds,
)
from baize.seeds.sources import (
    KNOWN_HF_DATASETS,
    PACKAGED_DOMAINS,
    LoadedSource,
    RawSeed,
    load_file,
    load_hf,
    load_packaged,
    load_source,
)

__all__ = [
    "DROP_REASONS", "KNOWN_HF_DATASETS", "PACKAGED_DOMAINS", "LoadedSource", "PrepareResult", "RawSeed", "Seed",
    "allocate", "dedupe_key", "jaccard", "load_file", "load_hf", "load_packaged", "load_source", "near_duplicates",
    "normalize_text", "prepare_seeds", "read_seeds", "seed_id", "write_seeds",
]
