"""Stage `sdf_train` (Baize v2, step 3): a second LoRA, stacked on the frozen v1.5 adapter, trained on the best
answers with the AI-only loss, by the same trainer as the `train` stage (checkpoints and resume, NaN stop, token
budget, MLflow logging).

    python -m stages.sdf_train --best data/sdf/best.jsonl --data data/tokenized --adapter models/adapter \
        --out models/adapter_v2

Writes data/sdf/tokenized/{train,val,tokenizer} (the best answers; the v1.5 val split), the stacked adapter folder
(the new LoRA at its root, the v1.5 adapter copied whole into `sft/`, `baize_adapter.json` with `stacked_on: sft`:
`baize chat --adapter`, `baize export` and `evaluate` load both), reports/sdf_train/{metrics.json,steps.csv} and one
MLflow run tagged with the v1.5 training run (`baize.train_run_id`).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from baize.errors import ParamsError
from stages import _common
from stages.train import RUN_KEYS, _log_inputs, _system_metrics

_PATH = click.Path(path_type=Path)


@click.command()
@click.option("--best", "best_path", default="data/sdf/best.jsonl", show_default=True, type=_PATH)
@click.option("--data", "data_dir", default="data/tokenized", show_default=True, type=_PATH,
              help="The tokenize stage's output: its val split and tokenizer are reused.")
@click.option("--model", "model_dir", default="models/base", show_default=True, type=_PATH)
@click.option("--adapter", "adapter_dir", default="models/adapter", show_default=True, type=_PATH,
              help="The v1.5 adapter the new LoRA stacks on (frozen).")
@click.option("--tokenized", "tokenized_dir", default="data/sdf/tokenized", show_default=True, type=_PATH)
@click.option("--out", "out_dir", default="models/adapter_v2", show_default=True, type=_PATH)
@click.option("--checkpoints", "checkpoints_dir", default="models/sdf_checkpoints", show_default=True, type=_PATH)
@click.option("--reports", "reports_dir", default="reports/sdf_train", show_default=True, type=_PATH)
@_common.entrypoint
def main(best_path: Path, data_dir: Path, model_dir: Path, adapter_dir: Path, tokenized_dir: Path, out_dir: Path,
         checkpoints_dir: Path, reports_dir: Path) -> None:
    params, tracking = _common.load("sdf_train", "tracking")
    if params.num_processes > 1:
        raise ParamsError("params.yaml: sdf_train.num_processes > 1 is not supported yet (the SDF set is small)")
    started = time.perf_counter()
    from baize import inference, sdf, training  # torch: only once the params are known to be valid

    inference.check_adapter_dir(adapter_dir)
    data_metrics = sdf.prepare_training_data(best_path, data_dir, tokenized_dir, max_length=params.max_length,
                                             with_val=params.eval_val)
    with _common.mlflow_run("sdf_train", tracking, ("sdf_train",)) as run:
        import mlflow

        with _system_metrics(run.info.run_id):
            result = training.train(params, data_dir=tokenized_dir, model_dir=model_dir,
                                    checkpoints_dir=checkpoints_dir, stack_on=adapter_dir)
        # Steps trained before a crash were logged by the crashed run; copy them here too so this run is whole.
        for row in result.steps:
            if row["step"] not in result.mlflow_logged_steps:
                values = {k: float(row[k]) for k in ("loss", "learning_rate", "eval_loss") if row[k] != ""}
                if values:
                    mlflow.log_metrics(values, step=int(row["step"]))
        first_run = _common.adapter_run(adapter_dir, tracking.experiment)
        # No run ids in the folder (a DVC output); this run is tagged with its digest, as `train` is.
        meta = {
            "base_model_sha256": result.base_sha256,
            "stacked_on_sha256": result.data_digests["stack_on"],
            "data_sha256": {k: result.data_digests[k] for k in ("train", "val")},
            "params": params.model_dump(mode="json"),
            "method": "sdf",
        }
        training.save_adapter(result.model, result.tokenizer, out_dir, meta, stack_on=adapter_dir)
        m = result.metrics
        report, timing = _common.split_keys({**m, "data": data_metrics}, RUN_KEYS)
        timing["wall_s"] = round(time.perf_counter() - started, 1)
        paths = _common.write_reports(reports_dir / "metrics.json", report=report, run=timing, headline=None)
        training.write_steps_csv(reports_dir / "steps.csv", result.steps)

        from baize.tracking import ADAPTER_TAG, folder_sha256

        tags = {ADAPTER_TAG: folder_sha256(out_dir), "baize.base.sha256": result.base_sha256, "baize.train.fingerprint": result.data_digests["fingerprint"],
                "baize.train.mixed_precision": result.metrics["mixed_precision"],
                "baize.device": result.metrics["device"], "baize.dtype": result.metrics["dtype"]}
        if first_run:
            tags["baize.train_run_id"] = first_run  # the v1.5 run this one started from
        mlflow.set_tags(tags)
        from baize.tracking import log_metrics

        log_metrics({**report, **timing})
        _log_inputs(tokenized_dir, result.data_digests)
        if tracking.log_artifacts:
            mlflow.log_artifacts(str(out_dir), artifact_path="adapter")
            mlflow.log_artifact(str(reports_dir / "steps.csv"))
            for path in paths.values():
                mlflow.log_artifact(str(path))
        training.remove_stale_runs(checkpoints_dir, keep="")
        resumed = f", resumed from step {m['resumed_from_step']}" if m["resumed_from_step"] else ""
        click.echo(
            f"{out_dir}: SDF LoRA on {data_metrics['samples']} best answers, {m['steps']} steps{resumed}, final "
            f"train loss {m['final_train_loss']}, val perplexity {m['eval_perplexity']} (v1.5 "
            f"{m['base_eval_perplexity']}), {timing['wall_s']} s "
            f"(mlflow run {run.info.run_id})"
        )


if __name__ == "__main__":
    main()
