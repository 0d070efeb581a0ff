"""Stage `train`: int8 LoRA fine-tuning on data/tokenized, adapter into models/adapter/.

Outputs (rank 0 only): the adapter folder (LoRA safetensors + tokenizer with the Baize chat template +
baize_adapter.json), reports/train/metrics.json, reports/train/steps.csv (for `dvc plots`), and one MLflow run
with params, per-step and system metrics, the dataset inputs and the adapter.

With `train.num_processes` > 1 the command re-runs itself under `accelerate launch` (DDP; DeepSpeed/FSDP
through `train.accelerate_config`), i.e. what it runs is

    accelerate launch --num_processes N --num_machines 1 [--multi_gpu | --config_file C] -m stages.train ...
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import click

from baize.config import TrainParams
from baize.errors import BaizeError
from stages import _common


def launch_command(params: TrainParams, argv: list[str]) -> list[str]:
    """`accelerate launch` of this same stage with N processes (CPU: gloo DDP; CUDA: NCCL/DeepSpeed)."""
    with socket.socket() as sock:  # a free rendezvous port, so parallel runs/tests don't collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(params.num_processes)]
    from baize.hardware import resolve_mixed_precision  # the workers' TrainingArguments resolve it the same way

    mixed = resolve_mixed_precision(params.mixed_precision)
    cmd += ["--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", mixed]
    cmd += ["--dynamo_backend", "no"]
    if params.accelerate_config:
        cmd += ["--config_file", params.accelerate_config]
    else:
        # `--multi_gpu` is accelerate's torchrun launcher; on a machine without GPUs the workers fall back to
        # CPU DDP over gloo (`--cpu` would start a single process unless MPI is installed).
        cmd += ["--multi_gpu"]
    return [*cmd, "-m", "stages.train", *argv]


def _is_launched_worker() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def _system_metrics(run_id: str):
    """CPU/memory/disk (and GPU when present) sampled into the run while training runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5"))
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def _log_inputs(data_dir: Path, digests: dict[str, str]) -> None:
    import mlflow
    from datasets import load_from_disk

    for split, context in (("train", "training"), ("val", "evaluation")):
        if not digests.get(split):
            continue
        ds = load_from_disk(str(data_dir / split))
        # Token ids are integers with no missing values: MLflow's hint about integer columns is noise. log_input
        # infers the schema again (and warns again), so both calls are inside.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
            dataset = mlflow.data.from_huggingface(ds, name=f"tokenized-{split}", digest=digests[split][:16])
            mlflow.log_input(dataset, context=context)


# Wall-clock, throughput, memory and whether a crash was resumed: run.json (untracked) and MLflow, not dvc.lock.
# The device and the base's dtype too: the same inputs must give the same DVC-tracked report on any machine.
RUN_KEYS = ("trained_tokens_per_s", "train_runtime_s", "total_runtime_s", "peak_rss_mb", "resumed_from_step",
            "device", "dtype")


@click.command()
@click.option("--data", "data_dir", default="data/tokenized", show_default=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", default="models/base", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default="models/adapter", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoints", "checkpoints_dir", default="models/checkpoints", show_default=True, type=click.Path(path_type=Path)
)
@click.option("--reports", "reports_dir", default="reports/train", show_default=True, type=click.Path(path_type=Path))
@_common.entrypoint
def main(data_dir: Path, model_dir: Path, out_dir: Path, checkpoints_dir: Path, reports_dir: Path) -> None:
    params, tracking = _common.load("train", "tracking")
    if params.num_processes > 1 and not _is_launched_worker():
        cmd = launch_command(params, sys.argv[1:])
        click.echo(f"train: launching {params.num_processes} processes: {' '.join(cmd[1:])}", err=True)
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise BaizeError(f"train: {params.num_processes}-process run failed (exit {code}); see the first error above")
        return

    from baize import training  # torch/transformers: imported only once the params are known to be valid

    is_main = int(os.environ.get("RANK", "0")) == 0
    run_cm = _common.mlflow_run("train", tracking, ("train",)) if is_main else contextlib.nullcontext()
    with run_cm as run:
        monitor = _system_metrics(run.info.run_id) if run is not None else contextlib.nullcontext()
        with monitor:
            result = training.train(params, data_dir=data_dir, model_dir=model_dir, checkpoints_dir=checkpoints_dir)
        if not is_main:
            return
        import mlflow

        # Steps trained before a crash were logged by the crashed run; copy them here too so this run is whole.
        for row in result.steps:
            if row["step"] not in result.mlflow_logged_steps:
                values = {k: float(row[k]) for k in ("loss", "learning_rate", "eval_loss") if row[k] != ""}
                if values:
                    mlflow.log_metrics(values, step=int(row["step"]))
        # No run id, tracking URI or time in the adapter (a DVC output: its hash must be what the inputs decide);
        # the run is tagged with the adapter's digest instead, and `evaluate` finds it by that.
        meta = {
            "base_model_sha256": result.base_sha256,
            "data_sha256": {k: result.data_digests[k] for k in ("train", "val")},
            "params": params.model_dump(mode="json"),
        }
        training.save_adapter(result.model, result.tokenizer, out_dir, meta)
        m = result.metrics
        report, timing = _common.split_keys(m, RUN_KEYS)
        # The val split's figure is evaluate's `ppl` (base, v1.5 and v2 on the same rows); val_loss is in report.json.
        headline = {"loss": m["train_loss"]}
        paths = _common.write_reports(reports_dir / "metrics.json", headline=headline, report=report, run=timing)
        training.write_steps_csv(reports_dir / "steps.csv", result.steps)

        from baize.tracking import ADAPTER_TAG, folder_sha256

        mlflow.set_tags({
            ADAPTER_TAG: folder_sha256(out_dir),
            "baize.base.sha256": result.base_sha256,
            "baize.train.fingerprint": result.data_digests["fingerprint"],
            "baize.train.mixed_precision": result.metrics["mixed_precision"],
            "baize.device": result.metrics["device"],
            "baize.dtype": result.metrics["dtype"],
        })
        from baize.tracking import log_metrics

        log_metrics(result.metrics)
        _log_inputs(data_dir, result.data_digests)
        if tracking.log_artifacts:
            mlflow.log_artifacts(str(out_dir), artifact_path="adapter")
            mlflow.log_artifact(str(reports_dir / "steps.csv"))
            for path in paths.values():
                mlflow.log_artifact(str(path))
        # Finished: the checkpoints can never be resumed again (the next run with these inputs is a no-op for DVC).
        training.remove_stale_runs(checkpoints_dir, keep="")
        resumed = f", resumed from step {m['resumed_from_step']}" if m["resumed_from_step"] else ""
        click.echo(
            f"models/adapter: {m['steps']} steps{resumed}, eval perplexity {m['eval_perplexity']} "
            f"(base {m['base_eval_perplexity']}), {m['trained_tokens_per_s'] or 0:.0f} trained tokens/s, "
            f"peak RSS {m['peak_rss_mb']:.0f} MB (mlflow run {run.info.run_id})"
        )


if __name__ == "__main__":
    main()
