"""Stage `validate`: the great-expectations quality gate over `validate.input`.

Writes accepted transcripts, rejected records (each with the checks it failed), the pass rate (metrics.json,
for `dvc metrics show`), the counts, per-check entries and headline statistics (report.json), the full statistics
(`stats.json`: the paper's Table 2 figures and the warning figures, for the accepted records and the whole
input, lengths in the base model's tokens) and the GX Data Docs site, logs them to MLflow, and only then
exits non-zero if the gate fails, so nothing is lost.
"""

from __future__ import annotations

from pathlib import Path

import click

from baize import tracking as baize_tracking
from baize.validation import GateError, check_params, length_counter, load_transcripts, validate, write_outputs
from stages import _common

DOCS_SUBDIR = "data_docs"  # under --report; carries timestamps, so it is neither a DVC output nor in git


@click.command()
@click.option("--out", "out_dir", default="data/validated", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--report", "report_dir", default="reports/validation", show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--model",
    "model_dir",
    default="models/base",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Base model folder whose tokenizer counts the statistics' lengths; without one, words are counted.",
)
@_common.entrypoint
def main(out_dir: Path, report_dir: Path, model_dir: Path) -> None:
    params, tracking = _common.load("validate", "tracking")
    check_params(params)  # bad regex or crossed bounds: exit 2 before reading anything
    lengths = length_counter(model_dir)
    transcripts, fmt = load_transcripts(params.input, params.input_format)
    if _common.untracked(params.input):
        click.echo(
            f"warning: validate.input {params.input} is tracked by neither DVC nor git, so a clone cannot reproduce "
            f"this stage; run `dvc add {params.input}`, commit its .dvc file and `dvc push`",
            err=True,
        )
    docs_dir = report_dir / DOCS_SUBDIR
    report = validate(transcripts, params, docs_dir=docs_dir, lengths=lengths)
    paths = write_outputs(report, out_dir, report_dir)

    with _common.mlflow_run("validate", tracking, ("validate",)) as run:
        import mlflow

        mlflow.set_tag("baize.validate.input_format", fmt)
        mlflow.set_tag("baize.validate.length_unit", lengths.unit)
        metrics = report.metrics()
        metrics.pop("stats", None)  # logged in full below, as stats.accepted.* and stats.input.*
        baize_tracking.log_metrics(metrics)
        baize_tracking.log_metrics({"stats": {"accepted": report.stats["accepted"], "input": report.stats["input"]}})
        if tracking.log_artifacts:
            mlflow.log_artifact(str(paths["metrics"]), "validation")
            mlflow.log_artifact(str(paths["report"]), "validation")
            mlflow.log_artifact(str(paths["stats"]), "validation")
            mlflow.log_artifact(str(paths["rejected"]), "validation")
            mlflow.log_artifacts(str(docs_dir), "validation/data_docs")
        unit = f"tokens of {lengths.tokenizer}" if lengths.tokenizer else f"words (no tokenizer in {model_dir})"
        click.echo(
            f"validate: {report.summary()}\n"
            f"  stats ({unit}): {report.stats_line()}\n"
            f"  accepted -> {paths['accepted']}, rejected -> {paths['rejected']}, stats -> {paths['stats']}, "
            f"Data Docs -> {docs_dir / 'index.html'} (mlflow run {run.info.run_id})"
        )
        if not report.gate_passed:
            # Inside the run, so it ends FAILED; the outputs above are already written.
            raise GateError(f"validation gate failed: {report.summary()}")


if __name__ == "__main__":
    main()
