"""The `local` backend: the model in `models/base/` in-process, batched across seeds with continuous batching.

The engine keeps many `complete()` coroutines in flight (one per seed). Each request is rendered with the
tokenizer's chat template and queued; one worker thread runs a decode loop over up to `batch_size` sequences that
share one left-padded KV cache (`DynamicCache`). Per decode step every live sequence gets one token, sampled with
its own temperature / top_p / generator; a sequence that hits EOS, one of its stop strings or its `max_tokens`
leaves the batch at once (its cache rows are dropped) and its future resolves. Waiting requests are prefilled in a
small group and their cache rows merged into the running batch (re-aligned by left padding), so a finished
sequence never holds a slot while others run on: the self-chat workload has very uneven answer lengths (a human
turn often stops after a few tokens at `[AI]`), and fixed batches would spend most steps on padding.

Why our own loop and not transformers' `generate_batch` / `ContinuousBatchingManager`: it targets GPUs (paged
attention, CUDA graphs; on a CPU its paged cache takes 90% of the free RAM unless sized) and it has no stop strings,
so a human turn runs on past its stop. benchmarks/selfchat_local.py measures this backend beside it (on the same
workload, dtype and threads), beside one-at-a-time `generate`, and beside `transformers serve` with and without
`--continuous-batching`.

Prompt prefixes are reused: the KV of recent prompts is kept (up to `prefix_cache_tokens`), and a new prompt is
prefilled only from where it departs from the closest one (the chat template's system prompt, the paper's template,
and in turn-by-turn mode the previous round's whole prompt are shared).

Positions are tracked per row (RoPE uses each row's own token count), so extra left padding from merging changes
nothing but masked-out zeros: greedy output equals one-at-a-time `model.generate` (tested).

Beyond chat messages: a request with `prompt` is a raw text prompt (no chat template: the Baize inference prompt),
and one with `choices` is decoded under a constraint: at each step only tokens that continue one of the allowed
strings (as the tokenizer spells it) can be sampled, and the reply ends when one is complete. That is how a 135M
judge always returns a parseable score. With `adapter`, the backend serves base + LoRA (a stacked SDF folder too),
merged into the weights. With `adapters` it serves several models over one base in the same batch, as vLLM serves
LoRAs: a request whose `model` names an adapter gets it, any other gets the base (the LoRAs stay unmerged and each
row's own is applied: baize.selfchat.multi_lora), so the evaluation answers with base, v1.5 and v2 in one batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from baize.errors import BaizeError, ParamsError
from baize import hardware
from baize.selfchat.backend import BackendError, ChatRequest, Completion
from baize.selfchat.multi_lora import BASE, MultiLoRA

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> str:
    """`auto`: what this machine computes natively (`baize.hardware.resolve_dtype`: bf16 on GPUs that have it,
    on the CPU bfloat16 only with native bf16 matmuls, else float32); other names are checked and kept."""
    if dtype not in (*DTYPES, "auto"):
        raise ParamsError(f"local backend dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return hardware.resolve_dtype(dtype)


def model_identity(model_dir: str | Path, dtype: str) -> str:
    """`local:<hash of the model's files>:<dtype>`: the `model` of a local request, so a different base model, or
    the same one computing in another dtype (greedy text differs with the rounding), never reuses journaled
    replies. The self-chat stage and the local LLM judge both key their journals by it."""
    return f"{_files_id(Path(model_dir))}:{resolve_dtype(dtype)}"


def _files_id(model_dir: Path) -> str:
    source = model_dir / "source.json"
    if source.is_file():
        files = json.loads(source.read_text(encoding="utf-8")).get("files") or {}
        if files:
            digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            return f"local:{digest[:16]}"
    digest = hashlib.sha256()
    for p in sorted(model_dir.glob("*")):
        if p.is_file() and p.suffix in {".safetensors", ".json"}:
            digest.update(p.name.encode())
            digest.update(p.read_bytes())
    return f"local:{digest.hexdigest()[:16]}"


NUCLEUS_CANDIDATES = 256
"""Top tokens sorted per decode step for top-p sampling (the whole vocabulary when their mass is below top_p)."""


@dataclass
class LocalStats:
    """Where the worker's time went: prompt prefill vs batched decode steps (and how full the batch was)."""

    requests: int = 0
    prefill_tokens: int = 0  # prompt tokens computed
    reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # rows x steps: the mean batch fill is decode_tokens / decode_steps
    decode_s: float = 0.0


class ContextLengthError(BackendError):
    """The rendered prompt leaves no room to generate within `max_context`: this seed fails, the run goes on."""

    reason = "context_length"


@dataclass
class _Job:
    """One queued or running request and its place in the batch."""

    prompt_ids: list[int]
    max_new: int  # max_tokens, cut to what fits in max_context
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator | None  # None: greedy
    future: concurrent.futures.Future
    generated: list[int] = field(default_factory=list)
    next_pos: int = 0  # RoPE position of the next token fed for this row (= real tokens so far)
    scanned: int = 0  # characters of decoded text already searched for stop strings
    node: dict | None = None  # `choices` requests: the trie node of the tokens so far ({} = a whole choice)
    top_logprobs: int = 0  # > 0: keep the k most likely tokens of each step (after the constraint) in `logprobs`
    logprobs: list[dict[str, float]] = field(default_factory=list)
    adapter: str = BASE  # the served adapter of this row (with `adapters`): BASE is the base model
    abandoned: bool = False  # the caller was cancelled: a running future cannot be, so the worker drops the row

    def gone(self) -> bool:
        return self.abandoned or self.future.cancelled()


class LocalBackend:
    """`complete(ChatRequest) -> Completion` with a local Hugging Face causal LM (see the module docstring).

    `model_dir`: a plain HF folder (safetensors, tokenizer with a chat template, config).
    `batch_size`: sequences decoded together. `dtype`: `auto` (default: bfloat16 on CPUs with native bf16
    matmuls, where it decoded a 16-row batch 1.7x faster than float32 here; else float32), float32, bfloat16,
    float16. Greedy float32 output equals one-at-a-time `generate`; in bf16 the rounding, and so now and then a
    token, depends on which requests share the batch. `max_context`: prompt + completion tokens per sequence (default: the model's
    max_position_embeddings). `seed`: mixed into each request's sampling generator, so a request's sampled text is
    reproducible for a given seed (exact across runs with the same batch composition; batching can change float
    rounding and so, rarely, a sampled token). `admit_min`: the fewest free slots worth a prefill while others are
    decoding (a prefill pauses the whole batch; admitting in small groups amortizes it); default batch_size // 4.
    `prefix_cache_mb`: memory for the KV of recent prompts kept for reuse (`prefix_cache_tokens` instead: a token
    count; 0: off). Self-chat prompts share long
    prefixes (the chat template's system prompt and the paper's template; each round's prompt starts with the
    previous round's), so a new prompt is prefilled only from where it departs from the closest kept one.
    `adapter`: a LoRA adapter folder (plain or stacked) served on top of the base. It is merged into the weights
    in float32 (W = W0 + s B A per target module, then cast to `dtype`): numerically the same function as the
    unmerged base + LoRA in float32 (up to float rounding), without the LoRA matmuls at every decode step.
    `adapters`: {model name: adapter folder} served unmerged side by side, in `dtype` (baize.selfchat.multi_lora:
    a forward whose rows all use the base runs the base alone; a stacked folder is one LoRA of both ranks).
    """

    name = "local"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 16,
        dtype: str = "auto",
        max_context: int | None = None,
        seed: int = 0,
        admit_min: int | None = None,
        model_name: str | None = None,
        prefix_cache_tokens: int | None = None,
        prefix_cache_mb: float = 1024,
        adapter: str | Path | None = None,
        adapters: dict[str, str | Path] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ParamsError(f"local backend batch_size: {batch_size} must be >= 1")
        self.dtype = dtype = resolve_dtype(dtype)
        model_dir = Path(model_dir)
        # The device (and device_map for a model larger than one GPU) every tensor of the decode loop goes to.
        self.placement = hardware.placement(dtype, model_dir)
        self.device = self.placement.input_device
        if not (model_dir / "config.json").is_file():
            raise BaizeError(
                f"{model_dir}: no model folder with a config.json; materialize the base model first "
                "(`dvc repro base_model`)"
            )
        if not any(model_dir.glob("*.safetensors")):
            raise BaizeError(f"{model_dir}: no .safetensors weights (pickle checkpoints are never loaded)")

        from transformers import AutoModelForCausalLM, AutoTokenizer

        hardware.check_remote_code(model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_dir,
                dtype=torch.float32 if adapter is not None else DTYPES[dtype],  # merged in fp32
                use_safetensors=True,
                local_files_only=True,
                device_map=self.placement.device_map,  # None on the CPU: loaded as before
            ).eval()
        except (OSError, ValueError) as exc:
            raise BaizeError(f"{model_dir}: cannot load the model: {str(exc).splitlines()[0]}") from exc
        if adapter is not None:
            from baize.inference import attach_adapter, check_adapter_dir

            peft_model = attach_adapter(self.model, check_adapter_dir(Path(adapter)))
            self.model = peft_model.merge_and_unload().to(DTYPES[dtype]).eval()
        self.loras: MultiLoRA | None = None  # the adapters served by name (unmerged)
        if adapters:
            if adapter is not None:
                raise ParamsError("local backend: `adapter` (merged) and `adapters` (served by name) exclude each other")
            self.loras = self._attach_named(adapters)
            self.model = self.loras.model.eval()
        if not self.tokenizer.chat_template:
            raise BaizeError(f"{model_dir}: the tokenizer has no chat template; the local backend needs one")

        self.batch_size = batch_size
        self.max_context = max_context or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.seed = seed
        self.admit_min = max(1, admit_min if admit_min is not None else batch_size // 4)
        self.model_name = model_name or model_dir.resolve().name
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.stats = LocalStats()
        if prefix_cache_tokens is None:
            prefix_cache_tokens = int(prefix_cache_mb * 2**20 // max(1, self.kv_bytes_per_token()))
        self._prefixes = _PrefixStore(prefix_cache_tokens)
        self._tries: dict[tuple[str, ...], dict] = {}

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token occupies in the cache (every layer), in the model's dtype."""
        config = self.model.config
        get = getattr(config, "get_text_config", None)
        config = get() if get else config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim * next(self.model.parameters()).element_size()

    def _attach_named(self, adapters: dict[str, str | Path]) -> MultiLoRA:
        """One LoRA per served name over the base, unmerged (a stacked folder: its two LoRAs as one)."""
        from baize.inference import check_adapter_dir, stacked_on

        folders = {}
        for name, folder in adapters.items():
            folder = check_adapter_dir(Path(folder))
            first = stacked_on(folder)
            folders[name] = [folder] if first is None else [check_adapter_dir(folder / first), folder]
        return MultiLoRA(self.model, folders)

    # ---- public API -------------------------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        job = self._make_job(request)
        self._submit(job)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            # A queued job's future is cancelled outright; a running one's cannot be (concurrent.futures), so it is
            # marked: the worker drops its row at the next step and the slot goes to a waiting request, instead of
            # generating up to max_tokens for nobody (a stopped run, a seed given up on).
            job.abandoned = True
            job.future.cancel()
            raise

    def complete_sync(self, request: ChatRequest) -> Completion:
        """Blocking variant for scripts and tests outside an event loop."""
        job = self._make_job(request)
        self._submit(job)
        return job.future.result()

    def close(self) -> None:
        """Stop the worker thread (pending requests fail with a BaizeError). Safe to call twice."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._inbox.put(None)
            thread.join()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> LocalBackend:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def encode(self, request: ChatRequest) -> list[int]:
        """The prompt token ids of a request: its raw `prompt` as is, else its `messages` through the chat template."""
        if request.prompt is not None:
            # As `inference.generate` tokenizes the Baize prompt: the tokenizer's own special tokens (BOS if any).
            return list(self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
        return self.render(request.messages)

    def render(self, messages: list[dict]) -> list[int]:
        """The prompt token ids: the chat template with the generation prompt (what one-at-a-time would feed)."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    # ---- request intake ---------------------------------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            for i in source if isinstance(source, list) else [source]:
                if i is not None and i not in ids:
                    ids.append(int(i))
        if not ids:
            raise BaizeError("the local model defines no EOS token (generation_config.eos_token_id)")
        return ids

    def _make_job(self, request: ChatRequest) -> _Job:
        prompt_ids = self.encode(request)
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(
                f"prompt has {len(prompt_ids)} tokens; local backend max_context is {self.max_context}"
            )
        generator = None
        if request.temperature > 0:
            # A generator per request, seeded from the request itself: reruns sample the same text.
            fields = [self.seed, request.messages, request.temperature, request.top_p, request.max_tokens, request.stop]
            if request.seed is not None:  # appended only when set: earlier requests sample as they did
                fields.append(request.seed)
            if request.prompt is not None or request.choices is not None:
                fields.append({"prompt": request.prompt, "choices": request.choices})
            payload = json.dumps(fields, sort_keys=True, ensure_ascii=False)
            seed = int(hashlib.sha256(payload.encode()).hexdigest()[:15], 16)
            generator = torch.Generator(device=self.device).manual_seed(seed)  # where the logits are sampled
        return _Job(
            prompt_ids=prompt_ids,
            max_new=min(request.max_tokens, room),
            temperature=float(request.temperature),
            top_p=float(request.top_p),
            stop=[s for s in (request.stop or []) if s],
            generator=generator,
            future=concurrent.futures.Future(),
            node=self._choice_trie(request.choices) if request.choices is not None else None,
            top_logprobs=int(request.top_logprobs or 0),
            adapter=request.model if self.loras and request.model in self.loras.names else BASE,
        )

    def _choice_trie(self, choices: list[str]) -> dict:
        """A token trie of the allowed replies (`{token: subtree}`, `{}` = a whole reply); built once per set."""
        key = tuple(choices)
        if key not in self._tries:
            if not choices:
                raise ParamsError("local backend: `choices` is empty")
            root: dict = {}
            ends = []
            for text in choices:
                node = root
                for token in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
                    node = node.setdefault(token, {})
                ends.append((text, node))
            # A reply ends as soon as it spells a whole choice, so no choice may continue another.
            for text, node in ends:
                if node or node is root:
                    raise ParamsError(f"local backend: choice {text!r} is empty or a prefix of another choice")
            self._tries[key] = root
        return self._tries[key]

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise BaizeError("local backend is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="baize-local-backend", daemon=True)
                self._thread.start()
            self._inbox.put(job)

    # ---- the worker: continuous batching over one DynamicCache -----------------------------------------------

    def _run(self) -> None:
        waiting: deque[_Job] = deque()
        rows: list[_Job] = []  # live sequences, in cache row order
        state: dict = {}  # "cache" (DynamicCache) and "mask" (rows x cache length) while rows are live
        stopping = False
        while True:
            # Collect new requests; block only when there is nothing to decode.
            try:
                while True:
                    item = self._inbox.get(block=not rows and not waiting and not stopping)
                    if item is None:
                        stopping = True
                    else:
                        waiting.append(item)
                    if stopping:
                        break
            except queue.Empty:
                pass
            if stopping:
                self._fail([*rows, *waiting], BaizeError("local backend closed before the request finished"))
                while True:  # requests that raced in after the stop
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        return
                    if item is not None:
                        self._fail([item], BaizeError("local backend is closed"))
            group: list[_Job] = []
            try:
                free = self.batch_size - len(rows)
                if waiting and free > 0 and (not rows or free >= min(self.admit_min, len(waiting))):
                    while waiting and len(group) < free:
                        job = waiting.popleft()
                        if not job.abandoned and job.future.set_running_or_notify_cancel():  # else: the caller went away
                            group.append(job)
                    if group:
                        self._admit(group, rows, state)
                if rows:
                    self._step(rows, state)
            except Exception as exc:  # a model error fails the requests in flight, not the worker
                # (group: an admission that failed half-way has its jobs in neither list)
                self._fail(rows + group, BackendError(f"local generation failed: {exc!r}"))
                rows.clear()
                state.clear()

    @torch.inference_mode()
    def _admit(self, group: list[_Job], rows: list[_Job], state: dict) -> None:
        """Prefill each prompt of `group`, sample its first token, and merge its cache rows into the batch.

        One prompt per forward: prefill is compute-bound on a CPU, so batching prompts gains little while padding
        a 40-token answer prompt to a 160-token human-turn prompt would waste most of the work.
        """
        started = time.perf_counter()
        caches, masks, logits = [], [], []
        for job in group:
            reused, prefix = self._prefixes.lookup(job.prompt_ids, job.adapter)  # KV depends on the adapter
            ids = torch.tensor([job.prompt_ids[reused:]], dtype=torch.long, device=self.device)
            with self._rows([job]):
                out = self.model(
                    input_ids=ids,
                    attention_mask=torch.ones((1, len(job.prompt_ids)), dtype=torch.long, device=self.device),
                    position_ids=torch.arange(reused, len(job.prompt_ids), device=self.device).unsqueeze(0),
                    cache=prefix,
                    use_cache=True,
                    logits_to_keep=1,
                )
            self.stats.prefill_tokens += len(job.prompt_ids) - reused
            self.stats.reused_tokens += reused
            self._prefixes.add(job.prompt_ids, out.cache, job.adapter)
            job.next_pos = len(job.prompt_ids)
            caches.append(out.cache)
            masks.append(torch.ones((1, len(job.prompt_ids)), dtype=torch.long, device=self.device))
            logits.append(out.logits[:, -1, :])
        if rows:
            caches.insert(0, state["cache"])
            masks.insert(0, state["mask"])
        state["cache"], state["mask"] = _merge(caches, masks)
        rows.extend(group)
        self._advance(torch.cat(logits), rows, state, only_from=len(rows) - len(group))
        self.stats.requests += len(group)
        self.stats.prefill_s += time.perf_counter() - started

    @torch.inference_mode()
    def _step(self, rows: list[_Job], state: dict) -> None:
        """One decode step: feed every live row its last token."""
        started = time.perf_counter()
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(rows)
        ids = torch.tensor([[job.generated[-1]] for job in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[job.next_pos] for job in rows], dtype=torch.long, device=self.device)
        ones = torch.ones((len(rows), 1), dtype=torch.long, device=self.device)
        state["mask"] = torch.cat([state["mask"], ones], dim=1)
        with self._rows(rows):
            out = self.model(
                input_ids=ids,
                attention_mask=state["mask"],
                position_ids=positions,
                cache=state["cache"],
                use_cache=True,
                logits_to_keep=1,
            )
        state["cache"] = out.cache
        for job in rows:
            job.next_pos += 1
        self._advance(out.logits[:, -1, :], rows, state, only_from=0)
        self.stats.decode_s += time.perf_counter() - started

    def _rows(self, jobs: list[_Job]):
        """Each row's own adapter during the forward that follows (nothing to choose without `adapters`)."""
        return self.loras.rows([job.adapter for job in jobs]) if self.loras else contextlib.nullcontext()

    def _advance(self, logits: torch.Tensor, rows: list[_Job], state: dict, only_from: int) -> None:
        """Sample one token for rows[only_from:], finish the ones that are done, and drop them from the batch."""
        # On the device of the generators (the first GPU when a model is spread over several).
        logits = _constrain(logits.float().to(self.device), rows[only_from:])
        tokens = _sample(logits, rows[only_from:])
        for offset, job in enumerate(rows[only_from:]):
            if job.top_logprobs:  # of the model's distribution (temperature 1), over the allowed tokens
                values, ids = logits[offset].log_softmax(-1).topk(job.top_logprobs)
                job.logprobs.append({self.tokenizer.decode([int(i)]): float(v)
                                     for v, i in zip(values, ids, strict=True) if v > float("-inf")})
        finished: list[int] = []
        for offset, token in enumerate(tokens):
            index = only_from + offset
            job = rows[index]
            job.generated.append(token)
            if job.node is not None:
                job.node = job.node[token]
            result = self._finish_if_done(job)
            if result is not None or job.gone():
                finished.append(index)
                if result is not None and not job.future.done():
                    job.future.set_result(result)
        # Rows whose caller gave up are dropped too.
        finished += [i for i, job in enumerate(rows[:only_from]) if job.gone()]
        if finished:
            keep = [i for i in range(len(rows)) if i not in set(finished)]
            rows[:] = [rows[i] for i in keep]
            if not rows:
                state.clear()
                return
            index = torch.tensor(keep, dtype=torch.long)  # a CPU index selects rows of tensors on any device
            state["cache"].batch_select_indices(index)
            state["mask"] = state["mask"][index]
            # Columns that are padding in every remaining row are dead weight for every later step.
            live = state["mask"].any(dim=0).nonzero()
            start = int(live[0]) if len(live) else 0
            if start > 0:
                state["mask"] = state["mask"][:, start:]
                for layer in state["cache"].layers:
                    if isinstance(layer, _GrowableLayer):
                        layer.drop_left(start)
                    else:
                        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _finish_if_done(self, job: _Job) -> Completion | None:
        """The Completion when `job` just ended (a whole choice, EOS, a stop string, max_tokens), else None."""
        if job.node is not None and not job.node:
            return self._completion(job, job.generated, "stop")
        if job.generated[-1] in self.eos_ids:
            return self._completion(job, job.generated[:-1], "stop")
        if job.stop:
            text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
            # Only the new tail (plus room for a stop string that straddles tokens) needs searching.
            start = max(0, job.scanned - max(len(s) for s in job.stop))
            hits = [i for i in (text.find(s, start) for s in job.stop) if i >= 0]
            job.scanned = len(text)
            if hits:
                return self._completion(job, job.generated, "stop", cut=min(hits))
        if len(job.generated) >= job.max_new:
            return self._completion(job, job.generated, "length")
        return None

    def _completion(self, job: _Job, ids: list[int], reason: str, cut: int | None = None) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        which = None
        if cut is not None:
            which = next((s for s in job.stop if text.startswith(s, cut)), None)
            text = text[:cut]
        return Completion(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(job.generated),  # every token generated, the one that ended it included
            model=self.model_name if job.adapter == BASE else job.adapter,  # the served name, as vLLM reports it
            top_logprobs=job.logprobs if job.top_logprobs else None,
            stop_string=which,
        )

    @staticmethod
    def _fail(jobs: list[_Job], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)


class _PrefixStore:
    """Recently prefilled prompts' KV (batch 1, per layer), least recently used dropped past `max_tokens`."""

    MIN_REUSE = 8  # shorter shared prefixes are not worth a cache copy

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        # (adapter, prompt ids) -> per-layer KV: a prompt's KV under one adapter is not another's
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.tokens = 0

    def lookup(self, ids: list[int], adapter: str = BASE) -> tuple[int, DynamicCache | None]:
        """(tokens reused, a cache holding their KV) for the kept prompt sharing the longest prefix with `ids`."""
        best, best_key = 0, None
        for key in self.entries:
            if key[0] != adapter:
                continue
            n = _common_prefix(key[1], ids)
            if n > best:
                best, best_key = n, key
        best = min(best, len(ids) - 1)  # at least one token must run, for its logits
        if best_key is None or best < self.MIN_REUSE:
            return 0, None
        self.entries.move_to_end(best_key)
        kv = self.entries[best_key]
        return best, DynamicCache(ddp_cache_data=[(k[:, :, :best], v[:, :, :best]) for k, v in kv])

    def add(self, ids: list[int], cache, adapter: str = BASE) -> None:
        if self.max_tokens <= 0 or len(ids) > self.max_tokens:
            return
        if any(type(layer) is not DynamicLayer for layer in cache.layers):  # sliding windows: KV is not a prefix
            return
        key = (adapter, tuple(ids))
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.entries[key] = [(layer.keys, layer.values) for layer in cache.layers]
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            (_, old), _ = self.entries.popitem(last=False)
            self.tokens -= len(old)


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == tuple(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] holds, a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _GrowableLayer(DynamicLayer):
    """A cache layer over a buffer with room to grow: a decode step writes its token in place.

    `DynamicLayer.update` concatenates the whole cache with the new token, i.e. copies every layer's keys and
    values once per step: at batch 16 that was a third of a decode step's time on this CPU (profiled). Here the
    copy happens only when the room runs out (then `ROOM` more tokens are reserved), and dropping dead left
    columns moves a start offset instead of copying. `keys`/`values` are views of the live part.
    """

    ROOM = 64

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.is_initialized = True
        self.device = keys.device
        self._reserve(keys, values)

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, n, d = keys.shape
        self._k = keys.new_empty((b, h, n + self.ROOM, d))
        self._v = values.new_empty((b, h, n + self.ROOM, values.shape[-1]))
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._start, self._end = 0, n
        self._view()

    def _view(self) -> None:
        self.keys = self._k[:, :, self._start : self._end]
        self.values = self._v[:, :, self._start : self._end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self._end + new > self._k.shape[2]:
            self._reserve(self.keys, self.values)
        self._k[:, :, self._end : self._end + new] = key_states
        self._v[:, :, self._end : self._end + new] = value_states
        self._end += new
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._view()

    def drop_left(self, columns: int) -> None:
        self._start += columns
        self._view()


def _merge(caches: list, masks: list[torch.Tensor]) -> tuple:
    """Stack several caches' rows into the first one, right-aligning them (left padding) to the longest."""
    length = max(m.shape[1] for m in masks)
    target = caches[0]
    for i, layer in enumerate(target.layers):
        keys = torch.cat([_pad_left(c.layers[i].keys, length, 2) for c in caches])
        values = torch.cat([_pad_left(c.layers[i].values, length, 2) for c in caches])
        if isinstance(layer, _GrowableLayer) or type(layer) is DynamicLayer:
            target.layers[i] = _GrowableLayer(keys, values)
        else:  # sliding-window and other layer kinds keep their own update rules
            layer.keys, layer.values = keys, values
    return target, torch.cat([_pad_left(m, length, 1) for m in masks])


def _constrain(logits: torch.Tensor, jobs: list[_Job]) -> torch.Tensor:
    """Logits with every token that does not continue an allowed choice set to -inf (rows with `choices`)."""
    constrained = [i for i, job in enumerate(jobs) if job.node is not None]
    if not constrained:
        return logits
    logits = logits.clone()
    for i in constrained:
        allowed = torch.tensor(list(jobs[i].node), dtype=torch.long, device=logits.device)
        row = torch.full_like(logits[i], float("-inf"))
        row[allowed] = logits[i, allowed]
        logits[i] = row
    return logits


def _sample(logits: torch.Tensor, jobs: list[_Job]) -> list[int]:
    """One token per row: argmax for temperature 0, else temperature + top-p with the row's own generator."""
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, job in enumerate(jobs) if job.generator is not None]
    if not sampled:
        return tokens
    index = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([jobs[i].temperature for i in sampled], device=logits.device).unsqueeze(1)
    top_p = torch.tensor([jobs[i].top_p for i in sampled], device=logits.device).unsqueeze(1)
    probs = (logits[index] / temps).softmax(dim=-1)
    # The nucleus (the smallest set of most likely tokens whose mass reaches top_p) nearly always lies within the
    # top few hundred of a 49k vocabulary: sorting only those (exact whenever their mass reaches top_p, else the
    # whole row) took a fifth of each decode step off, with the sort and the draw over the full vocabulary.
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    probs, order = probs.topk(k, dim=-1)
    short = (probs.sum(dim=-1, keepdim=True) < top_p).squeeze(1)
    rows_full = {}
    if short.any():
        full_probs, full_order = (logits[index[short]] / temps[short]).softmax(dim=-1).sort(dim=-1, descending=True)
        rows_full = {int(r): (full_probs[j], full_order[j]) for j, r in enumerate(short.nonzero().flatten())}
    for row, i in enumerate(sampled):
        p, o = rows_full.get(row, (probs[row], order[row]))
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        p = p.masked_fill((p.cumsum(dim=-1) - p) >= top_p[row], 0.0)
        pick = torch.multinomial(p, 1, generator=jobs[i].generator)
        tokens[i] = int(o[pick])
    return tokens
