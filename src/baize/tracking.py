"""MLflow runs for pipeline stages: one run per stage, grouped under one parent run per pipeline execution.

Knows nothing about DVC: the caller passes the tags (git commit, experiment name, input hashes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from baize.errors import BaizeError

PIPELINE_TAG = "baize.pipeline_id"
STAGE_TAG = "baize.stage"
KIND_TAG = "baize.kind"

# MLflow 3 logs its own telemetry and a prompt about it; a pipeline stage has no use for either.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def default_tracking_uri(project_root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set (a team server), else SQLite `mlflow.db` at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """A tracking server (team mode: artifacts go through it, credentials from the environment), not a local store."""
    return uri.startswith(("http://", "https://", "databricks"))


def _public(uri: str) -> str:
    """The URI without any `user:password@` part, for messages."""
    return re.sub(r"//[^/@]*@", "//", uri)


def explain(exc: BaseException, uri: str) -> BaizeError | None:
    """One line for an MLflow failure against a server (credentials, permissions, the server or its database
    down), naming the server and the user but never the password; None for anything else."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException) or not is_server(uri):
        return None
    where = f"MLflow server {_public(uri)}"
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    text = str(exc)
    endpoint = re.search(r"endpoint (/\S+)", text)
    what = f" ({endpoint.group(1)})" if endpoint else ""
    code = getattr(exc, "error_code", "")
    if code == "UNAUTHENTICATED":
        return BaizeError(f"{where}: not authenticated as {user or '(no user)'!r}{what}: check "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if code == "PERMISSION_DENIED":
        return BaizeError(f"{where}: user {user!r} may not do this{what} (read-only?): ask an admin for EDIT "
                          "on the experiment or registered model")
    if re.search(r"Max retries exceeded|Connection ?(refused|reset|aborted)|NewConnectionError|RemoteDisconnected",
                 text):
        cause = "server errors (its database may be down)" if re.search(r"too many 5\d\d", text) else "unreachable"
        return BaizeError(f"{where}: {cause}{what}; this stage logged nothing complete: re-run `dvc repro` "
                          "when the server is back")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return BaizeError(f"{where}: {first[:300]}")


def check_server(uri: str, experiment: str) -> None:
    """Fail fast, before a stage's work, when the tracking server is down or refuses the credentials."""
    if not is_server(uri):
        return
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception as exc:  # noqa: BLE001 - turned into one line below, or re-raised
        err = explain(exc, uri)
        if err is None:
            raise
        raise err from None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> {"train.lora_r": "8"}; MLflow params are flat strings (500 chars max)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:500]
    return out


def _experiment_id(client, name: str, artifact_root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # An absolute artifact location keeps artifacts at the project root even when a stage runs in a
    # `dvc exp run --temp` copy of the repo.
    location = artifact_root.resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _pipeline_parent(client, experiment_id: str, pipeline_id: str, tags: Mapping[str, str]) -> str:
    """The parent run shared by all stages of one pipeline execution, created by whichever stage runs first."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_id}' and tags.`{KIND_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    # Only what all stages share: git commit and experiment name, not one stage's name or inputs.
    parent_tags = {k: v for k, v in tags.items() if not k.startswith(("dvc.dep.", STAGE_TAG))}
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline {pipeline_id[:8]}",
        tags={**parent_tags, PIPELINE_TAG: pipeline_id, KIND_TAG: "pipeline"},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    experiment: str,
    tracking_uri: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    pipeline_id: str | None = None,
    artifact_root: Path | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Start the MLflow run of one stage; yields the active `mlflow.ActiveRun`.

    The run gets the stage's params (flattened), the given tags, the stage name, and a parent run that
    groups the stages of one pipeline execution (`pipeline_id`). A failing stage ends its run FAILED.
    `system_metrics` samples CPU, memory (and GPU) usage during the run (for long stages like training).
    """
    import mlflow
    from mlflow import MlflowClient

    # On a server the server decides where artifacts go (proxied: clients need no storage credentials).
    if is_server(tracking_uri):
        artifact_root = None
    try:
        mlflow.set_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri)
        experiment_id = _experiment_id(client, experiment, artifact_root)
        all_tags = {**tags, STAGE_TAG: stage, KIND_TAG: "stage"}
        parent = None
        if pipeline_id:
            all_tags[PIPELINE_TAG] = pipeline_id
            parent = _pipeline_parent(client, experiment_id, pipeline_id, tags)
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, tags=all_tags, parent_run_id=parent,
            log_system_metrics=system_metrics,
        ) as run:
            mlflow.log_params(flatten(params))
            yield run
    except Exception as exc:
        # A server that refuses the user or went away mid-stage: one line instead of a traceback.
        err = explain(exc, tracking_uri)
        if err is None:
            raise
        raise err from None


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric leaves of a (nested) metrics dict; strings and None are skipped."""
    import mlflow

    flat = {}
    for key, value in flatten_numbers(metrics).items():
        flat[key.replace("/", ".")] = value
    if flat:
        mlflow.log_metrics(flat, step=step)


def flatten_numbers(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, f"{name}."))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            out[name] = float(value)
    return out


ADAPTER_TAG = "baize.adapter.sha256"


def folder_sha256(folder: Path) -> str:
    """sha256 over a folder's files (relative names and bytes): the same content gives the same digest anywhere.

    Outputs that DVC versions carry no run ids (those would change their hash on every run); a run is found from
    its output's content instead (`ADAPTER_TAG` on the train run, see `find_run_by_tag`).
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def find_run_by_tag(tracking_uri: str, experiment: str, stage: str, key: str, value: str) -> str | None:
    """The newest finished run of `stage` in `experiment` tagged `key = value`, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{key}` = '{value}' and tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
