"""The device / dtype decision (accelerators faked at torch's boundary), the effective-batch arithmetic, and
collectives on the process group's device. CPU only: CI has no GPU."""

from __future__ import annotations

import json

import pytest
import torch

from baize import hardware, training
from baize.config import TrainParams
from baize.errors import BaizeError, ParamsError


@pytest.fixture
def machine(monkeypatch):
    """Fake what torch reports: `machine(cuda=True, bf16=False, gpus=2, mps=False, cpu_bf16=False)`."""
    monkeypatch.delenv(hardware.DEVICE_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def set_up(cuda=False, bf16=True, gpus=1, mps=False, cpu_bf16=False, free_gb=80.0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gb * 2**30), int(free_gb * 2**30)))
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: cpu_bf16)

    return set_up


def test_cpu_is_the_fallback_and_keeps_todays_rules(machine):
    machine(cpu_bf16=False)
    p = hardware.placement("auto")
    assert (p.device, p.dtype, p.device_map) == ("cpu", "float32", None)
    assert p.load_kwargs() == {"dtype": torch.float32}  # no device_map: the plain CPU load, as before
    assert hardware.placement("float32").load_kwargs() == {"dtype": torch.float32}
    assert hardware.resolve_mixed_precision("auto") == "no"
    assert hardware.int8_device_map() is None
    machine(cpu_bf16=True)  # AMX / AVX512-BF16: `auto` is bf16, as it was
    assert hardware.placement("auto").dtype == "bfloat16" and hardware.resolve_mixed_precision("auto") == "bf16"
    assert p.tags() == {"baize.device": "cpu", "baize.dtype": "float32"}


def test_cuda_wins_with_bf16_where_supported_else_fp16(machine, monkeypatch):
    machine(cuda=True, bf16=True, mps=True)
    p = hardware.placement("auto")
    assert (p.device, p.dtype, p.device_map) == ("cuda:0", "bfloat16", {"": "cuda:0"})
    assert p.load_kwargs() == {"dtype": torch.bfloat16, "device_map": {"": "cuda:0"}}
    assert hardware.resolve_mixed_precision("auto") == "bf16"
    assert hardware.placement("float32").dtype == "float32"  # an explicit dtype is kept
    machine(cuda=True, bf16=False)  # V100 / T4: fp16, the paper's `fp16=True`
    assert hardware.placement("auto").dtype == "float16" and hardware.resolve_mixed_precision("auto") == "fp16"
    # Under `accelerate launch` each process takes its own GPU, int8 weights placed there at load time.
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert hardware.placement("auto").device == "cuda:3" and hardware.int8_device_map() == {"": 3}


def test_mps_where_usable(machine):
    machine(mps=True)
    p = hardware.placement("auto")
    assert (p.device, p.dtype) == ("mps", "float16") and p.device_map == {"": "mps"}
    assert hardware.resolve_mixed_precision("auto") == "no"  # training on MPS stays fp32


def test_a_model_larger_than_one_gpu_is_spread_with_device_map_auto(machine, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1024, 1024)}, str(tmp_path / "model.safetensors"))  # 1 Mi parameters: 2 MiB in bf16
    machine(cuda=True, gpus=2, free_gb=1.0)
    assert hardware.placement("auto", tmp_path).device_map == {"": "cuda:0"}  # fits one GPU
    assert hardware.weights_bytes(tmp_path, "bfloat16") == 2 * 2**20
    machine(cuda=True, gpus=2, free_gb=0.001)
    spread = hardware.placement("auto", tmp_path)
    assert spread.device_map == "auto" and spread.input_device == torch.device("cuda", 0)
    machine(cuda=True, gpus=1, free_gb=0.001)  # one GPU: nothing to spread over (the load says it does not fit)
    assert hardware.placement("auto", tmp_path).device_map == {"": "cuda:0"}


def test_baize_device_overrides_and_is_checked(machine, monkeypatch):
    machine(cuda=True)
    monkeypatch.setenv(hardware.DEVICE_ENV, "cpu")
    assert hardware.placement("auto").device == "cpu"
    monkeypatch.setenv(hardware.DEVICE_ENV, "mps")
    with pytest.raises(BaizeError, match="MPS is not available"):
        hardware.device_type()
    monkeypatch.setenv(hardware.DEVICE_ENV, "tpu")
    with pytest.raises(ParamsError, match="expected cpu, cuda or mps"):
        hardware.device_type()


def test_a_model_that_needs_remote_code_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(BaizeError) as info:
        hardware.check_remote_code(tmp_path)
    assert "auto_map" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hardware.check_remote_code(tmp_path)


@pytest.mark.parametrize(
    ("batch", "micro", "processes", "accumulation"),
    [(4, 4, 1, 1), (64, 4, 1, 16), (64, 4, 2, 8), (64, 8, 8, 1), (64, 2, 4, 8)],
)
def test_accumulation_is_batch_over_micro_batch_times_processes(batch, micro, processes, accumulation):
    params = TrainParams(batch_size=batch, micro_batch_size=micro)
    assert training.accumulation_steps(params, processes) == accumulation
    assert params.gradient_accumulation_steps(processes) == accumulation


def test_the_default_profile_trains_as_before():
    params = TrainParams()  # params.yaml's train: batch 4 = micro 4 x accumulation 1 x 1 process
    assert (params.batch_size, params.micro_batch_size, params.gradient_accumulation_steps()) == (4, 4, 1)


def test_a_batch_that_does_not_divide_is_one_params_error():
    params = TrainParams(batch_size=64, micro_batch_size=4)
    with pytest.raises(ParamsError) as info:
        training.accumulation_steps(params, 3)  # e.g. an accelerate config that starts 3 processes
    message = str(info.value)
    assert "\n" not in message
    for key in ("batch_size", "micro_batch_size", "num_processes", "4 x 3 = 12"):
        assert key in message


class _Accelerator:
    """What `reduce_sum` uses of accelerate's Accelerator, recording the device of what it is asked to reduce."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seen = []

    def reduce(self, tensor, reduction="sum"):
        self.seen.append(tensor.device)
        return torch.tensor(int(tensor.sum().item()) * 2 if tensor.device.type != "meta" else 14)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counters_are_reduced_on_the_process_groups_device(device):
    # "meta" stands in for cuda:N: a CPU tensor in an NCCL collective is what crashed multi-GPU runs.
    accelerator = _Accelerator(device)
    assert training.reduce_sum(accelerator, 7) == 14
    assert accelerator.seen == [torch.device(device)]
