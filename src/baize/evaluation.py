"""Evaluation of a Baize adapter against its base model, in one run on one loaded model.

- Perplexity on the validation split over the tokens that carry the loss (`labels != -100`). With the
  `tokenize` stage's default `loss: ai_only` these are the AI turns plus the `[|Human|]` marker that ends
  each of them, i.e. what the model must generate in a chat; with `loss: all` it is the whole text.
  The base is measured with the adapter switched off (`PeftModel.disable_adapter()`), so both numbers
  come from the same weights in memory, the same data and the same code.
- Generations for a fixed prompt set with Baize's inference prompt and sampling (see `baize.inference`),
  from the base and from base + adapter with the same seeds, and format metrics on them.
- Optional: an LLM judge (`baize.judge`) and lm-evaluation-harness tasks (`run_lm_eval`).

With a stacked Baize v2 (SDF) adapter loaded, the same weights in memory give every model of the comparison
(`variant`): `base` (adapters off), `adapter` (v1.5: the first LoRA alone), `v2` (both LoRAs), and `base_chat`
(the base with its own chat template instead of Baize's prompt: its best use, so the comparison is not against a
strawman).

Knows nothing about DVC or MLflow; `stages/evaluate.py` writes the files and logs the run.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from baize import inference
from baize.errors import BaizeError, InputError, json_error
from baize.formats import AI, HUMAN

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- perplexity


def load_split(path: str | Path):
    """A `datasets.load_from_disk` folder with `input_ids` and `labels` (the tokenize stage's val split)."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise BaizeError(f"{path}: no such dataset folder (run the tokenize stage first)")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise BaizeError(f"{path}: not a saved datasets folder: {str(exc).splitlines()[0]}") from None
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise BaizeError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return ds


def perplexity(model, rows: Sequence[dict[str, Any]], *, batch_size: int = 4, pad_token_id: int = 0,
               desc: str | None = None) -> dict:
    """Token-weighted mean negative log-likelihood over `labels != -100`, and its exp (the perplexity).

    Rows are batched by length (less padding); padded positions get attention 0 and label -100. With `desc`, a
    progress bar over the rows on stderr (`baize.progress`).
    """
    from baize import progress

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    device = next(model.parameters()).device
    with contextlib.closing(progress.bar(len(rows), desc=desc or "", unit="row", enabled=None if desc else False)) as bar:
        total_nll, total_tokens = _nll(model, rows, order, batch_size, pad_token_id, device, bar)
    if total_tokens == 0:
        raise BaizeError("the validation split has no trained tokens (every label is -100)")
    nll = total_nll / total_tokens
    return {"loss": nll, "perplexity": math.exp(nll), "tokens": total_tokens, "samples": len(rows)}


def _nll(model, rows, order, batch_size: int, pad_token_id: int, device, bar) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            labels[j, :n] = torch.tensor(r["labels"])
            mask[j, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # Position t predicts token t+1; only the positions whose target is trained count.
        targets = labels[:, 1:].to(device)
        keep = targets != IGNORE_INDEX
        if keep.any():
            picked = logits[:, :-1][keep].float()
            total_nll += F.cross_entropy(picked, targets[keep], reduction="sum").item()
            total_tokens += int(keep.sum())
        del logits
        bar.update(len(batch))
    return total_nll, total_tokens


def base_model_context(model):
    """`with base_model_context(model):` runs the base model: the adapter is off inside (no-op without one)."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def is_stacked(model) -> bool:
    """A PeftModel holding a Baize v2 stack (the v1.5 LoRA as `sft` under the SDF LoRA)."""
    return inference.STACK_NAME in getattr(model, "peft_config", {})


@contextlib.contextmanager
def variant(model, name: str):
    """`with variant(model, name):` runs that model: `base`/`base_chat` (adapters off), `adapter` (v1.5: the first
    LoRA of a stack alone, or the only one), `v2` (both LoRAs of a stack)."""
    STACK_NAME = inference.STACK_NAME
    if name in ("base", "base_chat"):
        with base_model_context(model):
            yield
    elif name == "adapter" and is_stacked(model):
        inference.set_active(model, [STACK_NAME])
        try:
            yield
        finally:
            inference.set_active(model, ["default", STACK_NAME])
    elif name == "adapter" or (name == "v2" and is_stacked(model)):
        yield
    else:
        raise BaizeError(f"no model {name!r} in this evaluation")


def perplexities(model, rows: Sequence[dict[str, Any]], names: Sequence[str], *, batch_size: int = 4,
                 pad_token_id: int = 0) -> dict[str, dict]:
    """`perplexity` of each named variant on the same rows."""
    out = {}
    for name in names:
        with variant(model, name):
            out[name] = perplexity(model, rows, batch_size=batch_size, pad_token_id=pad_token_id,
                                   desc=f"evaluate: perplexity of {name}")
    return out


def compare_perplexity(model, rows: Sequence[dict[str, Any]], *, batch_size: int = 4, pad_token_id: int = 0) -> dict:
    """Base (adapter disabled) and adapter perplexity on the same rows, plus the drop (base - adapter)."""
    names = ["base", "adapter", *(["v2"] if is_stacked(model) else [])]
    each = perplexities(model, rows, names, batch_size=batch_size, pad_token_id=pad_token_id)
    base, adapter = each["base"], each["adapter"]
    extra = {}
    if "v2" in each:  # Baize v2 beside v1.5: lower is better, the drop is v2's gain over v1.5
        extra = {"v2": each["v2"]["perplexity"], "v2_loss": each["v2"]["loss"],
                 "v2_drop_pct": 100.0 * (adapter["perplexity"] - each["v2"]["perplexity"]) / adapter["perplexity"]}
    return {
        "base": base["perplexity"],
        "adapter": adapter["perplexity"],
        "drop": base["perplexity"] - adapter["perplexity"],
        "drop_pct": 100.0 * (base["perplexity"] - adapter["perplexity"]) / base["perplexity"],
        "base_loss": base["loss"],
        "adapter_loss": adapter["loss"],
        "tokens": adapter["tokens"],
        "samples": adapter["samples"],
        **extra,
    }


# --------------------------------------------------------------------------- prompts


def _interleave(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First of each category, then second of each, ...: any prefix covers as many categories as it can."""
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        by_cat.setdefault(it.get("category") or "", []).append(it)
    out, i = [], 0
    while len(out) < len(items):
        for group in by_cat.values():
            if i < len(group):
                out.append(group[i])
        i += 1
    return out


def load_prompts(spec: str, num: int | None = None) -> list[dict[str, Any]]:
    """Prompt set `{"id", "category", "source", "text"}` from `packaged:<name>` or a .txt/.jsonl file.

    .txt: one question per line; .jsonl: objects with "text" (or "question", "prompt"), optional "id" and
    "category". `num` keeps that many, spread over the categories (None: all).
    """
    from baize import prompts as packaged

    if spec.startswith("packaged:"):
        name = spec.split(":", 1)[1]
        try:
            items = packaged.load_packaged(name)
        except KeyError:
            raise BaizeError(
                f"evaluate.prompts = {spec!r}: unknown packaged set (have: "
                f"{', '.join('packaged:' + k for k in packaged.PACKAGED)})"
            ) from None
    else:
        items = _read_prompt_file(Path(spec))
    items = [{**it, "source": spec} for it in _interleave(items)]
    return items if num is None else items[:num]


def _read_prompt_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise BaizeError(f"{path}: prompt file not found (evaluate.prompts)")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, lineno, f"invalid JSON: {json_error(exc)}") from None
            text = next((obj.get(k) for k in ("text", "question", "prompt") if isinstance(obj, dict)), None)
            if not isinstance(text, str) or not text.strip():
                raise InputError(path, lineno, "expected an object with a non-empty 'text'")
            items.append({"id": str(obj.get("id", f"line-{lineno}")), "category": obj.get("category"), "text": text})
        else:
            items.append({"id": f"line-{lineno}", "category": None, "text": line.strip()})
    return items


def heldout_prompts(rows: Sequence[dict[str, Any]], tokenizer, num: int) -> list[dict[str, Any]]:
    """The first human turn of up to `num` validation transcripts: questions the adapter never trained on."""
    out = []
    for r in rows:
        if len(out) >= num:
            break
        text = tokenizer.decode(r["input_ids"], skip_special_tokens=True)
        start = text.find(HUMAN)
        end = text.find(f"\n{AI}", start)
        question = text[start + len(HUMAN) : end].strip() if start >= 0 and end > start else ""
        if question:
            out.append({"id": f"heldout-{r.get('id', len(out))}", "category": "heldout", "source": "val", "text": question})
    return out


# --------------------------------------------------------------------------- generations


def generate_answers(model, tokenizer, prompts: Sequence[dict[str, Any]], *, which: Sequence[str] = ("base", "adapter"),
                     max_new_tokens: int, temperature: float, top_p: float, batch_size: int, seed: int,
                     max_context_tokens: int, prompt_format: str = "training", progress: Any = None,
                     chat_tokenizer: Any = None) -> dict[str, list[inference.Generation]]:
    """Answers of each variant (`variant`), same prompts, same seeds: Baize's inference prompt (`prompt_format`),
    except `base_chat`, which is asked through `chat_tokenizer`'s own chat template (the base model's)."""
    budget = inference.prompt_budget(max_context_tokens, max_new_tokens)  # room left for the answer
    texts = [inference.build_prompt(p["text"], (), tokenizer, budget, prompt_format) for p in prompts]
    out = {}
    for name in which:
        prompts_of = texts
        if name == "base_chat":
            prompts_of = [chat_tokenizer.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False,
                                                             add_generation_prompt=True) for p in prompts]
        with variant(model, name):
            out[name] = inference.generate(
                model, tokenizer, prompts_of, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                batch_size=batch_size, seed=seed, progress=progress,
            )
    return out


def generate_answers_served(model_dir: Path, adapters: dict[str, Path | None], tokenizer, prompts: Sequence[dict[str, Any]],
                            *, which: Sequence[str], max_new_tokens: int, temperature: float, top_p: float,
                            batch_size: int, seed: int, max_context_tokens: int, prompt_format: str = "training",
                            chat_tokenizer: Any = None, dtype: str = "float32",
                            progress: Any = None) -> dict[str, list[inference.Generation]]:
    """What `generate_answers` returns, from the self-chat engine's local backend (continuous batching: a row that
    stops frees its slot for the next, where `model.generate` decodes every row of a batch until the longest
    one ends; at 512 new tokens and answers of ~150, most of its steps were padding).

    `adapters` maps a model name to the adapter folder that serves it (None: the base; `base_chat` is the base).
    All models answer in one batch: the engine serves every adapter unmerged beside the base, each row with its own
    (a decode step for 64 rows costs far less than four steps of 16). Every model gets the same requests, whose
    sampling generator is seeded from the request (prompt, sampling, `seed` + the prompt's index): the same prompt
    draws the same random stream whichever model answers it.
    """
    import asyncio

    from baize.selfchat.backend import ChatRequest
    from baize.selfchat.local_backend import LocalBackend

    budget = inference.prompt_budget(max_context_tokens, max_new_tokens)  # room left for the answer
    texts = [inference.build_prompt(p["text"], (), tokenizer, budget, prompt_format) for p in prompts]
    chat_texts = None
    if "base_chat" in which:
        chat_texts = [chat_tokenizer.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False,
                                                         add_generation_prompt=True) for p in prompts]

    def requests(name: str) -> list[ChatRequest]:
        served = name if adapters.get(name) is not None else "base"  # the request's model picks its adapter
        return [ChatRequest(messages=[], model=served, prompt=text, temperature=temperature, top_p=top_p,
                            max_tokens=max_new_tokens, stop=list(inference.STOP_STRINGS), seed=seed + i)
                for i, text in enumerate(chat_texts if name == "base_chat" else texts)]

    served = {name: adapters[name] for name in which if adapters.get(name) is not None}
    batch = [(name, r) for name in which for r in requests(name)]
    with LocalBackend(model_dir, adapters=served or None, batch_size=batch_size, dtype=dtype, seed=seed) as backend:
        async def run(requests: list[ChatRequest]):
            async def one(request):
                reply = await backend.complete(request)
                if progress is not None:
                    progress(1)
                return reply
            return await asyncio.gather(*(one(r) for r in requests))

        replies = asyncio.run(run([r for _, r in batch]))
    out: dict[str, list[inference.Generation]] = {}
    for (name, _), reply in zip(batch, replies, strict=True):
        text = reply.text.strip()
        reason = "length" if reply.finish_reason == "length" else ("stop" if reply.stop_string else "eos")
        out.setdefault(name, []).append(inference.Generation(
            text, reason, reply.stop_string, inference.count_tokens(tokenizer, text) if text else 0, reply.text))
    return {name: out[name] for name in which}


def format_metrics(generations: Sequence[inference.Generation]) -> dict[str, float]:
    """Share that stop by themselves (stop string or EOS before the limit), share with a role leak
    (`inference.has_role_leak`), share that are empty, and mean length in tokens and characters."""
    n = len(generations)
    if n == 0:
        return {"count": 0}
    return {
        "count": n,
        "stop_rate": sum(g.stopped for g in generations) / n,
        "role_leak_rate": sum(inference.has_role_leak(g) for g in generations) / n,
        "empty_rate": sum(not g.text for g in generations) / n,
        "mean_tokens": sum(g.num_tokens for g in generations) / n,
        "mean_chars": sum(len(g.text) for g in generations) / n,
    }


def sample_rows(prompts: Sequence[dict[str, Any]], answers: dict[str, list[inference.Generation]]) -> list[dict]:
    """One row per prompt with every model's answer: what samples.jsonl and the MLflow table hold."""
    rows = []
    for i, p in enumerate(prompts):
        row = {"id": p["id"], "category": p.get("category"), "source": p.get("source"), "question": p["text"]}
        for name, gens in answers.items():
            g = gens[i]
            row[name] = {
                "text": g.text,
                "finish_reason": g.finish_reason,
                "stop_string": g.stop_string,
                "num_tokens": g.num_tokens,
                "role_leak": inference.has_role_leak(g),
            }
        rows.append(row)
    return rows


def flat_table(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Column-wise dict for `mlflow.log_table` (nested answers become `<model>_<field>` columns)."""
    cols: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    cols.setdefault(f"{key}_{k}", []).append(v)
            else:
                cols.setdefault(key, []).append(value)
    return cols


# --------------------------------------------------------------------------- lm-evaluation-harness


def run_lm_eval(base: Path, adapter: Path | None, tasks: Sequence[str], limit: int | None, batch_size: int = 1) -> dict:
    """lm-evaluation-harness tasks through its Python API (`lm_eval.simple_evaluate`), `limit` examples each.

    Optional dependency, imported only here: `pip install lm-eval`. Its task data comes from the Hugging Face
    Hub, so offline this fails with the harness's own message, reported as one line.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise BaizeError(
            "evaluate.lm_eval_tasks is set but lm-evaluation-harness is not installed (pip install lm-eval)"
        ) from None
    from baize import hardware

    hardware.check_remote_code(base)
    # On the device baize.hardware picks (the harness's own default is cuda, which fails on a CPU machine).
    kwargs = {"pretrained": str(base), "batch_size": batch_size, "trust_remote_code": False,
              "device": str(hardware.device())}
    if adapter is not None:
        kwargs["peft"] = str(adapter)
    try:
        result = lm_eval.simple_evaluate(model=HFLM(**kwargs), tasks=list(tasks), limit=limit)
    except Exception as exc:  # task download, unknown task name: the harness's message, one line
        raise BaizeError(f"lm-evaluation-harness failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (result or {}).get("results", {}).items():
        out[task] = {k.replace(",", "_"): v for k, v in metrics.items() if isinstance(v, int | float)}
    return out
