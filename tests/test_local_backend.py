"""The `local` self-chat backend: continuous batching must not change what the model says.

The model tests share one LocalBackend over the session's materialized SmolLM2-135M (tests/conftest.py) and keep
generations short; greedy decoding makes the expected text exact.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from baize.errors import BaizeError, ParamsError
from baize.selfchat.backend import ChatRequest
from baize.selfchat import local_backend
from baize.selfchat.local_backend import ContextLengthError, LocalBackend
from baize.selfchat.prompts import HUMAN_STOP, ai_turn_messages, human_turn_messages
from baize.transcript import Turn

SEEDS = ["Why do rockets look white?", "How does compound interest work?", "How do I reverse a linked list in Java?"]
PRIOR = [Turn(role="human", text="Can you explain the basics?"), Turn(role="ai", text="Sure, start small.")]


def greedy(messages, max_tokens=12, stop=None) -> ChatRequest:
    return ChatRequest(messages=messages, model="local", temperature=0.0, top_p=1.0, max_tokens=max_tokens, stop=stop)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BaizeError, match="no model folder"):
        LocalBackend(tmp_path / "models" / "base")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BaizeError, match="safetensors"):
        LocalBackend(tmp_path)


def test_bad_dtype_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="dtype"):
        LocalBackend(tmp_path, dtype="int3")


@pytest.fixture(scope="module")
def backend(base_model_dir):
    # batch_size 2 with 6 concurrent requests: rows finish and waiting requests take their slots mid-batch.
    # float32: batched and one-at-a-time greedy text are then equal token for token (bf16 rounding differs
    # with the batch composition).
    with LocalBackend(base_model_dir, batch_size=2, admit_min=1, dtype="float32") as b:
        yield b


def reference(backend: LocalBackend, request: ChatRequest) -> tuple[str, str, int]:
    """One prompt at a time with plain `model.generate`, then EOS / stop strings / max_tokens applied by hand."""
    ids = torch.tensor([backend.render(request.messages)])
    with torch.inference_mode():
        out = backend.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens, do_sample=False
        )
    generated = out[0, ids.shape[1] :].tolist()
    for n in range(1, len(generated) + 1):  # the first point where the sequence would end
        if generated[n - 1] in backend.eos_ids:
            return backend.tokenizer.decode(generated[: n - 1], skip_special_tokens=True), "stop", n
        text = backend.tokenizer.decode(generated[:n], skip_special_tokens=True)
        hits = [text.find(s) for s in request.stop or [] if s in text]
        if hits:
            return text[: min(hits)], "stop", n
    return backend.tokenizer.decode(generated, skip_special_tokens=True), "length", len(generated)


@pytest.mark.slow
def test_concurrent_batch_equals_one_at_a_time_greedy(backend):
    # Real self-chat requests of varied lengths; the stops make rows finish at different steps.
    requests = [
        greedy(human_turn_messages(SEEDS[0], []), stop=HUMAN_STOP),
        greedy(ai_turn_messages([Turn(role="human", text=SEEDS[1])]), stop=["."]),
        greedy(human_turn_messages(SEEDS[2], PRIOR), stop=HUMAN_STOP),
        greedy(ai_turn_messages([*PRIOR, Turn(role="human", text=SEEDS[2])]), max_tokens=16),
        greedy(ai_turn_messages([Turn(role="human", text=SEEDS[0])]), max_tokens=5),
        greedy(ai_turn_messages([Turn(role="human", text="Say hi.")]), max_tokens=14, stop=["!", "\n"]),
    ]

    async def run_all():
        return await asyncio.gather(*(backend.complete(r) for r in requests))

    got = asyncio.run(run_all())
    expected = [reference(backend, r) for r in requests]
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in got] == expected
    # The workload really was uneven: some rows stopped early, some ran to max_tokens.
    assert {c.finish_reason for c in got} == {"stop", "length"}
    assert len({c.completion_tokens for c in got}) >= 3


def test_growable_cache_layer_matches_plain_tensors():
    """In-place appends, growth past the reserved room, dropped rows and dropped left columns."""
    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    layer = local_backend._GrowableLayer(keys.clone(), values.clone())
    for _ in range(local_backend._GrowableLayer.ROOM + 7):  # past the first reservation
        k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.drop_left(3)
    assert torch.equal(layer.keys, keys[[0, 2], :, 3:]) and torch.equal(layer.values, values[[0, 2], :, 3:])
    assert layer.get_seq_length() == keys.shape[2] - 3
    k = torch.randn(2, 2, 1, 4)
    assert torch.equal(layer.update(k, k)[0], torch.cat([keys[[0, 2], :, 3:], k], dim=2))


@pytest.mark.slow
def test_batched_greedy_is_exact_when_the_cache_grows_every_few_tokens(base_model_dir, monkeypatch):
    # A tiny reservation: the running batch's cache is re-reserved many times while rows join and leave.
    monkeypatch.setattr(local_backend._GrowableLayer, "ROOM", 2)
    requests = [
        greedy(ai_turn_messages([Turn(role="human", text=SEEDS[1])]), max_tokens=10),
        greedy(human_turn_messages(SEEDS[0], PRIOR), max_tokens=7, stop=HUMAN_STOP),
        greedy(ai_turn_messages([Turn(role="human", text=SEEDS[2])]), max_tokens=3),
    ]
    with LocalBackend(base_model_dir, batch_size=2, admit_min=1, dtype="float32") as small:
        async def run_all():
            return await asyncio.gather(*(small.complete(r) for r in requests))

        got = asyncio.run(run_all())
        assert [(c.text, c.finish_reason, c.completion_tokens) for c in got] == [reference(small, r) for r in requests]


@pytest.mark.slow
def test_auto_dtype_is_bf16_where_the_cpu_has_it_and_still_talks(base_model_dir):
    from baize.hardware import cpu_has_native_bf16

    with LocalBackend(base_model_dir, batch_size=4) as auto:
        expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        assert auto.dtype == ("bfloat16" if expected == torch.bfloat16 else "float32")
        assert next(auto.model.parameters()).dtype == expected
        request = greedy(ai_turn_messages([Turn(role="human", text=SEEDS[1])]), max_tokens=12)

        async def run_all():
            return await asyncio.gather(*(auto.complete(request) for _ in range(3)))

        done = asyncio.run(run_all())
        assert all(len(c.text.split()) >= 3 for c in done)  # real words, not an empty or broken reply
        assert len({c.text for c in done}) == 1  # the same request in one batch: the same greedy text


@pytest.mark.slow
def test_stop_string_is_cut_and_ends_the_sequence(backend):
    request = greedy(ai_turn_messages([Turn(role="human", text=SEEDS[1])]), max_tokens=40)
    full = backend.complete_sync(request)
    assert " " in full.text
    stop = full.text.split(" ")[2]  # a word the model says early on
    cut = backend.complete_sync(greedy(request.messages, max_tokens=40, stop=[stop, "never-said-xyz"]))
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    assert cut.completion_tokens < full.completion_tokens


@pytest.mark.slow
def test_max_tokens_gives_length_and_usage(backend):
    request = greedy(ai_turn_messages([Turn(role="human", text=SEEDS[2])]), max_tokens=4)
    done = backend.complete_sync(request)
    assert done.finish_reason == "length"
    assert done.completion_tokens == 4
    assert done.prompt_tokens == len(backend.render(request.messages)) > 10
    assert done.model == backend.model_name
    assert len(backend.tokenizer(done.text, add_special_tokens=False).input_ids) in range(3, 6)


@pytest.mark.slow
def test_sampling_is_reproducible_per_request(backend):
    request = ChatRequest(
        messages=ai_turn_messages([Turn(role="human", text=SEEDS[0])]),
        model="local",
        temperature=1.0,
        top_p=0.95,
        max_tokens=8,
    )
    first, second = backend.complete_sync(request), backend.complete_sync(request)
    assert first.text == second.text and first.completion_tokens == second.completion_tokens


@pytest.mark.slow
def test_prompt_longer_than_context_fails_that_request_only(base_model_dir):
    with LocalBackend(base_model_dir, max_context=32) as small:
        with pytest.raises(ContextLengthError, match="max_context is 32"):
            small.complete_sync(greedy(human_turn_messages(SEEDS[0], [])))
        # Near the limit, generation is cut to what fits and reported as "length".
        short = greedy([{"role": "user", "content": "Hi"}], max_tokens=50)
        room = 32 - len(small.render(short.messages))
        done = small.complete_sync(short)
        assert done.finish_reason == "length" or done.completion_tokens < room
        assert done.completion_tokens <= room


@pytest.mark.slow
def test_model_error_fails_the_requests_in_flight_and_the_backend_recovers(backend, monkeypatch):
    calls = {"n": 0}
    forward = backend.model.forward

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", broken_once)
    request = greedy(ai_turn_messages([Turn(role="human", text=SEEDS[0])]), max_tokens=3)
    with pytest.raises(BaizeError, match="simulated kernel failure"):
        backend.complete_sync(request)
    assert backend.complete_sync(request).completion_tokens == 3


@pytest.mark.timeout(120)
def test_a_cancelled_request_frees_its_batch_slot(base_model_dir):
    """A caller that gives up (a stopped run, a seed's task cancelled) must not leave its row generating to
    max_tokens: with one slot, the next request starts as soon as the first is cancelled."""
    import time

    with LocalBackend(base_model_dir, batch_size=1, admit_min=1, dtype="float32") as b:
        b.eos_ids = [-1]  # never stops by itself: only max_tokens (or the cancel) ends the first request

        async def go():
            first = asyncio.create_task(b.complete(greedy(human_turn_messages(SEEDS[0], []), max_tokens=1500)))
            while b.stats.decode_steps < 3:
                await asyncio.sleep(0.01)
            first.cancel()
            started = time.monotonic()
            second = await asyncio.wait_for(b.complete(greedy(human_turn_messages(SEEDS[1], []), max_tokens=3)), 20)
            return time.monotonic() - started, second

        waited, second = asyncio.run(go())
        steps = b.stats.decode_steps
    assert second.completion_tokens == 3 and second.finish_reason == "length"
    assert waited < 10 and steps < 50  # not the 1,500 steps the abandoned row would have run
