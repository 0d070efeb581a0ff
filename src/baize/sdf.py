"""Baize v2: self-distillation with feedback (SDF; paper v4, Section 4 and Appendix C), the parts that are not
the judge (`baize.judge`) or the trainer (`baize.training`):

1. `choose_prompts`: questions the first adapter never trained on (the same seed sources as the `seed` stage,
   minus every seed and human turn it could have seen, and their near duplicates);
2. `sample_answers`: `num_samples` answers per prompt from the v1.5 model (base + the `train` adapter) with Baize's
   inference prompt and sampling (top-p 0.95, temperature 1, stop at `[|Human|]` / `[|AI|]`), through any
   self-chat backend, every reply journaled (a kill -9 or a re-run re-samples nothing already written);
3. `select_best`: after judging, the best-scored answer per prompt (ties: the earlier sample), prompts whose samples
   all failed judging dropped and counted;
4. `best_transcripts` / `prepare_training_data`: the best answers as one-round Baize transcripts, tokenized with the
   tokenize stage's code (AI-only loss) for the second LoRA.

Knows nothing about DVC or MLflow; `stages/sdf_*.py` write the files and log the runs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from baize import inference
from baize.config import SdfSampleParams, SeedParams
from baize.errors import BaizeError, InputError
from baize.selfchat.backend import BackendError, ChatRequest, PermanentError
from baize.selfchat.journal import Journal, complete_journaled
from baize.transcript import Transcript, Turn, iter_json_lines

# --------------------------------------------------------------------------- 1. prompts


def seen_questions(seeds_path: Path | None, transcripts_path: Path | None) -> list[str]:
    """Every question the first adapter may have trained on: the seeds and every human turn of the validated
    transcripts (the train split is a subset of those)."""
    out: list[str] = []
    if seeds_path is not None:
        for lineno, obj in iter_json_lines(seeds_path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(seeds_path, lineno, 'expected an object with a string "text"')
            out.append(obj["text"])
    if transcripts_path is not None:
        for lineno, obj in iter_json_lines(transcripts_path):
            turns = obj.get("turns") if isinstance(obj, dict) else None
            if not isinstance(turns, list):
                raise InputError(transcripts_path, lineno, 'expected a transcript with a list "turns"')
            out += [t["text"] for t in turns if isinstance(t, dict) and t.get("role") == "human" and t.get("text")]
            if isinstance(obj.get("seed"), str):
                out.append(obj["seed"])
    return out


def choose_prompts(params: SdfSampleParams, seen: Sequence[str], loaded=None) -> tuple[list[dict[str, Any]], dict]:
    """`num_prompts` questions from `params.prompts`, none equal or near-equal (the seed stage's 3-gram Jaccard at
    0.85) to a `seen` one. Deterministic: the seed stage's keyed-hash order with `params.random_seed`."""
    from baize.seeds import near_duplicates, prepare_seeds

    seed_params = SeedParams(
        sources=params.prompts, num_seeds=params.num_prompts + len(seen), random_seed=params.random_seed
    )
    pool = prepare_seeds(seed_params, loaded).seeds
    texts = [*seen, *(s.text for s in pool)]
    near = near_duplicates(texts, seed_params.near_duplicate_threshold)
    # An index past `seen` that duplicates anything earlier is dropped; `seen` itself is never chosen.
    fresh = [s for i, s in enumerate(pool) if len(seen) + i not in near]
    overlap = len(pool) - len(fresh)
    chosen = fresh[: params.num_prompts]
    prompts = [{"id": s.id, "text": s.text, "source": s.source, "domain": s.domain} for s in chosen]
    return prompts, {"requested": params.num_prompts, "chosen": len(prompts), "excluded_as_seen": overlap,
                     "seen_questions": len(seen)}


# --------------------------------------------------------------------------- 2. sampling


def sample_requests(prompts: Sequence[dict[str, Any]], params: SdfSampleParams, *, model: str,
                    tokenizer) -> list[tuple[dict[str, Any], int, ChatRequest]]:
    """(prompt, sample index, request) for every answer to draw: the raw Baize inference prompt (no chat template),
    Baize's sampling and stop strings; sample i gets its own seed, so the N requests of a prompt differ."""
    out = []
    for p in prompts:
        budget = inference.prompt_budget(params.max_context_tokens, params.max_tokens)  # the answer's room kept
        text = inference.build_prompt(p["text"], (), tokenizer, budget)
        for i in range(params.num_samples):
            request = ChatRequest(
                messages=[],
                prompt=text,
                model=model,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                stop=list(inference.STOP_STRINGS),
                seed=params.seed * 1000 + i,  # num_samples <= 64: seeds of different params.seed never meet
            )
            out.append((p, i, request))
    return out


async def sample_answers(backend, journal: Journal, requests: Sequence[tuple[dict[str, Any], int, ChatRequest]], *,
                         progress: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Every requested answer as a sample record, in request order: from the journal when it is there, else from
    the backend (journaled before it is used). A request the backend gives up on is a sample with a `failure`."""

    async def one(prompt: dict[str, Any], index: int, request: ChatRequest) -> dict[str, Any]:
        record = {"prompt_id": prompt["id"], "prompt": prompt["text"], "sample": index}
        try:
            completion, cached = await complete_journaled(backend, journal, request)
        except PermanentError:
            raise
        except BackendError as exc:
            return {**record, "text": "", "finish_reason": None, "failure": f"{exc.reason}: {exc}", "cached": False,
                    "completion_tokens": 0}
        finally:
            if progress is not None:
                progress()
        before, stop = inference.cut_at_stop(completion.text)  # a server may return the stop string too
        text = before.strip()
        finish = "stop" if stop else completion.finish_reason
        return {**record, "text": text, "finish_reason": finish, "failure": None if text else "empty_answer",
                "cached": cached, "completion_tokens": completion.completion_tokens}

    return list(await asyncio.gather(*(one(*r) for r in requests)))


def sample_metrics(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [s for s in samples if s["failure"] is None]
    n = len(samples)
    return {
        "samples": n,
        "prompts": len({s["prompt_id"] for s in samples}),
        "sampled_now": sum(1 for s in samples if s["failure"] is None and not s["cached"]),
        "from_journal": sum(1 for s in samples if s["cached"]),
        "failed": n - len(ok),
        "stop_rate": sum(1 for s in ok if s["finish_reason"] == "stop") / len(ok) if ok else None,
        "cut_at_max_tokens": sum(1 for s in ok if s["finish_reason"] == "length"),
        "mean_completion_tokens": sum(s["completion_tokens"] for s in ok) / len(ok) if ok else None,
        "distinct_answers_per_prompt": (
            len({(s["prompt_id"], s["text"]) for s in ok}) / len({s["prompt_id"] for s in ok}) if ok else None
        ),
    }


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file this module wrote; a bad line is an InputError naming file:line."""
    if not Path(path).is_file():
        raise InputError(path, None, "no such file (run the stage before this one)")
    out = []
    for lineno, obj in iter_json_lines(path):
        if not isinstance(obj, dict) or any(k not in obj for k in required):
            raise InputError(path, lineno, f"expected an object with {', '.join(required)}")
        out.append(obj)
    return out


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    from baize.transcript import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --------------------------------------------------------------------------- 3. best of N


def select_best(judged: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The best-scored sample per prompt, in prompt order. Tie rule: the highest score wins; among equal scores the
    earlier sample index (deterministic, and independent of the judging order). A prompt with no scored sample is
    dropped and counted."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in judged:
        groups.setdefault(s["prompt_id"], []).append(s)
    best, ties, dropped, spreads = [], 0, 0, []
    for samples in groups.values():
        scored = [s for s in samples if s.get("score") is not None]
        if not scored:
            dropped += 1
            continue
        top = max(s["score"] for s in scored)
        winners = sorted((s for s in scored if s["score"] == top), key=lambda s: s["sample"])
        ties += len(winners) > 1
        spreads.append(top - min(s["score"] for s in scored))
        best.append({**winners[0], "tied_with": [s["sample"] for s in winners[1:]]})
    scores = [s["score"] for s in judged if s.get("score") is not None]
    return best, {
        "prompts": len(groups),
        "kept": len(best),
        "dropped_all_failed": dropped,
        "ties": ties,
        "best_score_mean": statistics.fmean(b["score"] for b in best) if best else None,
        "score_mean": statistics.fmean(scores) if scores else None,
        "score_std": statistics.pstdev(scores) if scores else None,
        "score_min": min(scores) if scores else None,
        "score_max": max(scores) if scores else None,
        "within_prompt_spread_mean": statistics.fmean(spreads) if spreads else None,
    }


# --------------------------------------------------------------------------- 4. training data


def best_transcripts(best: Sequence[dict[str, Any]], judge_model: str) -> list[Transcript]:
    """One-round Baize transcripts (the prompt, the best answer); an answer cut at max_tokens is listed in
    `meta.truncated_turns`, so the tokenizer trains its text but not a stop marker after it."""
    out = []
    for b in best:
        turns = [Turn(role="human", text=b["prompt"]), Turn(role="ai", text=b["text"])]
        meta = {
            "sdf": {"score": b["score"], "sample": b["sample"], "judge": judge_model, "tied_with": b["tied_with"]},
            "truncated_turns": [1] if b.get("finish_reason") == "length" else [],
        }
        out.append(Transcript.create(seed=b["prompt"], seed_id=b["prompt_id"], turns=turns, source="sdf", meta=meta))
    return out


def prepare_training_data(best_path: Path, tokenized_dir: Path, out_dir: Path, *, max_length: int,
                          with_val: bool = True) -> dict[str, Any]:
    """`out_dir/{train,val,tokenizer}` for `training.train`: train = the best answers tokenized exactly as the
    tokenize stage does (Baize training text, AI-only loss with the stop marker); val and tokenizer = the v1.5
    run's (`tokenized_dir`), so the second LoRA is measured on the same held-out transcripts as the first
    (`with_val` False: no val, no evaluation during training)."""
    import datasets

    from baize import tokenization

    rendered = tokenization.render_file(best_path)
    if not rendered.texts:
        raise BaizeError(f"{best_path}: no best answers to train on (every prompt failed judging?)")
    tokenizer = tokenization.load_tokenizer(tokenized_dir / "tokenizer")
    cols = tokenization.tokenize_texts(tokenizer, rendered.texts, "ai_only", max_length, cut_turns=rendered.cut_turns)
    keep = [i for i in range(len(rendered.ids)) if not cols["too_long"][i] and cols["targets"][i] > 0]
    if not keep:
        raise BaizeError(f"{best_path}: no best answer fits sdf_train.max_length = {max_length}")
    train = datasets.Dataset.from_dict({
        "id": [rendered.ids[i] for i in keep],
        "input_ids": [cols["input_ids"][i] for i in keep],
        "labels": [cols["labels"][i] for i in keep],
        "length": [cols["length"][i] for i in keep],
    })
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.save_to_disk(str(tmp / "train"))
    if with_val:
        shutil.copytree(tokenized_dir / "val", tmp / "val")
    shutil.copytree(tokenized_dir / "tokenizer", tmp / "tokenizer")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return {
        "samples": len(keep),
        "dropped_too_long": sum(cols["too_long"]),
        "tokens": sum(cols["length"][i] for i in keep),
        "trained_tokens": sum(cols["targets"][i] for i in keep),
        "answers_cut_at_sampling": sum(cols["selfchat_cut"][i] for i in keep),
    }
