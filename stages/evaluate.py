"""Stage `evaluate`: base vs base + adapter on the validation split and a fixed prompt set, in one run.

Outputs: reports/eval/samples.jsonl (one row per prompt with both answers), reports/eval/metrics.json (the
headline, for `dvc metrics show` / `dvc exp show`), report.json (every figure) and run.json (seconds, untracked),
and one MLflow run with the metrics and the samples as a table, tagged with the run that trained the adapter
(`baize.train_run_id`: the train run tagged with this adapter's digest).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import click

from baize import evaluation, inference
from baize.config import EvaluateParams
from baize.transcript import atomic_write_text
from stages import _common


def _train_run_id(adapter_dir: Path, experiment: str) -> str | None:
    """The newest train run that wrote an adapter with exactly this content (tagged with its digest); None for an
    adapter trained elsewhere (another clone, another MLflow store)."""
    from baize import tracking as tracking_lib

    uri = tracking_lib.default_tracking_uri(_common.project_root())
    digest = tracking_lib.folder_sha256(adapter_dir)
    return tracking_lib.find_run_by_tag(uri, experiment, "train", tracking_lib.ADAPTER_TAG, digest)


def headline(metrics: dict) -> dict:
    """The numbers `dvc exp show` compares: perplexity of base and adapter, and the adapter's share of answers
    that stop by themselves and that leak a role marker (the base's are in report.json); the judge's mean
    scores when it ran."""
    ppl, adapter = metrics["perplexity"], metrics["generation"]["adapter"]
    out = {"ppl_base": ppl["base"], "ppl": ppl["adapter"], "stop": adapter.get("stop_rate"),
           "leak": adapter.get("role_leak_rate")}
    judge = metrics.get("judge")
    if judge:
        out.update(judge=judge.get("answer_mean"), judge_ref=judge.get("reference_mean"))
    return out


def _judge(params: EvaluateParams, base_dir: Path, rows: list[dict]) -> tuple[list[dict], dict]:
    from baize import judge
    from baize.selfchat.journal import Journal

    from baize.selfchat.stopping import Stopper

    jp = params.judge
    model = jp.model
    if jp.backend == "local":
        from baize.selfchat.local_backend import LocalBackend, model_identity

        backend = LocalBackend(base_dir, batch_size=params.batch_size, seed=params.seed, dtype=params.dtype)
        # Keyed by the local model's files and dtype, not by the `judge.model` name it does not use.
        model = model_identity(base_dir, params.dtype)
    else:
        from baize.selfchat.openai_backend import OpenAIBackend

        backend = OpenAIBackend(base_url=jp.base_url, concurrency=jp.concurrency)

    async def go(journal):
        stopper = Stopper(what="judge")  # Ctrl-C / SIGTERM: the verdicts in flight are journaled first
        with stopper.signals_handled():
            return await judge.judge_rows(backend, journal, rows, model=model, reference=jp.reference,
                                          max_tokens=jp.max_tokens, stopper=stopper)

    try:
        with Journal(jp.cache) as journal:
            return asyncio.run(go(journal))
    finally:
        close = getattr(backend, "close", None)
        if close:
            close()


def _data_summary(data_dir: Path) -> dict:
    """What the adapter was trained and measured on (the tokenize stage's info.json): samples and rounds per
    sample, so `dvc metrics show` puts the data's shape beside the results it produced."""
    info_path = data_dir / "info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    samples = info.get("samples") or {}
    rounds = info.get("rounds_per_sample") or {}
    return {
        "train_samples": samples.get("train"),
        "val_samples": samples.get("val"),
        "rounds_per_transcript": rounds.get("total"),
    }


@click.command()
@click.option("--adapter", "adapter", default="models/adapter", show_default=True,
              help="Adapter folder, or an MLflow runs:/ or models:/ URI.")
@click.option("--model", "model_dir", default="models/base", show_default=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", default="data/tokenized", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default="reports/eval", show_default=True, type=click.Path(path_type=Path))
@_common.entrypoint
def main(adapter: str, model_dir: Path, data_dir: Path, out_dir: Path) -> None:
    params, tracking = _common.load("evaluate", "tracking")
    started = time.perf_counter()
    adapter_dir = inference.resolve_adapter(adapter)
    val = evaluation.load_split(data_dir / "val")
    model, tokenizer = inference.load_model(model_dir, adapter_dir, dtype=params.dtype)

    n_ppl = len(val) if params.max_ppl_samples is None else min(len(val), params.max_ppl_samples)
    rows = [val[i] for i in range(n_ppl)]
    click.echo(f"evaluate: perplexity on {n_ppl} validation transcripts (base, then adapter)", err=True)
    ppl = evaluation.compare_perplexity(model, rows, batch_size=params.ppl_batch_size,
                                        pad_token_id=tokenizer.pad_token_id)

    prompts = evaluation.load_prompts(params.prompts, params.num_prompts)
    prompts += evaluation.heldout_prompts(val, tokenizer, params.heldout_prompts)
    click.echo(f"evaluate: {len(prompts)} prompts x 2 models, up to {params.max_new_tokens} new tokens", err=True)
    answers = evaluation.generate_answers(
        model, tokenizer, prompts, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
        top_p=params.top_p, batch_size=params.batch_size, seed=params.seed,
        max_context_tokens=params.max_context_tokens, prompt_format=params.prompt_format,
    )
    samples = evaluation.sample_rows(prompts, answers)
    metrics: dict = {
        "data": _data_summary(data_dir),
        "perplexity": ppl,
        "generation": {name: evaluation.format_metrics(gens) for name, gens in answers.items()},
    }
    del model  # the judge's local backend and lm-eval load their own copies

    if params.judge.enabled:
        judged, summary = _judge(params, model_dir, samples)
        for row, j in zip(samples, judged, strict=True):
            row["judge"] = {k: v for k, v in j.items() if k != "id"}
        metrics["judge"] = summary
    if params.lm_eval_tasks:
        metrics["lm_eval"] = evaluation.run_lm_eval(model_dir, adapter_dir, params.lm_eval_tasks, params.lm_eval_limit)
    timing: dict = {"wall_s": round(time.perf_counter() - started, 1)}
    if "judge" in metrics:  # how many verdicts came from the journal depends on earlier runs, not on the inputs
        timing["judge"] = {k: metrics["judge"].pop(k) for k in ("requests", "cached") if k in metrics["judge"]}

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    paths = _common.write_reports(out_dir / "metrics.json", headline=headline(metrics), report=metrics, run=timing)

    train_run = _train_run_id(adapter_dir, tracking.experiment)
    with _common.mlflow_run("evaluate", tracking, ("evaluate",)) as run:
        import mlflow

        from baize.tracking import log_metrics

        tags = {"baize.adapter": str(adapter)}
        if train_run:
            tags["baize.train_run_id"] = train_run  # the link from this evaluation to the run that trained it
        mlflow.set_tags(tags)
        log_metrics({**metrics, **timing})
        mlflow.log_table(data=evaluation.flat_table(samples), artifact_file="eval/samples.json")
        if tracking.log_artifacts:
            for path in paths.values():
                mlflow.log_artifact(str(path), artifact_path="eval")
        # The model registry (tracking.registered_model): a version per adapter, @champion on the best.
        reg = _common.register_adapter(adapter_dir, tracking, headline(metrics), run.info.run_id, train_run)
        if reg:
            click.echo(reg.summary())
        click.echo(
            f"reports/eval: perplexity base {ppl['base']:.3f} -> adapter {ppl['adapter']:.3f} "
            f"({ppl['drop_pct']:.1f}% lower) over {ppl['tokens']} AI-turn tokens; "
            f"stop rate base {metrics['generation']['base']['stop_rate']:.2f}, "
            f"adapter {metrics['generation']['adapter']['stop_rate']:.2f} (mlflow run {run.info.run_id})"
        )


if __name__ == "__main__":
    main()
