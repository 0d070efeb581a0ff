"""The params schema: every profile validates; a bad value stops a stage with one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from baize.config import SECTIONS, load_sections, parse_section, validate_all
from baize.errors import ParamsError

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted([ROOT / "params.yaml", *(ROOT / "profiles").glob("*.yaml")])


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_validates(path):
    sections = validate_all(path)
    assert {"model", "tracking"} <= set(sections)


def test_default_profile_has_every_section():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(data) == set(SECTIONS)


def test_paper_profile_is_the_papers_recipe():
    sections = validate_all(ROOT / "profiles" / "paper.yaml")
    assert sections["model"].base == "huggyllama/llama-7b"
    assert sections["selfchat"].backend in ("openai", "openai-batch")
    assert sections["selfchat"].model == "gpt-3.5-turbo"
    train = sections["train"]
    assert train.batch_size == 64
    assert train.micro_batch_size * train.gradient_accumulation_steps() * train.num_processes == 64
    assert train.learning_rate == 2e-4 and train.precision == "int8"
    assert (train.lora_r, train.lora_alpha, train.lora_dropout) == (8, 16, 0.05)
    assert sections["tokenize"].max_length == 512 and sections["tokenize"].val_size == 2000


@pytest.mark.parametrize(
    ("section", "raw", "expected"),
    [
        ("train", {"lerning_rate": 1e-4}, "unknown key 'train.lerning_rate' (allowed: precision"),
        ("train", {"micro_batch_size": "four"}, "train.micro_batch_size = 'four': Input should be a valid integer"),
        ("train", {"learning_rate": -1.0}, "train.learning_rate = -1.0: Input should be greater than 0"),
        ("train", {"precision": "int4"}, "train.precision = 'int4': Input should be 'int8', 'bf16' or 'fp32'"),
        ("tokenize", {"max_length": "512"}, "tokenize.max_length = '512': Input should be a valid integer"),
        ("model", {"dtype": "float8"}, "model.dtype = 'float8'"),
        ("seed", {"sources": [{"type": "file", "nam": "x"}]}, "unknown key 'seed.sources.0.nam' (allowed: type, name"),
        ("selfchat", {"temperature": 3.5}, "selfchat.temperature = 3.5: Input should be less than or equal to 2"),
        ("train", {"batch_size": 64, "micro_batch_size": 4, "num_processes": 3},
         "train: batch_size (64) must be a multiple of micro_batch_size x num_processes (4 x 3 = 12)"),
        ("sdf_train", {"batch_size": 6}, "sdf_train: batch_size (6) must be a multiple of micro_batch_size"),
        ("evaluate", {"max_new_tokens": 2048}, "evaluate: max_new_tokens (2048) must be smaller than max_context"),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_rule(section, raw, expected):
    with pytest.raises(ParamsError) as info:
        parse_section(section, raw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: ")
    assert expected in message


def test_file_level_errors(tmp_path):
    bad_yaml = tmp_path / "params.yaml"
    bad_yaml.write_text("model:\n  base: [unclosed\n")
    with pytest.raises(ParamsError, match=r"params.yaml:\d+: invalid YAML"):
        load_sections("model", path=bad_yaml)
    bad_yaml.write_text("modle: {}\n")
    with pytest.raises(ParamsError, match="unknown section 'modle'"):
        load_sections("model", path=bad_yaml)
    bad_yaml.write_text("tracking: {}\n")
    with pytest.raises(ParamsError, match="missing section 'model'"):
        load_sections("model", path=bad_yaml)


@pytest.mark.parametrize(
    "bad",
    [
        {"model": {"base": "packaged:smollm2-135m-instruct", "dtype": "float8"}},
        {"model": {"bse": "x"}},
        {"model": {"trust_remote_code": "yes"}},
        {"model": {}, "tracking": {"experiment": ""}},
    ],
)
def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path, bad):
    params = {"model": {}, "tracking": {}, **bad}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.base_model", "--out", "models/base"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: "), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# ---------------------------------------------------------------- issue 14: a typo costs nothing


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'm.db'}",
           "BAIZE_PIPELINE_ID": "test", "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc), *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bad_params_value_stops_dvc_repro_before_any_output_is_deleted(tmp_path):
    """The real dvc.yaml's `params` and `seed` stages in a scratch project: a typo in params.yaml stops `dvc repro`
    at the `params` stage (exit 2 line), and the seed stage's previous output is still there; a change to another
    section re-runs no stage that does not read it."""
    import shutil

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    project = tmp_path / "p"
    project.mkdir()
    for name in ("stages", "src/baize"):  # the stages' deps: every module they import (tests/test_dvc_deps.py)
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"params": spec["params"], "seed": spec["seed"]}}))
    params = yaml.safe_load((ROOT / "profiles/micro.yaml").read_text())
    params["tracking"]["log_artifacts"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    assert _dvc(project, "init", "-q").returncode == 0

    first = _dvc(project, "repro", "seed")
    assert first.returncode == 0, first.stdout + first.stderr
    seeds = (project / "data/seeds/seeds.jsonl").read_bytes()
    assert json.loads((project / "reports/params/selfchat.json").read_text())["max_retry_after_s"] == 120  # defaults

    for section, key, value, needle in [
        ("seed", "num_seeds", "six", "seed.num_seeds = 'six'"),  # the stage's own section
        ("selfchat", "temprature", 0.7, "unknown key 'selfchat.temprature'"),  # a section it does not read
    ]:
        bad = {**params, section: {**params[section], key: value}}
        (project / "params.yaml").write_text(yaml.safe_dump(bad))
        proc = _dvc(project, "repro", "seed")
        assert proc.returncode != 0
        assert needle in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
        assert (project / "data/seeds/seeds.jsonl").read_bytes() == seeds  # nothing deleted

    changed = {**params, "train": {**params["train"], "lora_r": 4}}
    (project / "params.yaml").write_text(yaml.safe_dump(changed))
    proc = _dvc(project, "repro", "seed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Stage 'seed' didn't change, skipping" in proc.stdout  # its section's resolved file is unchanged


def test_params_check_prints_resolved_values_and_exits_2_on_a_bad_value(tmp_path):
    from click.testing import CliRunner

    from baize.cli import main

    runner = CliRunner()
    ok = runner.invoke(main, ["params", "check", str(ROOT / "profiles/micro.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "  max_retry_after_s: 120.0  # default" in ok.output and "  num_seeds: 6\n" in ok.output
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["train"]["lora_r"] = "eight"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    proc = runner.invoke(main, ["params", "check", str(tmp_path / "params.yaml")])
    assert proc.exit_code == 2
    assert proc.output.strip().splitlines() == [
        f"error: {tmp_path / 'params.yaml'}: train.lora_r = 'eight': Input should be a valid integer"
    ]
    proc = subprocess.run([str(Path(sys.executable).with_name("baize")), "params", "check", "--profile", "paper"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "base: huggyllama/llama-7b" in proc.stdout, proc.stderr
