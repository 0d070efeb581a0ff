"""Stage `base_model`: materialize `model.base` as a plain Hugging Face folder in models/base/."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import click

from baize.base_model import materialize
from stages import _common


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@click.command()
@click.option("--out", "out_dir", default="models/base", show_default=True, type=click.Path(path_type=Path))
@_common.entrypoint
def main(out_dir: Path) -> None:
    model, tracking = _common.load("model", "tracking")
    provenance = materialize(
        model.base,
        out_dir,
        revision=model.revision,
        dtype=model.dtype,
        trust_remote_code=model.trust_remote_code,
    )
    with _common.mlflow_run("base_model", tracking, ("model",)) as run:
        import mlflow

        # The library versions that wrote the folder: here, not in source.json (a DVC output, the same in every venv).
        versions = {f"baize.base.{dist}_version": _version(dist) for dist in ("transformers", "torch")}
        mlflow.set_tags({"baize.base.kind": provenance["kind"], "baize.base.sha256": str(provenance["source_sha256"]),
                         **versions})
        mlflow.log_metric("num_parameters", provenance.get("num_parameters") or 0)
        if tracking.log_artifacts:
            mlflow.log_artifact(str(out_dir / "source.json"))
        click.echo(f"models/base: {provenance['architecture']} from {model.base} (mlflow run {run.info.run_id})")


if __name__ == "__main__":
    main()
