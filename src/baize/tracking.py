"""MLflow runs for pipeline stages: one run per stage, grouped under one parent run per pipeline execution.

Knows nothing about DVC: the caller passes the tags (git commit, experiment name, input hashes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
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


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses (or asks), and a store with no runs yet
# opens on the GenAI traces overview; "custom_model_development" opens the runs table, the model-training view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _experiment_id(client, name: str, artifact_root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        # An experiment made before this tag existed, or by hand: tagged once; a kind a user chose is kept.
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            from mlflow.exceptions import MlflowException

            try:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            except MlflowException as exc:
                # Only the UI's first view depends on it: a user without EDIT on a shared experiment still gets
                # the error that matters (creating the run), not one about a tag.
                if exc.get_http_status_code() not in (401, 403):
                    raise
        return exp.experiment_id
    # An absolute artifact location keeps artifacts at the project root even when a stage runs in a
    # `dvc exp run --temp` copy of the repo.
    location = artifact_root.resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another stage process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pipeline_parent(client, experiment_id: str, pipeline_id: str, tags: Mapping[str, str], *,
                     name: str | None = None, started_ms: int | None = None) -> str:
    """The parent run shared by all stages of one pipeline execution, created by whichever stage runs first.

    It starts when the pipeline started (`started_ms`: the `dvc repro`/`dvc exp run` process) and is never left
    RUNNING: each stage run moves its end time to the stage's start and end (`_extend_parent`), so it spans the
    stages run so far even after a stage was killed (-9) and no handler could run.
    """
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
        start_time=started_ms,
        run_name=name or f"pipeline {pipeline_id[:8]}",
        tags={**parent_tags, PIPELINE_TAG: pipeline_id, KIND_TAG: "pipeline"},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _extend_parent(client, parent: str, *, failed: bool = False) -> None:
    """End the parent run now (FAILED when a stage failed; a FAILED pipeline stays FAILED)."""
    status = "FAILED" if failed or client.get_run(parent).info.status == "FAILED" else "FINISHED"
    client.set_terminated(parent, status, end_time=_now_ms())


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
    run_name: str | None = None,
    started_ms: int | None = None,
    pipeline_name: str | None = None,
    pipeline_started_ms: int | None = None,
) -> Iterator[Any]:
    """Start the MLflow run of one stage; yields the active `mlflow.ActiveRun`.

    The run gets the stage's params (flattened), the given tags, the stage name, and a parent run that
    groups the stages of one pipeline execution (`pipeline_id`, named `pipeline_name`, started at
    `pipeline_started_ms`). A failing stage ends its run FAILED. `run_name` (default: the stage) names the run;
    `started_ms` (epoch milliseconds, default now) is when the stage's work began, so that a stage that opens its
    run only to log its results still shows its real duration. `system_metrics` samples CPU, memory (and GPU)
    usage during the run (for long stages like training).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    # On a server the server decides where artifacts go (proxied: clients need no storage credentials).
    if is_server(tracking_uri):
        artifact_root = None
    parent = None
    client = None
    failed = True
    try:
        mlflow.set_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri)
        experiment_id = _experiment_id(client, experiment, artifact_root)
        all_tags = {**tags, STAGE_TAG: stage, KIND_TAG: "stage"}
        if pipeline_id:
            all_tags[PIPELINE_TAG] = pipeline_id
            parent = _pipeline_parent(client, experiment_id, pipeline_id, tags, name=pipeline_name,
                                      started_ms=pipeline_started_ms or started_ms)
            all_tags["mlflow.parentRunId"] = parent
        # Created here rather than by mlflow.start_run, which has no start time: the run starts with the stage.
        created = client.create_run(experiment_id, start_time=started_ms, run_name=run_name or stage,
                                    tags=resolve_tags(all_tags))
        if parent is not None:
            _extend_parent(client, parent)  # up to now already: a stage killed from here on runs no handler
        with mlflow.start_run(run_id=created.info.run_id, log_system_metrics=system_metrics) as run:
            mlflow.log_params(flatten(params))
            yield run
            failed = False
    except Exception as exc:
        # A server that refuses the user or went away mid-stage: one line instead of a traceback.
        err = explain(exc, tracking_uri)
        if err is None:
            raise
        raise err from None
    finally:
        if parent is not None:
            with contextlib.suppress(Exception):  # the stage's own error (if any) is what the user must see
                _extend_parent(client, parent, failed=failed)


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
