"""Stage `selfchat`: every seed becomes a self-chat transcript or a recorded failure.

    python -m stages.selfchat --seeds data/seeds/seeds.jsonl --model models/base --out data/selfchat

Writes <out>/transcripts.jsonl and <out>/failures/failures.jsonl (seed order; a folder with a README beside it,
so that the output DVC saves is never empty when every seed succeeded), reports/selfchat/report.json, and one
MLflow run. Replies are journaled in <out>/journal.jsonl (a `persist` out: DVC keeps it between runs), so a
re-run after a crash or a budget stop pays for nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import click

from baize.errors import InputError, json_line
from baize.selfchat.engine import Engine, EngineConfig, RunResult, Seed
from baize.selfchat.journal import Journal
from baize.transcript import atomic_write_text, write_jsonl
from stages import _common


def read_seeds(path: Path) -> list[Seed]:
    """Seeds JSONL `{"id", "text", "source", "domain"}`; a bad line is an InputError naming file:line."""
    if not path.is_file():
        raise InputError(path, None, "seeds file not found (run the seed stage first)")
    seeds, seen = [], set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            obj = json_line(raw, path, lineno)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise InputError(path, lineno, 'expected an object with a non-empty string "text"')
            seed_id = str(obj.get("id") or hashlib.sha256(obj["text"].encode()).hexdigest()[:16])
            if seed_id in seen:
                raise InputError(path, lineno, f"duplicate seed id {seed_id!r}")
            seen.add(seed_id)
            seeds.append(Seed(seed_id, obj["text"], str(obj.get("source") or ""), obj.get("domain")))
    if not seeds:
        raise InputError(path, None, "no seeds")
    return seeds


def local_model_id(model_dir: Path, dtype: str) -> str:
    """The local model's identity in journal keys (`baize.selfchat.local_backend.model_identity`)."""
    from baize.selfchat.local_backend import model_identity  # torch: only for the local backend

    return model_identity(model_dir, dtype)


def make_backend(params, model_dir: Path):
    if params.backend == "openai":
        from baize.selfchat.openai_backend import OpenAIBackend

        return OpenAIBackend(
            base_url=params.base_url,
            concurrency=params.concurrency,
            requests_per_minute=params.requests_per_minute,
            tokens_per_minute=params.tokens_per_minute,
            timeout_s=params.timeout_s,
            max_retries=params.max_retries,
            max_retry_after_s=params.max_retry_after_s,
        )
    if params.backend == "openai-batch":
        from baize.selfchat.batch_backend import OpenAIBatchBackend

        return OpenAIBatchBackend(
            base_url=params.base_url,
            timeout_s=params.timeout_s,
            max_retries=params.max_retries,
            poll_interval_s=params.batch_poll_s,
        )
    from baize.selfchat.local_backend import LocalBackend

    if not (model_dir / "config.json").is_file():
        raise InputError(model_dir, None, "no model here (run the base_model stage first)")
    return LocalBackend(model_dir, batch_size=params.batch_size, dtype=params.local_dtype,
                        prefix_cache_mb=params.prefix_cache_mb)


def engine_config(params, model_dir: Path) -> EngineConfig:
    model = params.model if params.backend != "local" else local_model_id(model_dir, params.local_dtype)
    price = params.prices.get(params.model or "") if params.model else None
    return EngineConfig(
        model=model,
        mode=params.mode,
        max_rounds=params.max_rounds,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        human_max_tokens=params.human_max_tokens,
        stop=params.stop,
        keep_truncated=params.keep_truncated,
        first_human=params.first_human,
        human_prompt=params.human_prompt,
        min_rounds=params.min_rounds,
        max_reasks=params.max_reasks,
        max_answer_reasks=params.max_answer_reasks,
        ai_system_prompt=params.ai_system_prompt,
        concurrency=params.concurrency,
        max_cost_usd=params.max_cost_usd,
        max_total_tokens=params.max_total_tokens,
        stop_grace_s=params.stop_grace_s,
        price_in_per_1m=price.input_per_1m if price else 0.0,
        price_out_per_1m=price.output_per_1m if price else 0.0,
    )


async def run(params, seeds: list[Seed], model_dir: Path, journal_path: Path, progress: bool | None) -> RunResult:
    backend = make_backend(params, model_dir)
    try:
        with Journal(journal_path) as journal:
            if journal.torn_bytes:
                click.echo(f"journal: dropped a torn last line ({journal.torn_bytes} bytes) left by a crash", err=True)
            engine = Engine(backend, journal, engine_config(params, model_dir), progress=progress)
            # Ctrl-C / SIGTERM: no new request, the ones in flight finish and are journaled, one line, exit 128+N.
            with engine.stopper.signals_handled():
                result = await engine.run(seeds)
            stats = getattr(backend, "stats", None)
            if hasattr(stats, "prefill_s"):  # the local model: where its time went (prefill vs decode, batch fill)
                import dataclasses

                local = {k: round(v, 1) if isinstance(v, float) else v for k, v in dataclasses.asdict(stats).items()}
                local["mean_batch_fill"] = round(stats.decode_tokens / stats.decode_steps, 2) if stats.decode_steps else None
                result.metrics["local"] = local
            return result
    finally:
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()


RUN_KEYS = ("new", "replies_from_journal", "requests", "retries", "errors_by_kind", "wall_s", "transcripts_per_min",
            "local")


FAILURES_README = """# Self-chat failures

`failures.jsonl`: one JSON object per seed that ended without a transcript, in seed order:
`{seed_id, seed, reason, detail}` (and `status` for a request the server refused). Empty when every seed became a
transcript (`../transcripts.jsonl`). Written by the `selfchat` stage; this README keeps the DVC output from ever
being an empty folder.
"""


def write_failures(folder: Path, failures: list[dict]) -> None:
    """failures.jsonl (possibly empty) and its README in `folder`, the stage's DVC output."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "failures.jsonl", "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    atomic_write_text(folder / "README.md", FAILURES_README)


@click.command()
@click.option("--seeds", "seeds_path", default="data/seeds/seeds.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", default="models/base", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default="data/selfchat", show_default=True, type=click.Path(path_type=Path))
@click.option("--journal", "journal_path", default=None, type=click.Path(path_type=Path), help="default: <out>/journal.jsonl")
@click.option("--metrics", "metrics_path", default="reports/selfchat/metrics.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--progress/--no-progress", default=None, help="progress (default: a bar on a terminal, a line every 10 s off it)")
@_common.entrypoint
def main(seeds_path: Path, model_dir: Path, out_dir: Path, journal_path: Path | None, metrics_path: Path, progress) -> None:
    params, tracking = _common.load("selfchat", "tracking")
    seeds = read_seeds(seeds_path)
    journal_path = journal_path or out_dir / "journal.jsonl"
    result = asyncio.run(run(params, seeds, model_dir, journal_path, progress))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "transcripts.jsonl", result.transcripts)
    write_failures(out_dir / "failures", result.failures)
    # What a re-run with the same inputs changes (time, the journal's share, retries) goes to run.json, untracked.
    report, journal_use = _common.split_keys(result.metrics, RUN_KEYS)
    device_tags: dict[str, str] = {}
    if params.backend == "local":
        from baize import hardware  # (torch: imported once a local model is known to be used)
        placed = hardware.placement(params.local_dtype, model_dir)
        device_tags, device_keys = placed.tags(), placed.run_keys()
        journal_use.update(device_keys)
    paths = _common.write_reports(
        metrics_path, headline=None, report=report, run=journal_use
    )

    with _common.mlflow_run("selfchat", tracking, ("selfchat",)) as mlrun:
        import mlflow

        from baize import tracking as tracking_lib

        tracking_lib.log_metrics(result.metrics)
        mlflow.set_tags({"baize.selfchat.backend": params.backend, "baize.selfchat.mode": params.mode, **device_tags})
        if tracking.log_artifacts:
            mlflow.log_artifact(str(out_dir / "transcripts.jsonl"))
            mlflow.log_artifact(str(out_dir / "failures" / "failures.jsonl"))
            for path in paths.values():
                mlflow.log_artifact(str(path))
        run_id = mlrun.info.run_id

    m = result.metrics
    click.echo(
        f"selfchat: {m['transcripts']}/{m['seeds']} transcripts, {m['failures']} failures {m['failures_by_reason']}, "
        f"{m['rounds_per_transcript']:.2f} rounds each, {m['ai_cut_share']:.0%} of AI answers cut by max_tokens, "
        f"{m['tokens']['prompt']}+{m['tokens']['completion']} tokens, ${m['cost_usd']:.4f} "
        f"({m['new']['replies']} new replies, {m['replies_from_journal']} from the journal; mlflow run {run_id})"
    )
    if result.budget_message:
        click.echo(f"selfchat: {result.budget_message}", err=True)


if __name__ == "__main__":
    main()
