"""Adapters served unmerged, each row its own (baize.selfchat.multi_lora), against PEFT on a tiny random LLaMA.

Two adapters of different shapes (rank 4 on q/v/up with a per-layer rank_pattern, rank 8 on k/down only), so the
rank padding and "this adapter skips this layer" are exercised; logits per row must equal PEFT's model with that
one adapter active, and base rows must be the base model bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baize.errors import BaizeError
from baize.selfchat.multi_lora import BASE, MultiLoRA, RowLoRALinear


def _adapter(base: Path, out: Path, seed: int, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**config))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh LoRA's B is 0, which would hide a wrong routing
            p.data.normal_(0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("multi-lora")
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base", safe_serialization=True)
    return {
        "base": root / "base",
        "x": _adapter(root / "base", root / "x", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2}),
        "y": _adapter(root / "base", root / "y", 2, r=8, lora_alpha=4, target_modules=["k_proj", "down_proj"]),
        "dora": _adapter(root / "base", root / "dora", 3, r=4, target_modules=["q_proj"], use_dora=True),
    }


def _load(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def _peft_logits(tiny: dict, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = _load(tiny["base"]) if name is None else PeftModel.from_pretrained(_load(tiny["base"]), tiny[name]).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_row_gets_its_own_adapter_and_base_rows_are_the_base_exactly(tiny):
    ids = torch.randint(0, 300, (1, 12)).expand(5, -1)
    names = ["x", BASE, "y", "x", BASE]
    loras = MultiLoRA(_load(tiny["base"]), {"x": [tiny["x"]], "y": [tiny["y"]]})
    assert len(MultiLoRA.layers(loras.model)) == 2 * 5  # q, v, up from x; k, down from y
    with torch.no_grad(), loras.rows(names):
        mixed = loras.model(input_ids=ids).logits
    expected = {n: _peft_logits(tiny, None if n == BASE else n, ids[:1]) for n in set(names)}
    for row, name in enumerate(names):
        if name == BASE:
            assert torch.equal(mixed[row : row + 1], expected[BASE])  # zeros added: the same bits
        else:
            torch.testing.assert_close(mixed[row : row + 1], expected[name], atol=1e-5, rtol=1e-5)
    for name in ("x", "y"):  # every row one adapter: the one-adapter path
        with torch.no_grad(), loras.rows([name] * 2):
            alone = loras.model(input_ids=ids[:2]).logits
        torch.testing.assert_close(alone[:1], expected[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # outside `rows`: the base
        assert torch.equal(loras.model(input_ids=ids[:1]).logits, expected[BASE])


def test_a_stacked_pair_is_the_sum_of_both(tiny):
    from peft import PeftModel

    ids = torch.randint(0, 300, (1, 10))
    loras = MultiLoRA(_load(tiny["base"]), {"v2": [tiny["x"], tiny["y"]]})
    with torch.no_grad(), loras.rows(["v2"]):
        stacked = loras.model(input_ids=ids).logits
    model = PeftModel.from_pretrained(_load(tiny["base"]), tiny["x"], adapter_name="x")
    model.load_adapter(str(tiny["y"]), adapter_name="y")
    model.base_model.set_adapter(["x", "y"])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(stacked, expected, atol=1e-5, rtol=1e-5)


def test_lora_weights_follow_the_base_dtype(tiny):
    model = _load(tiny["base"]).to(torch.bfloat16)
    loras = MultiLoRA(model, {"x": [tiny["x"]]})
    layer = MultiLoRA.layers(loras.model)[0]
    assert isinstance(layer, RowLoRALinear)
    assert layer.a_all.dtype == layer.b_all.dtype == torch.bfloat16
    with torch.no_grad(), loras.rows(["x", BASE]):
        assert loras.model(input_ids=torch.ones((2, 4), dtype=torch.long)).logits.dtype == torch.bfloat16


def test_unsupported_adapters_are_refused_by_folder(tiny):
    with pytest.raises(BaizeError, match=r"dora: use_dora adapters are not served unmerged"):
        MultiLoRA(_load(tiny["base"]), {"d": [tiny["dora"]]})
