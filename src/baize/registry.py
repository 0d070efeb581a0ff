"""The model registry: each evaluated adapter becomes a version of a registered model, and an alias (`@champion`)
names the best one.

Works on any MLflow store (the local SQLite `mlflow.db` as well as a team's tracking server). Knows nothing about
DVC: the caller passes the tags (base model, data hashes) and the headline metrics. Any adapter folder can be
registered (the SFT adapter `models/adapter`, a stacked SDF adapter `models/adapter_v2`, ...): the registered
model's name says which line of models it belongs to.

An adapter is registered once: a second evaluation of the same content (same `baize.adapter.sha256`) finds its
version again instead of adding one. The alias moves only to a version that beats its current holder on the
headline metric (adapter perplexity on the validation split, lower is better); a holder whose metric is unknown is
never replaced automatically (move it by hand: `MlflowClient().set_registered_model_alias`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize.errors import BaizeError
from baize.tracking import ADAPTER_TAG, explain, folder_sha256

METRIC_TAG_PREFIX = "metric."
DEFAULT_METRIC = "ppl"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    new: bool            # False: this adapter's content was registered before (that version was reused)
    promoted: bool       # the alias now points at this version
    alias: str
    holder: str | None   # the alias's version before (None: it named no version)
    metric: str
    value: float | None
    holder_value: float | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def summary(self) -> str:
        made = "registered as" if self.new else "already registered as"
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        if self.promoted and self.holder in (None, self.version):
            moved = f"@{self.alias} -> v{self.version} (no holder before)" if self.holder is None else \
                f"@{self.alias} stays on v{self.version}"
        elif self.promoted:
            moved = f"@{self.alias} moved v{self.holder} -> v{self.version} ({self.metric} {self.holder_value:.4g} -> {value})"
        else:
            held = "n/a" if self.holder_value is None else f"{self.holder_value:.4g}"
            moved = f"@{self.alias} stays on v{self.holder} ({self.metric} {held} vs {value} here)"
        return f"registry: {made} {self.uri}; {moved}"


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _beats(value: float | None, other: float | None, lower_is_better: bool) -> bool:
    if value is None:
        return False
    if other is None:
        return False  # an unknown holder is not replaced automatically
    return value < other if lower_is_better else value > other


def _versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name = '{name}'"))


def _holder(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _adapter_source(client, adapter_dir: Path, run_id: str, source_run_id: str | None) -> tuple[str, str]:
    """(source, its run) of a version: the train run's logged `adapter/` when it has one, else a copy logged into
    `run_id` now. A server checks that the version's run holds its source."""
    if source_run_id:
        if client.list_artifacts(source_run_id, "adapter"):
            return f"{client.get_run(source_run_id).info.artifact_uri}/adapter", source_run_id
    client.log_artifacts(run_id, str(adapter_dir), "adapter")
    return f"{client.get_run(run_id).info.artifact_uri}/adapter", run_id


def register_adapter(
    adapter_dir: str | Path,
    *,
    name: str,
    tracking_uri: str,
    run_id: str,
    metrics: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    source_run_id: str | None = None,
    alias: str = "champion",
    metric: str = DEFAULT_METRIC,
    lower_is_better: bool = True,
) -> Registration:
    """Register `adapter_dir` as a version of `name` (tagged with `tags`, the adapter's digest, `metrics` as
    `metric.<key>` and `run_id`, the evaluation, as `baize.eval_run_id`; its files are those the train run
    `source_run_id` logged, else a copy logged into `run_id`) and move `alias` to it when it beats the holder on
    `metric`.

    Against a server, a refused user, a wrong password or a server that went away raises a BaizeError (one line).
    """
    try:
        return _register(Path(adapter_dir), name=name, tracking_uri=tracking_uri, run_id=run_id, metrics=metrics,
                         tags=tags or {}, source_run_id=source_run_id, alias=alias, metric=metric,
                         lower_is_better=lower_is_better)
    except BaizeError:
        raise
    except Exception as exc:
        err = explain(exc, tracking_uri)
        if err is None:
            raise
        raise BaizeError(f"registry {name!r}: {err}") from None


def _register(adapter_dir: Path, *, name, tracking_uri, run_id, metrics, tags, source_run_id, alias, metric,
              lower_is_better) -> Registration:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not (adapter_dir / "adapter_config.json").is_file():
        raise BaizeError(f"{adapter_dir}: no adapter_config.json, nothing to register")
    client = MlflowClient(tracking_uri)
    digest = folder_sha256(adapter_dir)
    try:
        client.create_registered_model(name, description="Baize LoRA adapters (registered by the evaluate stage)")
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    value = _number(metrics.get(metric))
    same = [v for v in _versions(client, name) if v.tags.get(ADAPTER_TAG) == digest]
    if same:
        version, new = min(same, key=lambda v: int(v.version)), False
    else:
        version_tags = {**{k: str(v) for k, v in tags.items()}, ADAPTER_TAG: digest, "baize.eval_run_id": run_id}
        for key, val in metrics.items():
            if _number(val) is not None:
                version_tags[f"{METRIC_TAG_PREFIX}{key}"] = str(val)
        source, source_run = _adapter_source(client, adapter_dir, run_id, source_run_id)
        version = client.create_model_version(name, source=source, run_id=source_run, tags=version_tags)
        new = True

    holder = _holder(client, name, alias)
    holder_value = _number(holder.tags.get(f"{METRIC_TAG_PREFIX}{metric}")) if holder else None
    promote = holder is None or (holder.version != version.version and _beats(value, holder_value, lower_is_better))
    if promote:
        client.set_registered_model_alias(name, alias, version.version)
        # Two evaluations at once (queued experiments): each compared with the holder it read. A version
        # registered meanwhile that beat that holder and beats this one would have won in sequence: it wins here.
        floor = int(holder.version) if holder else 0
        rivals = [v for v in _versions(client, name)
                  if int(v.version) > floor and v.version != version.version
                  and _beats(_number(v.tags.get(f"{METRIC_TAG_PREFIX}{metric}")), value, lower_is_better)
                  and (holder is None or _beats(_number(v.tags.get(f"{METRIC_TAG_PREFIX}{metric}")), holder_value,
                                                lower_is_better))]
        if rivals:
            best = min(rivals, key=lambda v: _number(v.tags[f"{METRIC_TAG_PREFIX}{metric}"]) * (1 if lower_is_better else -1))
            client.set_registered_model_alias(name, alias, best.version)
            promote = False
    elif holder is not None and holder.version == version.version:
        promote = True  # already the holder
    return Registration(name=name, version=str(version.version), new=new, promoted=promote, alias=alias,
                        holder=str(holder.version) if holder else None, metric=metric, value=value,
                        holder_value=holder_value)


def champion(name: str, tracking_uri: str, alias: str = "champion") -> str | None:
    """The version number the alias names, or None."""
    from mlflow import MlflowClient

    holder = _holder(MlflowClient(tracking_uri), name, alias)
    return str(holder.version) if holder else None
