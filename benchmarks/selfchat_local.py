"""Local self-chat backend throughput on the self-chat workload itself: useful tokens/s, side by side, one run.

    .venv/bin/python benchmarks/selfchat_local.py [--model models/base] [--requests 32] [--concurrency 16]
        [--max-tokens 128] [--baseline-sample 8] [--threads N] [--rounds 2] [--dtype auto]
        [--adapter models/adapter] [--no-adapter] [--no-generate-batch] [--no-serve] [--no-serve-cb]

Workload: real turn-by-turn self-chat requests (baize.selfchat.prompts) over the project's shipped seeds, half
"write the next human turn" (the template + transcript so far, stop `[AI]`), half "answer as the assistant",
with 0-2 earlier rounds (taken from released Baize transcripts in ../shared/fixtures when present), so prompt and
answer lengths vary the way they do in a real run. Greedy decoding, so every variant should write the same text.

Variants, run in the same process/machine, same dtype and torch threads, interleaved (round 2 runs them in
reverse order):
- `local batched`: LocalBackend(batch_size=concurrency), `concurrency` requests in flight, as the engine runs it.
- `local batched, base + LoRA unmerged`: the same engine serving an adapter by name,
  LocalBackend(adapters={"v1.5": ...}), every request's `model` "v1.5" (baize.selfchat.multi_lora: the LoRA
  matmuls at every step, as evaluation runs it; SDF sampling merges). The adapter: `--adapter DIR` (a trained one,
  e.g. models/adapter: its text is another model's), by default a LoRA of the train stage's shape as PEFT
  initializes it (random A, B = 0): the same arithmetic per step as a trained one and the base's text, so the two
  rows do the same work and their rate is the adapter's cost (target: within 15%).
- `... LoRA via PEFT mixed batches`: the same engine and adapter with PEFT's own per-row adapters instead
  (PeftModel, `adapter_names=` per forward), the library a user would otherwise serve LoRAs with.
- `one at a time`: plain `model.generate` per prompt (stop strings, EOS), on an evenly spread sample of the
  requests (a rate, so a sample suffices), with the same model object (same dtype).
- `transformers generate_batch`: transformers' own continuous batching (`model.generate_batch`, its
  ContinuousBatchingManager) on all the requests at once, at most `concurrency` per batch, its own copy of the
  weights in the same dtype. It has no stop strings: human turns run on past `[AI]` to EOS or max_tokens. Its
  paged KV cache is sized for the workload (`cb_num_blocks`), as the `--continuous-batching` server's.
- `transformers serve` and `transformers serve --continuous-batching`: the same folder behind `transformers
  serve` (CPU, same dtype and threads), driven by the project's `openai` backend with the same concurrency;
  each server is started (and warmed up) for its own row and stopped after it.

Useful tokens: the tokens of each reply up to its stop (the re-tokenized reply text plus the one token that ended
it), counted the same way for every variant; tokens generated past a stop are waste, not throughput. The table
has each variant's rate against one-at-a-time and `local batched`'s rate against it; the lines under it give the
issue's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from baize.selfchat.backend import ChatRequest  # noqa: E402
from baize.selfchat.prompts import HUMAN_STOP, ai_turn_messages, human_turn_messages  # noqa: E402
from baize.transcript import Turn  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "baize-original" / "english_records.json"
FALLBACK_ROUNDS = [
    ("Can you explain the basics first?", "Sure. Start small, learn the key terms, and practise before you commit."),
    ("What mistakes should I avoid?", "Rushing, skipping the fundamentals, and relying on a single source."),
]


ADAPTER_ROW = "local batched, base + LoRA unmerged (adapters=)"
PEFT_ROW = "local batched, base + LoRA via PEFT mixed batches (adapter_names=)"
ADAPTER_ROWS = (ADAPTER_ROW, PEFT_ROW)
GENERATE_BATCH_ROW = "transformers generate_batch"


def workload(n: int, max_tokens: int) -> list[ChatRequest]:
    seeds = []
    for name in ("general", "programming", "medical", "finance"):
        lines = (ROOT / "src/baize/seeds/data" / f"{name}.txt").read_text().splitlines()
        seeds.append([s for s in lines if s.strip()])
    seeds = [s for group in zip(*seeds) for s in group]  # interleave the four domains
    conversations = [FALLBACK_ROUNDS]
    if FIXTURE.is_file():
        from baize.formats import parse_training

        conversations = []
        for record in json.loads(FIXTURE.read_text()):
            turns = parse_training(record["input"])[1]
            conversations.append([(h.text, a.text) for h, a in zip(turns[::2], turns[1::2])])
    requests = []
    for i in range(n):
        seed = seeds[i // 2 % len(seeds)]
        rounds = conversations[i % len(conversations)][: (i // 2) % 3]
        turns = [Turn(role=r, text=t) for pair in rounds for r, t in zip(("human", "ai"), pair)]
        if i % 2 == 0:
            messages, stop = human_turn_messages(seed, turns), HUMAN_STOP
        else:
            messages, stop = ai_turn_messages([*turns, Turn(role="human", text=seed)]), None
        requests.append(ChatRequest(messages=messages, model="base", temperature=0.0, top_p=1.0,
                                    max_tokens=max_tokens, stop=stop))
    return requests


def cut(request: ChatRequest, text: str, finish_reason: str) -> tuple[str, str]:
    """`model.generate` and a server may leave the stop string in the text: cut it, as the backend does."""
    for s in request.stop or []:
        if s in text:
            text, finish_reason = text[: text.find(s)], "stop"
    return text, finish_reason


def useful_tokens(tokenizer, request: ChatRequest, text: str, finish_reason: str) -> int:
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    return min(n + (finish_reason == "stop"), request.max_tokens)


async def run_concurrently(backend, requests, concurrency):
    slots = asyncio.Semaphore(concurrency)

    async def one(r):
        async with slots:
            c = await backend.complete(r)
            return c.text, c.finish_reason

    return await asyncio.gather(*(one(r) for r in requests))


def run_local(backend, requests, concurrency):
    return asyncio.run(run_concurrently(backend, requests, concurrency))


CB_PAGE = 256  # tokens per KV block of transformers' continuous batching (ContinuousBatchingConfig.page_size)


def cb_num_blocks(tokenizer, requests, concurrency) -> int:
    """KV blocks for transformers' continuous batching: `concurrency` requests of the longest prompt + max_tokens,
    twice over. Unset, it sizes its paged cache to 90% of the free memory (on a CPU, RAM), so two of them (the
    in-process `generate_batch` and the `--continuous-batching` server) ran the machine out of memory and the
    kernel killed the server. Our backend holds its KV for `concurrency` rows (+ a 1 GB prefix cache)."""
    longest = max(len(tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]) + r.max_tokens for r in requests)
    return 2 * concurrency * -(-longest // CB_PAGE)


def run_generate_batch(model, tokenizer, requests, concurrency, num_blocks=None):
    """transformers' own continuous batching (`generate_batch`, its ContinuousBatchingManager) on the same prompts,
    `concurrency` requests per batch. It has no stop strings: a human turn runs on past `[AI]` to EOS or max_tokens,
    and `cut` + `useful_tokens` count only the tokens up to the stop, as for every variant."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    inputs = [tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"] for r in requests]
    eos = model.generation_config.eos_token_id
    config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in requests), do_sample=False,
                              eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    outputs = model.generate_batch(inputs, generation_config=config, progress_bar=False,
                                   continuous_batching_config=ContinuousBatchingConfig(
                                       max_requests_per_batch=concurrency, page_size=CB_PAGE,
                                       num_blocks=num_blocks or cb_num_blocks(tokenizer, requests, concurrency)))
    out = []
    for r, result in zip(requests, outputs.values()):  # in the order of the inputs
        gen = result.generated_tokens[: r.max_tokens]
        ended = bool(gen) and (gen[-1] in tokenizer.all_special_ids or len(gen) < r.max_tokens)
        out.append((tokenizer.decode(gen, skip_special_tokens=True), "stop" if ended else "length"))
    if len(out) != len(requests):
        raise RuntimeError(f"generate_batch returned {len(out)} of {len(requests)} requests")
    return out


def standin_adapter(model_dir: Path) -> Path:
    """A LoRA of the train stage's shape (r, alpha, target modules) as PEFT initializes it, random A and B = 0,
    saved to a temp folder: the adapter rows' default. Its matmuls are a trained adapter's, its text the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from baize.config import TrainParams

    params = TrainParams()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(base, LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha,
                                            target_modules=list(params.target_modules), task_type="CAUSAL_LM"))
    folder = Path(tempfile.mkdtemp(prefix="bench-adapter-")) / "adapter"
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


class PeftRows:
    """PEFT's mixed-adapter batches behind baize.selfchat.multi_lora.MultiLoRA's interface (`model`, `names`,
    `rows(names)`): the peer row. Each forward gets `adapter_names=` (PeftModel's per-row adapters)."""

    def __init__(self, model, adapters: dict[str, list[Path]]) -> None:
        from peft import PeftModel

        self.names = list(adapters)
        self._keys = {name: f"a{i}" for i, name in enumerate(adapters)}  # PEFT refuses "." in a name (v1.5)
        self._current: list[str] | None = None
        for name, folders in adapters.items():
            if len(folders) != 1:
                raise SystemExit("the PEFT row serves plain (not stacked) adapters")
            key = self._keys[name]
            if isinstance(model, PeftModel):
                model.load_adapter(str(folders[0]), adapter_name=key, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=key, is_trainable=False)
        model.register_forward_pre_hook(self._names, with_kwargs=True)
        self.model = model

    def _names(self, module, args, kwargs):
        return args, {**kwargs, "adapter_names": self._current or None}

    @contextlib.contextmanager
    def rows(self, names: list[str]):
        self._current = [self._keys.get(name, "__base__") for name in names]
        try:
            yield
        finally:
            self._current = None


def peft_backend_class():
    from baize.selfchat.local_backend import LocalBackend

    class PeftBackend(LocalBackend):
        def _attach_named(self, adapters):
            return PeftRows(self.model, {name: [Path(folder)] for name, folder in adapters.items()})

    return PeftBackend


def run_one_at_a_time(model, tokenizer, requests):
    import torch

    out = []
    for r in requests:
        ids = tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
                                 do_sample=False, stop_strings=r.stop, tokenizer=tokenizer)[0, ids.shape[1]:]
        ended = gen[-1].item() in tokenizer.all_special_ids or len(gen) < r.max_tokens
        out.append((tokenizer.decode(gen, skip_special_tokens=True), "stop" if ended else "length"))
    return out


class Server:
    """`transformers serve` on 127.0.0.1, started and stopped by us (terminated by its own pid)."""

    def __init__(self, model_dir: Path, threads: int | None, cb: bool, dtype: str, cb_num_blocks: int | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--dtype", dtype]
        if cb:
            cmd.append("--continuous-batching")
            if cb_num_blocks:  # its paged KV cache, as generate_batch's (see cb_num_blocks)
                cmd += ["--cb-num-blocks", str(cb_num_blocks)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("transformers serve exited:\n" + self.log.read().decode()[-2000:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        self.close()
        raise RuntimeError("transformers serve did not come up in 180 s")

    def tail(self, chars: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_served(base_url, model_dir, requests, concurrency):
    from baize.selfchat.openai_backend import OpenAIBackend

    backend = OpenAIBackend(base_url=base_url, concurrency=concurrency, timeout_s=600, max_retries=0)
    served = [ChatRequest(**{**r.__dict__, "model": str(model_dir)}) for r in requests]
    return asyncio.run(run_concurrently(backend, served, concurrency))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models/base")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--baseline-sample", type=int, default=8, help="requests the one-at-a-time baseline runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every variant (default: torch's)")
    ap.add_argument("--rounds", type=int, default=1, help="2: run the variants again in reverse order")
    ap.add_argument("--dtype", default="auto", help="every variant's dtype (auto: the local backend's choice)")
    ap.add_argument("--no-serve", action="store_true", help="no `transformers serve` rows")
    ap.add_argument("--no-serve-cb", action="store_true", help="no `transformers serve --continuous-batching` row")
    ap.add_argument("--serve-cb", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old commands
    ap.add_argument("--no-generate-batch", action="store_true", help="no transformers `generate_batch` row")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="LoRA folder for the adapter rows (e.g. models/adapter; default: a stand-in with B = 0)")
    ap.add_argument("--no-adapter", action="store_true", help="no adapter (base + LoRA, unmerged) rows")
    ap.add_argument("--no-peft", action="store_true", help="no PEFT mixed-batches adapter row")
    args = ap.parse_args()
    # SIGTERM runs the `finally` below too, so a killed benchmark never leaves a server behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model
    if not (model_dir / "config.json").is_file():
        from baize.base_model import materialize

        model_dir = Path(tempfile.mkdtemp()) / "base"
        print(f"{args.model} missing: materializing the packaged model into {model_dir}")
        materialize("packaged:smollm2-135m-instruct", model_dir)

    from baize.selfchat.local_backend import LocalBackend

    requests = workload(args.requests, args.max_tokens)
    # Pairs (one human-turn request, one answer) spread evenly over the workload.
    step = max(2, len(requests) // max(1, args.baseline_sample // 2) // 2 * 2)
    sample = [r for k in range(0, len(requests), step) for r in requests[k : k + 2]][: args.baseline_sample]
    local = LocalBackend(model_dir, batch_size=args.concurrency, dtype=args.dtype)
    tok = local.tokenizer
    hello = ChatRequest(messages=[{"role": "user", "content": "Hi"}], model="base", temperature=0, top_p=1,
                        max_tokens=4)
    local.complete_sync(hello)  # warm-up, not timed

    servers = {}
    served_adapter = peft_adapter = generate_batch_model = None
    blocks = cb_num_blocks(tok, requests, args.concurrency)
    adapter_name = "v1.5"
    try:
        # Each server runs only for its own row (started, warmed up, then timed; stopped after): an idle
        # `--continuous-batching` server keeps polling for work and took a core from every other row.
        server_specs = {}
        if not args.no_serve:
            server_specs["transformers serve"] = dict(cb=False)
            if not args.no_serve_cb:
                server_specs["transformers serve --continuous-batching"] = dict(cb=True, cb_num_blocks=blocks)
        if not args.no_adapter:
            adapter_dir = args.adapter or standin_adapter(model_dir)
            print(f"adapter rows: {args.adapter or 'a stand-in LoRA (B = 0, the train stage shape)'}")
            # the engine serving base + LoRA unmerged, requests naming the adapter: ours, then PEFT's per-row path
            served_adapter = LocalBackend(model_dir, batch_size=args.concurrency, dtype=args.dtype,
                                          adapters={adapter_name: adapter_dir})
            served_adapter.complete_sync(ChatRequest(**{**hello.__dict__, "model": adapter_name}))  # warm-up
            if not args.no_peft:
                peft_adapter = peft_backend_class()(model_dir, batch_size=args.concurrency, dtype=args.dtype,
                                                    adapters={adapter_name: adapter_dir})
                peft_adapter.complete_sync(ChatRequest(**{**hello.__dict__, "model": adapter_name}))
        if not args.no_generate_batch:
            from transformers import AutoModelForCausalLM

            from baize.selfchat.local_backend import DTYPES

            # its own copy of the weights, same dtype: generate_batch may switch the attention implementation
            generate_batch_model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=DTYPES[local.dtype], use_safetensors=True, local_files_only=True).eval()
            run_generate_batch(generate_batch_model, tok, requests[1:2], 1, blocks)  # warm-up

        variants = {
            "local batched": (requests, lambda rs: run_local(local, rs, args.concurrency)),
            "one at a time (model.generate)": (sample, lambda rs: run_one_at_a_time(local.model, tok, rs)),
        }
        if served_adapter is not None:
            adapter_requests = [ChatRequest(**{**r.__dict__, "model": adapter_name}) for r in requests]
            variants[ADAPTER_ROW] = (adapter_requests, lambda rs: run_local(served_adapter, rs, args.concurrency))
        if peft_adapter is not None:
            variants[PEFT_ROW] = (adapter_requests, lambda rs: run_local(peft_adapter, rs, args.concurrency))
        if generate_batch_model is not None:
            variants[GENERATE_BATCH_ROW] = (
                requests, lambda rs: run_generate_batch(generate_batch_model, tok, rs, args.concurrency, blocks))
        for name in server_specs:
            variants[name] = (requests,
                              lambda rs, n=name: run_served(servers[n].base_url, model_dir, rs, args.concurrency))

        totals = {name: [0, 0.0, 0] for name in variants}  # useful tokens, seconds, requests
        texts: dict[str, list[str]] = {}
        for round_ in range(args.rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                rs, fn = variants[name]
                if name in server_specs:
                    servers[name] = Server(model_dir, args.threads, dtype=local.dtype, **server_specs[name])
                    run_served(servers[name].base_url, model_dir, requests[1:2], 1)  # warm-up: loads the model
                load = os.getloadavg()[0]
                started = time.perf_counter()
                try:
                    results = fn(rs)
                except Exception:
                    if name in servers:
                        code = servers[name].proc.poll()
                        print(f"{name} failed (server {'running' if code is None else f'exited, {code}'}); its log:\n"
                              f"{servers[name].tail()}", file=sys.stderr, flush=True)
                    raise
                if name in servers:
                    servers.pop(name).close()
                seconds = time.perf_counter() - started
                results = [cut(r, t, f) for r, (t, f) in zip(rs, results)]
                useful = sum(useful_tokens(tok, r, t, f) for r, (t, f) in zip(rs, results))
                totals[name][0] += useful
                totals[name][1] += seconds
                totals[name][2] += len(rs)
                texts[name] = [t for t, _ in results]
                print(f"  round {round_ + 1} {name}: {useful} tokens in {seconds:.1f} s "
                      f"({useful / seconds:.1f}/s, load avg {load:.1f})", flush=True)
    finally:
        for server in servers.values():
            server.close()
        local.close()
        for backend in (served_adapter, peft_adapter):
            if backend is not None:
                backend.close()

    base_rate = totals["one at a time (model.generate)"][0] / totals["one at a time (model.generate)"][1]
    local_by_request = dict(zip(map(id, requests), texts["local batched"]))
    standin = args.adapter is None  # B = 0: the base's text; a trained adapter's text is another model's
    if ADAPTER_ROW in variants and standin:  # same requests but for `model`: compare by position
        local_by_request.update(zip(map(id, variants[ADAPTER_ROW][0]), texts["local batched"]))
    print(f"\nself-chat workload: {args.requests} requests (half human turns with stop [AI], half answers), "
          f"max_tokens {args.max_tokens}, concurrency {args.concurrency}, greedy, {local.dtype}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} round(s)\n")
    rates = {name: useful / seconds for name, (useful, seconds, _) in totals.items()}
    ours = rates["local batched"]
    print("| variant | requests | useful tokens | seconds | useful tokens/s | vs one at a time | local batched vs it "
          "| same text as local |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (useful, seconds, n) in totals.items():
        rs = variants[name][0]
        same = (f"{sum(local_by_request[id(r)].strip() == t.strip() for r, t in zip(rs, texts[name]))}/{len(rs)}"
                if name not in ADAPTER_ROWS or standin else "(other model)")
        rate = rates[name]
        print(f"| {name} | {n} | {useful} | {seconds:.1f} | {rate:.1f} | {rate / base_rate:.2f}x | "
              f"{ours / rate:.2f}x | {same} |")
    print()
    targets = {"one at a time (model.generate)": 8, "transformers serve": 3, GENERATE_BATCH_ROW: 2}
    for name, rate in rates.items():
        if name not in ("local batched", *ADAPTER_ROWS):
            target = f" (target >= {targets[name]}x)" if name in targets else ""
            print(f"local batched vs {name}: {ours / rate:.2f}x useful tokens/s{target}")
    if ADAPTER_ROW in rates:
        print(f"adapter served unmerged vs the base: {rates[ADAPTER_ROW] / ours:.2f}x useful tokens/s "
              "(target: within 15%, >= 0.85x)")
    if PEFT_ROW in rates:
        print(f"adapter served unmerged, ours vs PEFT mixed batches: {rates[ADAPTER_ROW] / rates[PEFT_ROW]:.2f}x "
              f"useful tokens/s (PEFT's vs the base: {rates[PEFT_ROW] / ours:.2f}x)")
    backends = [("local backend", local)]
    if served_adapter is not None:
        backends.append((f"local backend, adapter {adapter_name}", served_adapter))
    if peft_adapter is not None:
        backends.append((f"local backend, adapter {adapter_name} via PEFT", peft_adapter))
    for label, backend in backends:
        st = backend.stats
        print(f"{label}: prefill {st.prefill_tokens} prompt tokens ({st.reused_tokens} more reused from the "
              f"prefix cache) in {st.prefill_s:.1f} s, "
              f"{st.decode_steps} decode steps in {st.decode_s:.1f} s, "
              f"mean batch fill {st.decode_tokens / max(1, st.decode_steps):.1f}/{args.concurrency}")


if __name__ == "__main__":
    main()
