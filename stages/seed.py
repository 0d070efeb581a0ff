"""Stage `seed`: build data/seeds/seeds.jsonl from the weighted sources in `seed` (see baize.seeds).

Loads every source, normalizes whitespace, drops empty/short/long seeds and exact and near duplicates,
filters by domain and samples `num_seeds` by weight with a fixed key. Writes the seeds atomically, the
counts to reports/seed/report.json (no headline metric: the count is a param), and one MLflow run with all.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from baize import tracking as tracking_lib
from baize.errors import BaizeError
from baize.seeds import prepare_seeds, write_seeds
from stages import _common


def _mlflow_safe(metrics: dict) -> dict:
    """Source labels may hold file paths: keep MLflow metric names to its allowed characters."""
    import re

    out = {}
    for key, value in metrics.items():
        safe = re.sub(r"[^\w.\- :/]", "_", str(key)).replace("..", "_").strip("/")
        out[safe] = _mlflow_safe(value) if isinstance(value, dict) else value
    return out


@click.command()
@click.option("--out", "out_path", default="data/seeds/seeds.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--report", "metrics_path", default="reports/seed/report.json", show_default=True,
              type=click.Path(path_type=Path))
@_common.entrypoint
def main(out_path: Path, metrics_path: Path) -> None:
    seed, tracking = _common.load("seed", "tracking")
    t0 = time.perf_counter()
    result = prepare_seeds(seed)
    metrics = result.metrics()
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    if not result.seeds:
        dropped = ", ".join(f"{k} {v}" for k, v in result.dropped.items() if v) or "none"
        raise BaizeError(
            f"seed: no seeds left: loaded {metrics['loaded_total']}, dropped {dropped}; check seed.sources, "
            f"seed.domains and the length limits"
        )
    if result.shortfall:
        print(
            f"warning: seed.num_seeds is {result.requested} but only {len(result.seeds)} seeds are available "
            f"after filtering and de-duplication; writing {len(result.seeds)}",
            file=sys.stderr,
        )
    write_seeds(out_path, result.seeds)
    report, timing = _common.split_keys(metrics, ("seconds",))
    paths = _common.write_reports(metrics_path, headline=None, report=report, run=timing)
    with _common.mlflow_run("seed", tracking, ("seed",)) as run:
        import mlflow

        tracking_lib.log_metrics(_mlflow_safe(metrics))
        if tracking.log_artifacts:
            mlflow.log_artifact(str(out_path))
            for path in paths.values():
                mlflow.log_artifact(str(path))
        by_domain = ", ".join(f"{k} {v}" for k, v in metrics["sampled"]["by_domain"].items())
        click.echo(f"{out_path}: {len(result.seeds)} seeds ({by_domain}) (mlflow run {run.info.run_id})")


if __name__ == "__main__":
    main()
