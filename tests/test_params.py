"""The params schema: every profile validates; a bad value stops a stage with one line, exit 2, nothing written."""

from __future__ import annotations

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
    assert train.micro_batch_size * train.gradient_accumulation_steps * train.num_processes == 64
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
