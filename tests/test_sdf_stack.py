"""Baize v2's stacked LoRA: the SDF adapter trained by `training.train(stack_on=...)` on a frozen first adapter.

A tiny random LLaMA (2 layers, hidden 64, the real SmolLM2 tokenizer) and the real int8 training path, so the whole
module runs in seconds. Checked numerically against the formula h = W0 x + s1 B1 A1 x + s2 B2 A2 x, with the deltas
read back from the saved safetensors files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baize import inference, training
from baize.config import SdfTrainParams
from baize.formats import render_training
from baize.transcript import Turn


def _first_adapter(base: Path, out: Path) -> None:
    """A v1.5-like adapter with non-zero B (a fresh LoRA's B is 0, which would hide a wrong stacking)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    (out / "baize_adapter.json").write_text(json.dumps({"mlflow_run_id": "v15-run"}))


@pytest.fixture(scope="module")
def stack(base_model_dir, tmp_path_factory) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("sdf-stack")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    _first_adapter(root / "base", root / "first")
    rows = []
    for i in range(12):
        text = render_training([Turn(role="human", text=f"Question {i}?"), Turn(role="ai", text=f"Answer {i}. " * 3)])
        ids = tokenizer(text)["input_ids"]
        rows.append({"id": f"r{i}", "input_ids": ids, "labels": [-100] * 8 + ids[8:], "length": len(ids)})
    Dataset.from_list(rows[:8]).save_to_disk(str(root / "data/train"))
    Dataset.from_list(rows[8:]).save_to_disk(str(root / "data/val"))
    tokenizer.save_pretrained(root / "data/tokenizer")

    params = SdfTrainParams(precision="int8", lora_r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                            micro_batch_size=4, max_steps=2, learning_rate=1e-2, warmup_steps=0, eval_steps=1,
                            save_steps=1, mixed_precision="no")
    result = training.train(params, data_dir=root / "data", model_dir=root / "base",
                            checkpoints_dir=root / "checkpoints", stack_on=root / "first")
    training.save_adapter(result.model, result.tokenizer, root / "v2", {"mlflow_run_id": "v2-run"},
                          stack_on=root / "first")
    return {"root": root, "params": params, "result": result, "base": root / "base", "first": root / "first",
            "v2": root / "v2"}


def _deltas(folder: Path) -> dict[str, torch.Tensor]:
    """{module name: s * B @ A} from a saved PEFT folder (s = lora_alpha / r)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in weights.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            out[module] = scale * weights[key.replace(".lora_A.", ".lora_B.")] @ a
    return out


def _logits_with(base: Path, *folders: Path) -> torch.Tensor:
    """The base model's logits with the given adapters' deltas added to its weights by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for folder in folders:
            for name, delta in _deltas(folder).items():
                modules[name].weight += delta
        return model(input_ids=IDS).logits


IDS = torch.tensor([[1, 42, 7, 900, 13, 5, 77, 2048, 3]])


def test_first_adapter_is_unchanged_and_only_the_second_trained(stack):
    first = load_file(stack["first"] / "adapter_model.safetensors")
    kept = load_file(stack["v2"] / "sft" / "adapter_model.safetensors")
    assert first.keys() == kept.keys()
    assert all(torch.equal(first[k], kept[k]) for k in first)
    model = stack["result"].model
    # ...and in memory, after the training steps, the frozen weights are still the loaded ones.
    live = {n: p for n, p in model.named_parameters() if ".sft." in n}
    assert live and not any(p.requires_grad for p in live.values())
    for key, value in first.items():
        name = key.replace(".weight", ".sft.weight")
        assert torch.equal(live[name].detach().cpu(), value), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    second = load_file(stack["v2"] / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and second[k].abs().sum() > 0 for k in second)  # it did train
    assert stack["result"].metrics["steps"] == 2
    meta = json.loads((stack["v2"] / "baize_adapter.json").read_text())
    assert meta["stacked_on"] == "sft"
    assert json.loads((stack["v2"] / "sft" / "baize_adapter.json").read_text())["mlflow_run_id"] == "v15-run"


def test_stacked_forward_equals_base_plus_both_deltas(stack):
    model, _ = inference.load_model(stack["base"], stack["v2"], dtype="float32")
    assert sorted(model.active_adapters) == ["default", "sft"]
    with torch.no_grad():
        v2 = model(input_ids=IDS).logits
        inference.set_active(model, ["sft"])
        v15 = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    expected_v2 = _logits_with(stack["base"], stack["first"], stack["v2"])
    torch.testing.assert_close(v2, expected_v2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v15, _logits_with(stack["base"], stack["first"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base, _logits_with(stack["base"]), atol=1e-5, rtol=1e-5)
    assert (v2 - v15).abs().max() > 1e-3  # the second LoRA changes the function


def test_local_backend_and_export_serve_the_same_stacked_model(stack, tmp_path):
    from transformers import AutoModelForCausalLM

    from baize.export import export_merged
    from baize.selfchat.local_backend import LocalBackend

    expected = _logits_with(stack["base"], stack["first"], stack["v2"])
    with LocalBackend(stack["base"], adapter=stack["v2"], dtype="float32", batch_size=1) as backend:
        with torch.no_grad():
            served = backend.model(input_ids=IDS).logits
    torch.testing.assert_close(served, expected, atol=1e-4, rtol=1e-4)
    export_merged(stack["base"], stack["v2"], tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_local_backend_serves_base_first_and_stacked_side_by_side(stack):
    """`adapters`: one batch, each row with its own model (the request's `model` names it, any other name is the
    base): the logits of each row are those of that model alone, and greedy replies equal those of a backend
    serving that one model merged."""
    import asyncio

    from baize.selfchat.backend import ChatRequest
    from baize.selfchat.local_backend import LocalBackend

    expected = {"base": _logits_with(stack["base"]), "v1.5": _logits_with(stack["base"], stack["first"]),
                "v2": _logits_with(stack["base"], stack["first"], stack["v2"])}
    adapters = {"v1.5": stack["first"], "v2": stack["v2"]}
    with LocalBackend(stack["base"], adapters=adapters, dtype="float32", batch_size=6) as backend:
        names = ["v2", "base", "v1.5"]
        ids = IDS.expand(len(names), -1)
        with torch.no_grad(), backend.loras.rows([n if n in backend.loras.names else "__base__" for n in names]):
            logits = backend.model(input_ids=ids).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(logits[row : row + 1], expected[name], atol=1e-4, rtol=1e-4)

        def requests(model):
            return [ChatRequest(messages=[], model=model, prompt=f"Question {i}?", temperature=0, max_tokens=6)
                    for i in range(2)]

        async def answer(b, rs):
            return [c.text for c in await asyncio.gather(*(b.complete(r) for r in rs))]

        together = asyncio.run(answer(backend, requests("v2") + requests("anything") + requests("v1.5")))
        # Each reply names the model that wrote it: the adapter's served name, else the base's.
        assert [backend.complete_sync(r).model for r in (requests("v2")[0], requests("anything")[0])] == [
            "v2", backend.model_name]
    alone = []
    for adapter, model in ((stack["v2"], "v2"), (None, "anything"), (stack["first"], "v1.5")):
        with LocalBackend(stack["base"], adapter=adapter, dtype="float32", batch_size=2) as b:
            alone += asyncio.run(answer(b, requests(model)))
    assert together == alone
    assert len(set(together)) > 1  # the models differ: the test would see a wrong routing


def test_resume_from_a_checkpoint_keeps_both_adapters_active(stack):
    """The Trainer re-activates one adapter after loading a multi-adapter checkpoint; ours re-stacks them."""
    root = stack["root"]
    result = training.train(stack["params"], data_dir=root / "data", model_dir=root / "base",
                            checkpoints_dir=root / "checkpoints", stack_on=root / "first")
    assert result.metrics["resumed_from_step"] == 2
    model = result.model
    assert sorted(model.active_adapters) == ["default", "sft"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".sft." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n and "lora_" in n)


def test_a_stacked_folder_naming_a_missing_first_adapter_is_one_clear_error(stack, tmp_path):
    import shutil

    broken = tmp_path / "v2"
    shutil.copytree(stack["v2"], broken)
    shutil.rmtree(broken / "sft")
    with pytest.raises(Exception, match=r"sft: adapter folder not found"):
        inference.load_model(stack["base"], broken)


def test_evaluation_runs_base_v15_and_v2_from_one_loaded_stack(stack):
    """`evaluate` compares the three models on one copy of the weights: the switch must give each one exactly."""
    from transformers import AutoTokenizer

    from baize import evaluation

    model, tokenizer = inference.load_model(stack["base"], stack["v2"], dtype="float32")
    rows = [{"input_ids": IDS[0].tolist(), "labels": IDS[0].tolist()}]
    each = evaluation.perplexities(model, rows, ["base", "adapter", "v2"])
    manual = {}
    for name, folders in (("base", ()), ("adapter", (stack["first"],)), ("v2", (stack["first"], stack["v2"]))):
        logits = _logits_with(stack["base"], *folders)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], IDS[0, 1:])
        manual[name] = float(loss)
    for name in manual:
        assert each[name]["loss"] == pytest.approx(manual[name], abs=1e-4), name
    ppl = evaluation.compare_perplexity(model, rows)
    assert ppl["v2"] == pytest.approx(each["v2"]["perplexity"], rel=1e-5)
    assert sorted(model.active_adapters) == ["default", "sft"]  # switching back leaves v2 active
    prompts = [{"id": "q1", "text": "How do I boil an egg?"}]
    answers = evaluation.generate_answers(
        model, tokenizer, prompts, which=["base", "base_chat", "adapter", "v2"], max_new_tokens=6, temperature=0,
        top_p=1.0, batch_size=1, seed=1, max_context_tokens=512,
        chat_tokenizer=AutoTokenizer.from_pretrained(stack["base"]),
    )
    assert set(answers) == {"base", "base_chat", "adapter", "v2"}
    assert all(len(g) == 1 for g in answers.values())
