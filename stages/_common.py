"""What every stage entrypoint shares: params loading, error handling, and MLflow tags from DVC/git.

This is the only place that knows about DVC (dvc.yaml, dvc.lock, `dvc exp run` temp dirs); the library
in src/baize/ does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from baize import tracking
from baize.config import TrackingParams, load_sections
from baize.errors import one_line_errors
from baize.transcript import atomic_write_text

PARAMS_FILE = "params.yaml"


def project_root() -> Path:
    """The real project root, also from inside a `dvc exp run --temp`/`--queue` workspace.

    DVC runs those experiments in a copy of the repo under `<root>/.dvc/tmp/exps/...`; the MLflow store
    must still be the one at `<root>`, or the runs would vanish with the copy.
    """
    here = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i] == ".dvc" and parts[i + 1] == "tmp" and parts[i + 2] == "exps":
            return Path(*parts[:i])
    return here


def load(*sections: str):
    """Validate the named params sections (exit 2 with one line on a bad value, before any work).

    With `tracking` among them and a tracking server in MLFLOW_TRACKING_URI, the server is asked first: down,
    or refusing the credentials, the stage stops here with one line, before hours of work it could not log.
    """
    loaded = load_sections(*sections, path=PARAMS_FILE)
    if "tracking" in sections:
        values = loaded if isinstance(loaded, tuple) else (loaded,)
        experiment = values[sections.index("tracking")].experiment
        tracking.check_server(tracking.default_tracking_uri(project_root()), experiment)
    return loaded


def raw_section(name: str) -> dict[str, Any]:
    """The section as written in params.yaml (what MLflow records as the run's params)."""
    data = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")) or {}
    return data.get(name) or {}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_hashes(stage: str) -> dict[str, str]:
    """Content hashes of the stage's deps as DVC records them in dvc.lock (`dvc.dep.<path>` tags).

    Data deps are outputs of earlier stages, already locked when this stage runs; a dep that no stage
    produces (a source file) is hashed here with DVC's file md5.
    """
    try:
        spec = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    except (OSError, KeyError, TypeError):
        return {}
    lock_path = Path("dvc.lock")
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.exists() else {}
    locked: dict[str, str] = {}
    for entry in (lock or {}).get("stages", {}).values():
        for out in entry.get("outs", []):
            if "md5" in out:
                locked[out["path"]] = out["md5"]
    hashes = {}
    for dep in spec.get("deps", []):
        dep = _interpolate(str(dep))
        if dep in locked:
            hashes[f"dvc.dep.{dep}"] = locked[dep]
        elif Path(dep).is_file():
            hashes[f"dvc.dep.{dep}"] = _file_md5(Path(dep))
    return hashes


def _interpolate(text: str) -> str:
    """Resolve dvc.yaml templating such as `${validate.input}` from params.yaml, as DVC does."""

    def value(match: re.Match) -> str:
        node: Any = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")) or {}
        for part in match.group(1).strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return match.group(0) if node is None else str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def _pipeline_origin() -> tuple[str, float]:
    """(id, start time in epoch seconds) of the `dvc repro`/`dvc exp run` that runs this stage.

    `BAIZE_PIPELINE_ID` wins (started: this stage); otherwise the nearest `dvc` ancestor process (pid + start
    time), which every stage of one invocation has in common; a stage run by hand is a pipeline of its own.
    """
    import psutil

    proc = psutil.Process()
    explicit = os.environ.get("BAIZE_PIPELINE_ID")
    if explicit:
        return explicit, proc.create_time()
    for parent in proc.parents():
        try:
            cmd = " ".join(parent.cmdline()[:3])
        except psutil.Error:
            continue
        if "dvc" in os.path.basename(cmd.split(" ")[0]) or " -m dvc" in cmd or "/dvc " in f"{cmd} ":
            origin = parent
            break
    else:
        origin = proc
    seed = f"{origin.pid}:{origin.create_time()}"
    return hashlib.sha256(seed.encode()).hexdigest()[:16], origin.create_time()


def pipeline_id() -> str:
    """An id shared by the stages of one `dvc repro`/`dvc exp run`, to group their runs (see `_pipeline_origin`)."""
    return _pipeline_origin()[0]


def stage_started_ms() -> int:
    """When this stage's process started (epoch ms): its MLflow run covers the imports, the model loading and
    the work, also in stages that open the run only to log their results."""
    import psutil

    return int(psutil.Process().create_time() * 1000)


def params_digest() -> str:
    """7 hex digits of all of params.yaml (parsed, key order ignored): runs of the same params share it."""
    try:
        data = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "nopar"
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:7]


def experiment_label() -> str:
    """What tells two pipeline executions apart in MLflow's run names: the DVC experiment's name (`dvc exp run`
    sets DVC_EXP_NAME, also for the names it makes up), else `params <digest of params.yaml>`."""
    return os.environ.get("DVC_EXP_NAME") or f"params {params_digest()}"


def run_tags(stage: str) -> dict[str, str]:
    tags = {"baize.stage": stage, **input_hashes(stage), "baize.params_digest": params_digest()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc.exp_name"] = exp
    return tags


def mlflow_run(
    stage: str, tracking_params: TrackingParams, params_sections: tuple[str, ...], *, system_metrics: bool = False
):
    """The MLflow run of this stage, with its params sections, tags and the pipeline's parent run.

    Names: `<stage> · <label>` for the stage, `<label>` for the parent (`experiment_label`: the DVC experiment's
    name, or the params digest), so that the compare view tells two experiments apart. The stage run starts when
    the stage's process started, the parent when the `dvc` command did.
    """
    root = project_root()
    params = {name: raw_section(name) for name in params_sections}
    label = experiment_label()
    pid, pipeline_started = _pipeline_origin()
    return tracking.stage_run(
        stage,
        experiment=tracking_params.experiment,
        tracking_uri=tracking.default_tracking_uri(root),
        params=params,
        tags=run_tags(stage),
        pipeline_id=pid,
        artifact_root=root / "mlartifacts",
        system_metrics=system_metrics,
        run_name=f"{stage} · {label}",
        started_ms=stage_started_ms(),
        pipeline_name=label if os.environ.get("DVC_EXP_NAME") else f"pipeline · {label}",
        pipeline_started_ms=int(pipeline_started * 1000),
    )


def register_adapter(adapter_dir: str | Path, tracking_params: TrackingParams, headline: dict, run_id: str,
                     source_run_id: str | None = None, name: str | None = None):
    """Register an adapter folder in the model registry (`tracking.registered_model`, or `name`) with the base
    model, the stage's data hashes (as in dvc.lock), the git commit and the headline metrics as version tags;
    move `tracking.champion_alias` when it wins. Any adapter: `models/adapter`, or a stacked SDF adapter with
    `name=f"{tracking.registered_model}-v2"`. Returns the Registration (None when the registry is off)."""
    from baize import registry

    name = name or tracking_params.registered_model
    if not name:
        return None
    tags = {"baize.base_model": str(raw_section("model").get("base")), "baize.adapter_path": str(adapter_dir)}
    tags.update({k: v for k, v in run_tags("evaluate").items() if k.startswith(("dvc.", "mlflow.source.git"))})
    return registry.register_adapter(
        adapter_dir, name=name, tracking_uri=tracking.default_tracking_uri(project_root()), run_id=run_id,
        metrics=headline, tags=tags, source_run_id=source_run_id, alias=tracking_params.champion_alias,
    )


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def untracked(path: str | Path) -> bool:
    """True for a file that no stage writes and neither a .dvc file nor git tracks: `dvc push` and `git push`
    would not share it, so a clone could not reproduce the stage that reads it."""
    path = Path(path)
    try:
        spec = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8")) or {}
    except OSError:
        return False
    outs = {
        Path(out if isinstance(out, str) else next(iter(out)))
        for entry in (spec.get("stages") or {}).values()
        for key in ("outs", "metrics", "plots")
        for out in entry.get(key, [])
    }
    for candidate in (path, *path.parents):
        if candidate in outs or (candidate.name and candidate.with_name(candidate.name + ".dvc").is_file()):
            return False
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(path)], capture_output=True, timeout=10
        ).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False  # no git: nothing to say
    return not tracked


def write_reports(metrics_path: str | Path, *, headline: dict | None, report: dict, run: dict | None = None) -> dict:
    """A stage's numbers in three files beside each other, by who reads them; returns their paths.

    - metrics.json: the headline (a DVC metric: `dvc metrics show`, `dvc exp show`), a few flat names without
      `.` or `/`, unique across stages, floats to 3 decimals: the README's `dvc exp show --drop '.*[./]'` keeps
      exactly these columns, and they fit 120 columns.
    - report.json: every detail that the inputs decide (a DVC output in git, not a metric).
    - run.json: what differs from run to run with the same inputs (wall-clock seconds, throughput, journal reuse,
      resumes): git-ignored and no DVC output, else `dvc.lock` would change with the clock; also in MLflow.

    Stages whose numbers are not compared across experiments (seed, the SDF steps) pass `headline=None`: no
    metrics.json, so `dvc exp show` stays within 120 columns.
    """
    metrics_path = Path(metrics_path)
    paths = {"report": metrics_path.with_name("report.json")}
    write_json(paths["report"], report)
    if run is not None:
        paths["run"] = metrics_path.with_name("run.json")
        write_json(paths["run"], {**run, **cpu_seconds()})
    if headline is None:
        return paths
    bad = [k for k, v in headline.items() if "." in k or "/" in k or isinstance(v, dict)]
    if bad:
        raise ValueError(f"headline metrics must be flat names without '.' or '/': {bad}")
    # Three decimals: `dvc exp show` must fit 120 columns (full precision is in report.json and MLflow).
    headline = {k: round(v, 3) if isinstance(v, float) else v for k, v in headline.items()}
    paths["metrics"] = metrics_path
    write_json(metrics_path, headline)
    return paths


def cpu_seconds() -> dict:
    """CPU time this stage process has used so far (user + system, its threads and finished children): unlike the
    wall clock, about the same on a busy machine; on an idle one wall ~ cpu_s / the cores the stage keeps busy."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1),
            # the stage's memory high-water mark (ru_maxrss is in KiB on Linux)
            "peak_rss_mb": round(max(own.ru_maxrss, children.ru_maxrss) / 1024)}


def split_keys(metrics: dict, run_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(deterministic detail, run-to-run part) of a stage's metrics dict: `run_keys` go to run.json."""
    return (
        {k: v for k, v in metrics.items() if k not in run_keys},
        {k: v for k, v in metrics.items() if k in run_keys},
    )


def adapter_run(adapter_dir: Path, experiment: str, stage: str = "train") -> str | None:
    """The newest `stage` run that wrote an adapter with exactly this content (its runs are tagged with the
    folder's digest); None for an adapter made elsewhere (another clone, another MLflow store). Adapter folders
    carry no run ids: they are DVC outputs whose hash the inputs alone decide."""
    uri = tracking.default_tracking_uri(project_root())
    return tracking.find_run_by_tag(uri, experiment, stage, tracking.ADAPTER_TAG, tracking.folder_sha256(adapter_dir))


# Every stage command is wrapped in this: one line and the error's exit status (2 for params).
entrypoint = one_line_errors
