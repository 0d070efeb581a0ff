"""Stage `tokenize`: validated transcripts -> data/tokenized/{train,val,tokenizer}, reports/tokenize/metrics.json
(trained tokens) and report.json (every count).

    python -m stages.tokenize --transcripts data/validated/transcripts.jsonl --model models/base --out data/tokenized
"""

from __future__ import annotations

from pathlib import Path

import click

from baize.tokenization import tokenize_transcripts
from stages import _common

_PATH = click.Path(path_type=Path)


@click.command()
@click.option("--transcripts", default="data/validated/transcripts.jsonl", show_default=True, type=_PATH)
@click.option("--model", "model_dir", default="models/base", show_default=True, type=_PATH)
@click.option("--out", "out_dir", default="data/tokenized", show_default=True, type=_PATH)
@click.option("--metrics", "metrics_path", default="reports/tokenize/metrics.json", show_default=True, type=_PATH)
@_common.entrypoint
def main(transcripts: Path, model_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    params, tracking = _common.load("tokenize", "tracking")
    metrics = tokenize_transcripts(
        transcripts,
        model_dir,
        out_dir,
        loss=params.loss,
        max_length=params.max_length,
        val_size=params.val_size,
        seed=params.random_seed,
        keep_truncated=params.keep_truncated,
    )
    # No headline (`dvc exp show` keeps to the pass rate, the loss and the three models' results): the trained
    # tokens are in report.json.
    paths = _common.write_reports(metrics_path, headline=None, report=metrics)
    with _common.mlflow_run("tokenize", tracking, ("tokenize",)) as run:
        import mlflow

        from baize import tracking as baize_tracking

        baize_tracking.log_metrics(metrics)
        if tracking.log_artifacts:
            for path in paths.values():
                mlflow.log_artifact(str(path))
            mlflow.log_artifact(str(out_dir / "info.json"))
        s = metrics["samples"]
        click.echo(
            f"{out_dir}: {s['train']} train / {s['val']} val samples, {metrics['tokens']['total']} tokens "
            f"({metrics['trained_tokens']['total']} trained, loss={params.loss}), "
            f"{metrics['truncated_share']:.0%} cut to {params.max_length}: "
            f"{metrics['pairs_dropped_at_max_length']} pairs and {s['dropped_too_long']} samples dropped, "
            f"{metrics['answers_cut_at_max_length'] + metrics['answers_cut_at_selfchat']} cut answers "
            f"without a stop marker, {metrics['special_token_text']} with special-token text "
            f"(mlflow run {run.info.run_id})"
        )


if __name__ == "__main__":
    main()
