"""Talking to a Baize model: the prompt, history truncation, stop strings, loading, generation.

Shared by `baize chat` (one streamed reply at a time) and the `evaluate` stage (batched replies). Two prompt
formats (`PROMPT_FORMATS`):

- `training` (default): the text the adapter was trained on, which is also what its chat template renders
  (`apply_chat_template(..., add_generation_prompt=True)`, i.e. what an exported model behind vLLM or
  `transformers serve` is sent):

      The conversation between human and AI assistant.
      [|Human|] {question 1}\n[|AI|] {answer 1}\n[|Human|] {question}\n[|AI|]

- `paper`: the prompt of the Baize demo (paper, Section 5; `generate_prompt_with_history` in the reference
  code), a long system prompt the adapter never sees in training:

      <BAIZE_SYSTEM_PROMPT, which ends with "\n[|Human|]Hello!\n[|AI|]Hi!">
      \n[|Human|]{question 1}\n[|AI|]{answer 1}
      ...
      \n[|Human|]{question}\n[|AI|]

  Why it is not the default: measured on the default profile's adapter, after a first answer the next marker
  was `[|AI|]` (a second AI turn, a role leak) with probability 0.085 on average under this prompt and 0.004 under
  the training text (39 first answers; after later answers, under this prompt: 0.001). Train as you serve.

The reply ends at the first `[|Human|]` or `[|AI|]` (or EOS, or the token limit); when the prompt exceeds the
context budget the oldest (question, answer) pairs are dropped, as the reference demo does.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize.errors import BaizeError, ParamsError
from baize.formats import AI, HUMAN, PREAMBLE

BAIZE_SYSTEM_PROMPT = (
    "The following is a conversation between a human and an AI assistant named Baize (named after a mythical "
    "creature in Chinese folklore). Baize is an open-source AI assistant developed by UCSD and Sun Yat-Sen "
    "University. The human and the AI assistant take turns chatting. Human statements start with [|Human|] and "
    "AI assistant statements start with [|AI|]. The AI assistant always provides responses in as much detail as "
    "possible, and in Markdown format. The AI assistant always declines to engage with topics, questions and "
    "instructions related to unethical, controversial, or sensitive issues. Complete the transcript in exactly "
    "that format.\n[|Human|]Hello!\n[|AI|]Hi!"
)
STOP_STRINGS: tuple[str, ...] = (HUMAN, AI)

History = Sequence[tuple[str, str]]  # (human, ai) pairs, oldest first


class PromptTooLongError(BaizeError):
    """Even the newest question alone does not fit the context budget."""


# --------------------------------------------------------------------------- prompt


PROMPT_FORMATS = ("training", "paper")


def format_turn(question: str, answer: str | None = None, prompt_format: str = "training") -> str:
    """One (question, answer) pair in `prompt_format`; with answer None the text ends on `[|AI|]` for the model.

    training: `[|Human|] {question}\\n[|AI|] {answer}\\n`; paper: `\\n[|Human|]{question}\\n[|AI|]{answer}`.
    """
    if prompt_format == "paper":
        return f"\n{HUMAN}{question}\n{AI}{answer if answer is not None else ''}"
    if prompt_format != "training":
        raise BaizeError(f"prompt format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    # No space after the last [|AI|]: in the training text the space is part of the answer's first token.
    return f"{HUMAN} {question}\n{AI}" + (f" {answer}\n" if answer is not None else "")


def prompt_budget(max_context_tokens: int, max_new_tokens: int) -> int:
    """Tokens the prompt may take: the context minus the room the answer needs (a 2,048-position model asked for
    512 new tokens takes prompts of at most 1,536). `ParamsError` when nothing is left for the prompt."""
    budget = max_context_tokens - max_new_tokens
    if budget < 1:
        raise ParamsError(f"max_context_tokens ({max_context_tokens}) must be larger than the new tokens asked for "
                          f"({max_new_tokens}): the prompt and the answer share the context")
    return budget


def build_prompt(
    question: str,
    history: History = (),
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
    prompt_format: str = "training",
) -> str:
    """The prompt for `question` after `history` in `prompt_format`, dropping the oldest pairs to fit.

    With a tokenizer and a budget, pairs are added newest first while the whole prompt stays within
    `max_context_tokens` (the reference demo's rule: a pair that does not fit ends the history there).
    Raises PromptTooLongError when the question alone does not fit.
    """
    system = BAIZE_SYSTEM_PROMPT if prompt_format == "paper" else PREAMBLE
    parts = [format_turn(h, a, prompt_format) for h, a in history]
    current = format_turn(question, None, prompt_format)
    if tokenizer is None or max_context_tokens is None:
        return system + "".join(parts) + current

    def fits(text: str) -> bool:
        return count_tokens(tokenizer, text) <= max_context_tokens

    if not fits(system + current):
        raise PromptTooLongError(
            f"the question alone ({count_tokens(tokenizer, system + current)} prompt tokens) exceeds the "
            f"context budget of {max_context_tokens} tokens"
        )
    kept = current
    for part in reversed(parts):
        if not fits(system + part + kept):
            break
        kept = part + kept
    return system + kept


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


# --------------------------------------------------------------------------- stop strings


def cut_at_stop(text: str, stop: Sequence[str] = STOP_STRINGS) -> tuple[str, str | None]:
    """(text before the first stop string, that stop string or None)."""
    first, which = len(text), None
    for s in stop:
        i = text.find(s)
        if 0 <= i < first:
            first, which = i, s
    return text[:first], which


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string (not shown until we know)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest


def clean_reply(text: str) -> str:
    """The reply as shown and stored: cut at the first stop string, surrounding whitespace removed."""
    return cut_at_stop(text)[0].strip()


# --------------------------------------------------------------------------- loading


def check_adapter_dir(path: Path) -> Path:
    """An adapter folder must hold adapter_config.json and adapter_model.safetensors (pickles are refused)."""
    if not path.is_dir():
        raise BaizeError(f"{path}: adapter folder not found")
    if not (path / "adapter_config.json").is_file():
        raise BaizeError(f"{path}: no adapter_config.json (not a PEFT adapter folder)")
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").exists():
            raise BaizeError(f"{path}: adapter_model.bin is a pickle and is never loaded; save it as safetensors")
        raise BaizeError(f"{path}: no adapter_model.safetensors")
    return path


MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def resolve_adapter(spec: str | Path, dst: Path | None = None) -> Path:
    """A local adapter folder, or an MLflow `runs:/<id>/<path>` / `models:/<name>/<version>` /
    `models:/<name>@<alias>` URI (the registry's `@champion`, see baize.registry).

    MLflow URIs are downloaded with `mlflow.artifacts.download_artifacts` (tracking store from
    MLFLOW_TRACKING_URI); the adapter is the shallowest folder in the download holding adapter_config.json.
    """
    text = str(spec)
    if not text.startswith(MLFLOW_SCHEMES):
        return check_adapter_dir(Path(text))
    import mlflow

    try:
        # The store named by MLFLOW_TRACKING_URI now, not one an earlier call in this process made the default.
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst) if dst else None,
                                                         tracking_uri=uri, registry_uri=uri))
    except Exception as exc:  # MlflowException, OSError: one line naming the URI
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BaizeError(f"{text}: cannot download the adapter from MLflow: {first}") from None
    candidates = sorted(local.rglob("adapter_config.json"), key=lambda p: len(p.parts))
    if local.is_file() or not candidates:
        raise BaizeError(f"{text}: the downloaded artifacts hold no adapter_config.json")
    return check_adapter_dir(candidates[0].parent)


def load_tokenizer(base: Path, adapter: Path | None = None):
    """The adapter's tokenizer when it ships one (it carries the Baize chat template), else the base's."""
    from transformers import AutoTokenizer

    source = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base
    tok = AutoTokenizer.from_pretrained(str(source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


ADAPTER_META = "baize_adapter.json"
STACK_NAME = "sft"
"""PEFT adapter name, and subfolder of a saved stacked adapter, of the frozen first LoRA under an SDF one."""
STACKED_ON = "stacked_on"
"""Key of baize_adapter.json naming the subfolder that holds the frozen first adapter of a stacked (Baize v2) one."""


def stacked_on(adapter_dir: Path) -> str | None:
    """The subfolder name of the first adapter a stacked (SDF) adapter folder carries, or None for a plain one.

    Layout (PEFT's own for several adapters): the folder's root is the second LoRA (`default`), `<name>/` the
    first; both are applied together: h = W0 x + B1 A1 x + B2 A2 x.
    """
    import json

    meta = Path(adapter_dir) / ADAPTER_META
    if not meta.is_file():
        return None
    try:
        name = json.loads(meta.read_text(encoding="utf-8")).get(STACKED_ON)
    except (json.JSONDecodeError, AttributeError):
        raise BaizeError(f"{meta}: not a JSON object") from None
    if name is None:
        return None
    if not isinstance(name, str) or not name or "/" in name or name in (".", "..", "default"):
        raise BaizeError(f"{meta}: {STACKED_ON} = {name!r}: expected the name of a subfolder")
    check_adapter_dir(Path(adapter_dir) / name)
    return name


def attach_adapter(model, adapter_dir: Path):
    """`model` (a plain transformers model) with the adapter folder on top, frozen: a `PeftModel`.

    A stacked folder (`stacked_on`) loads both LoRAs and activates both; `set_active(model, [...])` switches.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    first = stacked_on(adapter_dir)
    if first is not None:
        model.load_adapter(str(Path(adapter_dir) / first), adapter_name=first, is_trainable=False)
        model.base_model.set_adapter([first, "default"], inference_mode=True)
    return model


def set_active(model, names: list[str]) -> None:
    """Make exactly `names` the active adapters of a PeftModel (frozen): e.g. the first one alone is v1.5."""
    model.base_model.set_adapter(list(names), inference_mode=True)


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 of the adapter's weights (both LoRAs of a stacked folder): its identity in journal keys."""
    import hashlib

    digest = hashlib.sha256()
    first = stacked_on(adapter_dir)
    folders = [Path(adapter_dir)] + ([Path(adapter_dir) / first] if first else [])
    for folder in folders:
        with (folder / "adapter_model.safetensors").open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_model(base: str | Path, adapter: str | Path | None = None, dtype: str = "float32"):
    """(model, tokenizer): the base in `dtype` (safetensors only, no remote code), with the adapter on top if given.

    On the device `baize.hardware` picks (a GPU when there is one; `dtype` `auto`: the one that suits it), loaded
    straight onto it (several GPUs through `device_map="auto"` when it does not fit one).

    With an adapter the model is a `PeftModel`: `with model.disable_adapter():` gives the base model back
    without loading it twice (the evaluation compares both in one run this way). A stacked (SDF, Baize v2)
    adapter folder loads both of its LoRAs, both active (see `attach_adapter`).
    """
    from transformers import AutoModelForCausalLM

    base = Path(base)
    if not (base / "config.json").is_file():
        raise BaizeError(f"{base}: no config.json (expected a Hugging Face model folder, e.g. models/base)")
    from baize import hardware  # (torch: imported once a model is needed, not by every `baize` command)

    adapter_dir = resolve_adapter(adapter) if adapter is not None else None
    hardware.check_remote_code(base)
    model = AutoModelForCausalLM.from_pretrained(
        str(base), use_safetensors=True, trust_remote_code=False, **hardware.placement(dtype, base).load_kwargs()
    )
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    model.eval()
    return model, load_tokenizer(base, adapter_dir)


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Generation:
    """One reply: the cleaned text, why it ended (`stop`: a stop string, `eos`, `length`), the raw decode."""

    text: str
    finish_reason: str
    stop_string: str | None
    num_tokens: int
    raw: str

    @property
    def stopped(self) -> bool:
        """Ended by itself (stop string or EOS) rather than at the token limit."""
        return self.finish_reason in ("stop", "eos")


def _sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    if temperature <= 0:  # temperature 0 means greedy, as in the OpenAI API
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 42,
    stop: Sequence[str] = STOP_STRINGS,
    progress: Any = None,
) -> list[Generation]:
    """Replies to `prompts`, `batch_size` at a time (left padding), ending at the stop strings.

    Each batch is seeded with `seed + batch index`, so the same prompts get the same random stream whatever
    model answers them (base and adapter are compared on equal footing) and a re-run reproduces the samples.
    """
    import torch
    from transformers import set_seed

    from baize import hardware

    tokenizer.padding_side = "left"  # decoder-only batching: the prompt must end where generation starts
    eos = _eos_ids(model, tokenizer)
    out: list[Generation] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = list(prompts[start : start + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(hardware.input_device(model))
        set_seed(seed + b)
        with torch.no_grad():
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                stop_strings=list(stop),
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
                **_sampling_kwargs(temperature, top_p),
            )
        for row in ids[:, enc["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), None)
            raw = tokenizer.decode(row[:end] if end is not None else row, skip_special_tokens=True)
            before, which = cut_at_stop(raw, stop)
            reason = "stop" if which else ("eos" if end is not None else "length")
            text = before.strip()
            out.append(Generation(text, reason, which, count_tokens(tokenizer, text) if text else 0, raw))
        if progress is not None:
            progress(len(batch))
    return out


def stream_reply(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int | None = None,
    stop: Sequence[str] = STOP_STRINGS,
) -> Iterator[str]:
    """Yield the reply piece by piece as it is generated, never showing (a prefix of) a stop string.

    Generation runs in a thread feeding a `TextIteratorStreamer`; text that might be the start of a stop
    string is held back until the next piece decides it.
    """
    import torch
    from transformers import TextIteratorStreamer, set_seed

    from baize import hardware

    enc = tokenizer(prompt, return_tensors="pt").to(hardware.input_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    if seed is not None:
        set_seed(seed)
    kwargs = dict(
        **enc,
        max_new_tokens=max_new_tokens,
        stop_strings=list(stop),
        tokenizer=tokenizer,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **_sampling_kwargs(temperature, top_p),
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            streamer.on_finalized_text("", stream_end=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text, shown, ended = "", 0, False
    for piece in streamer:
        if ended:
            continue  # drain, so the generating thread can finish
        text += piece
        body = text.lstrip()  # the reply starts right after "[|AI|]": no leading whitespace
        before, which = cut_at_stop(body, stop)
        # Trailing whitespace waits too: it is shown once more text follows (a reply never ends in it).
        visible = (before if which else body[: len(body) - _held_back(body, stop)]).rstrip()
        if len(visible) > shown:
            yield visible[shown:]
            shown = len(visible)
        ended = which is not None
    if not ended:
        rest = text.lstrip().rstrip()[shown:]
        if rest:
            yield rest
    thread.join()
    if errors:
        raise errors[0]


_ROLE_LEAK = re.compile(
    r"(^|\n)\s*(#+\s*)?(\[\|?\s*(human|ai|user|assistant)\s*\|?\]|(human|user|assistant|ai)\s*:|<\|im_start\|>)",
    re.IGNORECASE,
)


def has_role_leak(generation: Generation) -> bool:
    """The reply speaks for another turn: it ended on `[|AI|]` (a second AI turn with no human between), or a
    line of it starts with a role label (`Human:`, `[Human]`, `User:`, `### Assistant`, `<|im_start|>`, ...).

    Ending on `[|Human|]` is not a leak: that is how a Baize model hands the turn back.
    """
    if generation.stop_string == AI:
        return True
    return bool(_ROLE_LEAK.search(generation.text))
