"""Stage `sdf_sample` (Baize v2, step 1): N answers per SDF prompt from the v1.5 model (base + models/adapter).

    python -m stages.sdf_sample --model models/base --adapter models/adapter --out data/sdf

Writes <out>/prompts.jsonl (the questions: none the first adapter saw), <out>/samples.jsonl (one record per answer,
prompt order then sample index), reports/sdf_sample/report.json and one MLflow run tagged with the training run
of the adapter (`baize.train_run_id`). Every answer is journaled in <out>/sample_journal.jsonl (a `persist` out):
after a kill -9, or on a re-run, nothing already sampled is sampled again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click

from baize import inference, sdf
from baize.errors import BaizeError
from baize.selfchat.journal import Journal
from stages import _common

_PATH = click.Path(path_type=Path)


def local_model_id(model_dir: Path, adapter_dir: Path, dtype: str) -> str:
    """What the journal keys name as the sampling model: base weights, adapter weights and compute dtype."""
    from baize.selfchat.local_backend import resolve_dtype
    from baize.training import base_model_sha256

    return (f"local:{base_model_sha256(model_dir)[:16]}+lora:{inference.adapter_sha256(adapter_dir)[:16]}"
            f":{resolve_dtype(dtype)}")


def make_backend(params, model_dir: Path, adapter_dir: Path):
    if params.backend == "openai":
        from baize.selfchat.openai_backend import OpenAIBackend

        return OpenAIBackend(base_url=params.base_url, concurrency=params.concurrency,
                             requests_per_minute=params.requests_per_minute, timeout_s=params.timeout_s,
                             max_retries=params.max_retries)
    from baize.selfchat.local_backend import LocalBackend

    return LocalBackend(model_dir, adapter=adapter_dir, batch_size=params.batch_size, dtype=params.local_dtype)


async def _sample(params, backend, journal_path: Path, requests):
    from baize import progress

    bar = progress.bar(len(requests), desc="sdf_sample", unit="answer")
    try:
        with Journal(journal_path) as journal:
            return await sdf.sample_answers(backend, journal, requests, progress=lambda: bar.update(1))
    finally:
        bar.close()
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()


@click.command()
@click.option("--model", "model_dir", default="models/base", show_default=True, type=_PATH)
@click.option("--adapter", "adapter_dir", default="models/adapter", show_default=True, type=_PATH)
@click.option("--seeds", "seeds_path", default="data/seeds/seeds.jsonl", show_default=True, type=_PATH)
@click.option("--transcripts", "transcripts_path", default="data/validated/transcripts.jsonl", show_default=True,
              type=_PATH, help="The first adapter's accepted transcripts: their questions are never SDF prompts.")
@click.option("--out", "out_dir", default="data/sdf", show_default=True, type=_PATH)
@click.option("--report", "metrics_path", default="reports/sdf_sample/report.json", show_default=True, type=_PATH)
@_common.entrypoint
def main(model_dir: Path, adapter_dir: Path, seeds_path: Path, transcripts_path: Path, out_dir: Path,
         metrics_path: Path) -> None:
    params, tracking = _common.load("sdf_sample", "tracking")
    started = time.perf_counter()
    inference.check_adapter_dir(adapter_dir)
    seen = sdf.seen_questions(seeds_path, transcripts_path)
    prompts, prompt_metrics = sdf.choose_prompts(params, seen)
    if not prompts:
        raise BaizeError("sdf_sample: no prompt left after excluding the first adapter's questions; add sources to "
                         "sdf_sample.prompts")
    if len(prompts) < params.num_prompts:
        click.echo(f"warning: sdf_sample.num_prompts is {params.num_prompts} but only {len(prompts)} unseen prompts "
                   "are available; using them all", err=True)
    tokenizer = inference.load_tokenizer(model_dir)
    if params.backend == "local":
        model_id = local_model_id(model_dir, adapter_dir, params.local_dtype)
    else:
        model_id = params.model  # the backend adds its base_url to every journal key
    requests = sdf.sample_requests(prompts, params, model=model_id, tokenizer=tokenizer)
    backend = make_backend(params, model_dir, adapter_dir)
    samples = asyncio.run(_sample(params, backend, out_dir / "sample_journal.jsonl", requests))

    metrics = {"prompts": prompt_metrics, **sdf.sample_metrics(samples), "model": model_id}
    # How many answers came from the journal depends on earlier runs, not on the inputs: run.json, not dvc.lock.
    report, timing = _common.split_keys(metrics, ("sampled_now", "from_journal"))
    timing["wall_s"] = round(time.perf_counter() - started, 1)
    device_tags: dict[str, str] = {}
    if params.backend == "local":
        from baize import hardware  # (torch: imported once a local model is known to be used)
        placed = hardware.placement(params.local_dtype, model_dir)
        device_tags, device_keys = placed.tags(), placed.run_keys()
        timing.update(device_keys)
    sdf.write_jsonl(out_dir / "prompts.jsonl", prompts)
    # Without the `cached` flag: the file must be the same whether an answer was sampled now or journaled.
    sdf.write_jsonl(out_dir / "samples.jsonl", [{k: v for k, v in s.items() if k != "cached"} for s in samples])
    paths = _common.write_reports(metrics_path, report=report, run=timing, headline=None)
    with _common.mlflow_run("sdf_sample", tracking, ("sdf_sample",)) as run:
        import mlflow

        from baize.evaluation import flat_table
        from baize.tracking import log_metrics

        train_run = _common.adapter_run(adapter_dir, tracking.experiment)
        mlflow.set_tags({"baize.train_run_id": train_run} if train_run else {})
        mlflow.set_tags(device_tags)
        log_metrics({**metrics, **timing})
        mlflow.log_table(data=flat_table(samples), artifact_file="sdf/samples.json")
        if tracking.log_artifacts:
            for path in paths.values():
                mlflow.log_artifact(str(path))
    failed = f", {metrics['failed']} failed" if metrics["failed"] else ""
    click.echo(
        f"{out_dir}/samples.jsonl: {metrics['samples']} answers to {len(prompts)} prompts ({metrics['sampled_now']} "
        f"sampled now, {metrics['from_journal']} from the journal{failed}), stop rate {metrics['stop_rate'] or 0:.2f}, "
        f"{timing['wall_s']} s (mlflow run {run.info.run_id})"
    )


if __name__ == "__main__":
    main()
