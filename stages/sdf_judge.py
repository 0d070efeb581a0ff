"""Stage `sdf_judge` (Baize v2, step 2): a judge scores every sampled answer from 1 to 100; the best per prompt is
kept (ties: the earlier sample) as a one-round Baize transcript for the `sdf_train` stage.

    python -m stages.sdf_judge --samples data/sdf/samples.jsonl --model models/base --out data/sdf

Writes <out>/judged.jsonl (every sample with its score, the judge's rationale and raw reply, or the failure and its
reason), <out>/best.jsonl (transcripts), reports/sdf_judge/report.json (scores, ties, failures, tokens, cost) and
one MLflow run. Judgments are journaled in <out>/judge_journal.jsonl (a `persist` out), keyed by judge model,
endpoint and prompt: a re-run pays for nothing twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import click

from baize import judge, sdf
from baize.selfchat.journal import Journal
from baize.transcript import write_jsonl
from stages import _common

_PATH = click.Path(path_type=Path)


def make_backend(params, model_dir: Path):
    if params.backend == "openai":
        from baize.selfchat.openai_backend import OpenAIBackend

        return OpenAIBackend(base_url=params.base_url, concurrency=params.concurrency,
                             requests_per_minute=params.requests_per_minute, timeout_s=params.timeout_s,
                             max_retries=params.max_retries)
    from baize.selfchat.local_backend import LocalBackend

    return LocalBackend(model_dir, batch_size=params.batch_size, dtype=params.local_dtype)


async def _judge(backend, journal_path: Path, items, **kwargs):
    from baize import progress

    bar = progress.bar(len(items), desc="sdf_judge", unit="answer")
    try:
        with Journal(journal_path) as journal:
            return await judge.judge_answers(backend, journal, items, progress=lambda: bar.update(1), **kwargs)
    finally:
        bar.close()
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()


@click.command()
@click.option("--samples", "samples_path", default="data/sdf/samples.jsonl", show_default=True, type=_PATH)
@click.option("--model", "model_dir", default="models/base", show_default=True, type=_PATH,
              help="The local judge (sdf_judge.backend local).")
@click.option("--adapter", "adapter_dir", default="models/adapter", show_default=True, type=_PATH,
              help="Only read for the link to its training run in MLflow.")
@click.option("--out", "out_dir", default="data/sdf", show_default=True, type=_PATH)
@click.option("--report", "metrics_path", default="reports/sdf_judge/report.json", show_default=True, type=_PATH)
@_common.entrypoint
def main(samples_path: Path, model_dir: Path, adapter_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    params, tracking = _common.load("sdf_judge", "tracking")
    started = time.perf_counter()
    template = judge.load_judge_prompt(params.prompt, _common.project_root())
    samples = sdf.read_jsonl(samples_path, ("prompt_id", "prompt", "sample", "text", "failure"))
    if params.backend == "local":
        from baize.selfchat.local_backend import model_identity

        model_id = model_identity(model_dir, params.local_dtype)  # the judge's files and dtype
        constraint = "choices"
    else:
        model_id = params.model  # the backend adds its base_url to every journal key
        constraint = "schema" if params.structured else None
    # A sample that failed (or is empty) is not worth a judge call: it keeps its failure.
    todo = [s for s in samples if s["failure"] is None]
    items = [{"question": s["prompt"], "answer": s["text"]} for s in todo]
    judged, stats = asyncio.run(_judge(make_backend(params, model_dir), out_dir / "judge_journal.jsonl", items,
                                       template=template, model=model_id, max_tokens=params.max_tokens,
                                       constraint=constraint))
    verdicts = {id(s): j for s, j in zip(todo, judged, strict=True)}
    records = []
    for s in samples:
        j = verdicts.get(id(s))
        if j is None:
            records.append({**s, "score": None, "rationale": None, "judge_reply": None, "failure": s["failure"]})
        else:
            records.append({**s, "score": j["score"], "rationale": j["rationale"], "judge_reply": j["reply"],
                            "failure": j["failure"]})
    best, selection = sdf.select_best(records)

    failures = Counter(r["failure"].split(":")[0] for r in records if r["failure"])
    tokens_in = sum(j["prompt_tokens"] for j in judged)
    tokens_out = sum(j["completion_tokens"] for j in judged)
    price = params.prices.get(params.model or "")
    metrics = {
        **selection,
        "samples": len(records),
        "judged": sum(1 for r in records if r["score"] is not None),
        "failures": sum(failures.values()),
        "failures_by_reason": dict(sorted(failures.items())),
        "requests": stats["requests"],
        "from_journal": stats["cached"],
        "tokens": {"prompt": tokens_in, "completion": tokens_out},
        "cost_usd": (tokens_in * price.input_per_1m + tokens_out * price.output_per_1m) / 1e6 if price else 0.0,
        "judge": model_id,
        "prompt": params.prompt,
    }
    report, timing = _common.split_keys(metrics, ("requests", "from_journal"))
    timing["wall_s"] = round(time.perf_counter() - started, 1)
    device_tags: dict[str, str] = {}
    if params.backend == "local":
        from baize import hardware  # (torch: imported once a local model is known to be used)
        placed = hardware.placement(params.local_dtype, model_dir)
        device_tags, device_keys = placed.tags(), placed.run_keys()
        timing.update(device_keys)
    sdf.write_jsonl(out_dir / "judged.jsonl", records)
    write_jsonl(out_dir / "best.jsonl", sdf.best_transcripts(best, model_id))
    paths = _common.write_reports(metrics_path, report=report, run=timing, headline=None)
    with _common.mlflow_run("sdf_judge", tracking, ("sdf_judge",)) as run:
        import mlflow

        from baize.evaluation import flat_table
        from baize.tracking import log_metrics

        train_run = _common.adapter_run(adapter_dir, tracking.experiment)
        mlflow.set_tags({"baize.train_run_id": train_run} if train_run else {})
        mlflow.set_tags({"baize.sdf_judge.model": model_id, "baize.sdf_judge.prompt": params.prompt, **device_tags})
        log_metrics({**metrics, **timing})
        mlflow.log_table(data=flat_table(records), artifact_file="sdf/judged.json")
        if tracking.log_artifacts:
            for path in paths.values():
                mlflow.log_artifact(str(path))
            mlflow.log_artifact(str(out_dir / "best.jsonl"))
    mean = f"{metrics['score_mean']:.1f}" if metrics["score_mean"] is not None else "-"
    click.echo(
        f"{out_dir}/best.jsonl: best of {len(records)} answers for {metrics['kept']}/{metrics['prompts']} prompts "
        f"(mean score {mean}, {metrics['ties']} ties, {metrics['failures']} failures {metrics['failures_by_reason']}, "
        f"{metrics['dropped_all_failed']} prompts dropped; {metrics['requests']} judge calls, "
        f"{metrics['from_journal']} from the journal), {timing['wall_s']} s (mlflow run {run.info.run_id})"
    )


if __name__ == "__main__":
    main()
