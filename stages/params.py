"""Stage `params`: the pipeline's first stage. Validates every section of params.yaml before any stage runs.

    python -m stages.params --out reports/params

Why a stage: `dvc repro` deletes a stage's outputs before running its command, so a typo found by the stage
itself has already cost its previous outputs (data/seeds/seeds.jsonl vanished, and the next stage then failed on
a missing file). Every other stage depends on this one through its own section's file, `<out>/<section>.json`
(the section's resolved values: the file's and the defaults), so a bad value stops here, exit 2 with one line,
before DVC removes anything else; and a change to one section re-runs only the stages that read it.
"""

from __future__ import annotations

from pathlib import Path

import click

from baize.config import check_file, resolved
from stages import _common


@click.command()
@click.option("--out", "out_dir", default="reports/params", show_default=True, type=click.Path(path_type=Path))
@_common.entrypoint
def main(out_dir: Path) -> None:
    sections = check_file(_common.PARAMS_FILE)
    for name, section in sections.items():
        _common.write_json(out_dir / f"{name}.json", resolved(section))
    click.echo(f"{_common.PARAMS_FILE}: valid ({', '.join(sections)}); resolved values in {out_dir}/")


if __name__ == "__main__":
    main()
