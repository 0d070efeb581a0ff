"""dvc.yaml lists what each stage runs: a stage whose entrypoint (stages/X.py) imports, directly or through other
modules, a file of src/baize/ or stages/ that its `deps` do not cover would not re-run when that file changes.

Imports are read statically (`ast`, every `import` anywhere in a module, the ones inside functions too, since they
run when the stage does), not by running the stages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"baize": ROOT / "src" / "baize", "stages": ROOT / "stages"}


def module_file(name: str) -> Path | None:
    """The file of a first-party module (`baize.x.y` or `stages.z`), None for anything else."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].joinpath(*rest)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """First-party modules one file imports (with the packages that contain them, whose __init__ runs first)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from baize import hardware` imports the module baize.hardware; `from baize.x import f` imports baize.x
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if module_file(prefix) is not None:
                    found.add(prefix)
    return found


def closure(entry: str) -> set[Path]:
    """Files of every first-party module that running `python -m <entry>` can import."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name), name) - seen)
    return {module_file(name) for name in seen}


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == dep or rel.startswith(dep.rstrip("/") + "/") for dep in deps)


def stages() -> list[tuple[str, str, list[str]]]:
    data = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    out = []
    for name, stage in data["stages"].items():
        match = re.search(r"python -m (stages\.\w+)", stage["cmd"])
        assert match, f"{name}: cmd does not run a stages/ module"
        out.append((name, match.group(1), [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]))
    return out


@pytest.mark.parametrize(("stage", "entry", "deps"), stages(), ids=[s[0] for s in stages()])
def test_every_module_a_stage_imports_is_in_its_deps(stage, entry, deps):
    missing = sorted(p.relative_to(ROOT).as_posix() for p in closure(entry) if not covered(p, deps))
    assert not missing, f"dvc.yaml: stage {stage!r} imports {', '.join(missing)} but its deps do not list them"


def test_the_import_reader_follows_function_level_and_from_imports():
    files = {p.relative_to(ROOT).as_posix() for p in closure("stages.train")}
    assert {"stages/train.py", "src/baize/training.py", "src/baize/hardware.py", "src/baize/config.py",
            "src/baize/inference.py"} <= files  # hardware via `from baize import hardware`; inference inside train()
    assert not any("site-packages" in f for f in files)


def test_no_dependency_is_an_empty_file():
    """DVC prints a yellow "'<path>' is empty." for an empty dependency or output file on every `dvc repro`."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    empty = sorted({
        str(dep) for stage in spec.values() for dep in stage.get("deps", [])
        if (ROOT / str(dep)).is_file() and (ROOT / str(dep)).stat().st_size == 0
    })
    assert not empty, f"empty dependency files: {empty}"
