"""Multi-turn self-chat: follow-up prompting, min_rounds, re-asks with their cap, cut answers, conversation stats.

The backend here is a scripted model in-process (the engine's logic is what is under test; the real backends
are tested against stub servers, `transformers serve` and the local model elsewhere).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict

import pytest

from baize.selfchat import prompts
from baize.selfchat.backend import ChatRequest, Completion
from baize.selfchat.engine import Engine, EngineConfig, Seed, conversation_stats
from baize.selfchat.journal import Journal
from baize.selfchat.openai_backend import chat_body

pytestmark = pytest.mark.timeout(60)


class Scripted:
    """A backend whose reply is a function of the request; records every request it was sent."""

    name = "scripted"

    def __init__(self, reply: Callable[[ChatRequest], tuple[str, str]]):
        self.reply = reply
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> Completion:
        self.requests.append(request)
        text, finish = self.reply(request)
        # Like a real server: the reply ends before the first stop string, which is not part of it.
        hits = [i for i in (text.find(s) for s in request.stop or []) if i >= 0]
        if hits:
            text, finish = text[: min(hits)], "stop"
        return Completion(text=text, finish_reason=finish, prompt_tokens=10, completion_tokens=len(text.split()))


def is_human_call(request: ChatRequest) -> bool:
    return request.messages[0]["content"] == prompts.FOLLOWUP_SYSTEM


def run(backend, tmp_path, seeds=("Why is the sky blue?",), **cfg):
    config = {
        "model": "m", "mode": "turns", "human_prompt": "followup", "first_human": "seed", "max_rounds": 3,
        "min_rounds": 1, "max_reasks": 2, **cfg,
    }

    async def go():
        with Journal(tmp_path / "journal.jsonl") as journal:
            engine = Engine(backend, journal, EngineConfig(**config), progress=False)
            return await engine.run([Seed(f"s{i}", text) for i, text in enumerate(seeds)])

    return asyncio.run(go())


def test_followup_prompt_is_the_last_answer_and_the_question_is_taken_out_of_its_wrapping(tmp_path):
    questions = iter(['A good follow-up question could be: "How does light scatter?"', "And at sunset, why red?"])

    def reply(r):
        if is_human_call(r):
            return next(questions), "stop"
        return f"Answer {len(r.messages)}.", "stop"

    backend = Scripted(reply)
    result = run(backend, tmp_path, ai_system_prompt="Be brief.")
    t = result.transcripts[0]
    assert [x.text for x in t.turns] == [
        "Why is the sky blue?", "Answer 2.", "How does light scatter?", "Answer 4.", "And at sunset, why red?",
        "Answer 6.",
    ]
    human_calls = [r for r in backend.requests if is_human_call(r)]
    assert human_calls[0].messages[1]["content"] == (
        "Question: Why is the sky blue?\nAnswer: Answer 2.\n\nWhat is a good follow-up question?"
    )
    ai_calls = [r for r in backend.requests if not is_human_call(r)]
    assert ai_calls[0].messages[0] == {"role": "system", "content": "Be brief."}  # ai_system_prompt first
    assert [m["role"] for m in ai_calls[-1].messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert t.meta["ended"] == "max_rounds" and result.metrics["rounds_per_transcript"] == 3.0


def test_no_more_questions_before_min_rounds_is_reasked_with_another_seed(tmp_path):
    def reply(r):
        if is_human_call(r):
            # The plain request says it is done; the re-ask (seed 1) asks; later the human is done for good.
            if r.seed is None:
                return "NO MORE QUESTIONS", "stop"
            return "What about clouds?", "stop"
        return "Because of scattering.", "stop"

    backend = Scripted(reply)
    result = run(backend, tmp_path, min_rounds=2, max_rounds=4)
    t = result.transcripts[0]
    # round 1: seed; round 2: "done" re-asked -> clouds; round 3: "done" accepted (2 rounds reached)
    assert [x.text for x in t.turns if x.role == "human"] == ["Why is the sky blue?", "What about clouds?"]
    assert t.meta["ended"] == "human_done"
    assert t.meta["reasks"] == {"done_early": 1, "ok_after_done_early": 1}
    assert [d["reason"] for d in t.meta["dropped"]] == ["reasked_done_early"]
    seeds_sent = [r.seed for r in backend.requests if is_human_call(r)]
    assert seeds_sent == [None, 1, None]
    # A re-ask is a different request: its own journal key, so a re-run does not replay the refused reply.
    first, reask = [r for r in backend.requests if is_human_call(r)][:2]
    assert first.messages == reask.messages and first.key("scripted") != reask.key("scripted")


def test_reasks_are_capped_and_the_conversation_keeps_its_pairs(tmp_path):
    def reply(r):
        if is_human_call(r):
            return "Why is the sky blue?", "stop"  # always repeats the seed
        return "Scattering.", "stop"

    backend = Scripted(reply)
    result = run(backend, tmp_path, max_reasks=2)
    t = result.transcripts[0]
    assert len(t.turns) == 2 and t.meta["ended"] == "gave_up_repeat"
    assert sum(is_human_call(r) for r in backend.requests) == 3  # the ask + max_reasks re-asks
    assert [d["reason"] for d in t.meta["dropped"]] == ["reasked_repeat"] * 3
    assert result.metrics["reasks"] == {"repeat": 3}


@pytest.mark.parametrize(
    "human, problem",
    [
        ("The sky is blue because of Rayleigh scattering.", "not_a_question"),  # an answer, not a question
        ("What is a good follow-up question?", "not_a_question"),  # about the task, not the topic
        ("Why is the sky blue???", "repeat"),
        ("Why is the SKY blue", "repeat"),  # ended at its "?" (a stop string): the mark is put back
    ],
)
def test_unusable_human_turns_are_reasked(tmp_path, human, problem):
    answers = iter([human, "How do rainbows form?"])

    def reply(r):
        return (next(answers), "stop") if is_human_call(r) else ("Light.", "stop")

    result = run(Scripted(reply), tmp_path, max_rounds=2)
    t = result.transcripts[0]
    assert t.turns[2].text == "How do rainbows form?"
    assert t.meta["reasks"][problem] == 1


def test_a_cut_answer_is_dropped_and_asked_again_then_its_question_goes_too(tmp_path):
    def reply(r):
        if is_human_call(r):
            return "How do rainbows form?", "stop"
        return ("Light scatters.", "stop") if len(r.messages) == 1 else ("Rainbows form when the sun", "length")

    result = run(Scripted(reply), tmp_path, seeds=("Why is the sky blue?", "What is light?"), max_answer_reasks=1)
    for t in result.transcripts:
        assert len(t.turns) == 2 and t.meta["ended"] == "truncated" and t.meta["truncated_turns"] == []
        assert [d["reason"] for d in t.meta["dropped"]] == ["truncated", "truncated", "unanswered"]
        assert t.meta["reasks"] == {"cut_answer": 2}
    m = result.metrics
    assert m["ai_cut_share"] == round(4 / 6, 4) and m["ai_cut"] == {"dropped": 4, "kept": 0}


def test_a_cut_answer_asked_again_can_finish_and_the_conversation_goes_on(tmp_path):
    def reply(r):
        if is_human_call(r):
            return "How do rainbows form?", "stop"
        if len(r.messages) == 1:
            return "Light scatters.", "stop"
        return ("Rainbows form when the sun", "length") if r.seed is None else ("Sunlight refracts in drops.", "stop")

    result = run(Scripted(reply), tmp_path, max_rounds=2, max_answer_reasks=1)
    t = result.transcripts[0]
    assert t.turns[-1].text == "Sunlight refracts in drops." and t.meta["ended"] == "max_rounds"
    assert t.meta["reasks"] == {"cut_answer": 1, "ok_after_cut_answer": 1}
    assert result.metrics["ai_cut"] == {"dropped": 1, "kept": 0}  # the cut answer is never in the transcript


def test_keep_truncated_keeps_the_cut_answer_marked_and_stops_there(tmp_path):
    def reply(r):
        if is_human_call(r):
            return "How do rainbows form?", "stop"
        return ("Light scatters.", "stop") if len(r.messages) == 1 else ("Rainbows form when the sun", "length")

    result = run(Scripted(reply), tmp_path, keep_truncated=True)
    t = result.transcripts[0]
    assert len(t.turns) == 4 and t.meta["truncated_turns"] == [3] and t.meta["ended"] == "truncated"
    assert result.metrics["ai_cut"] == {"dropped": 0, "kept": 1}


def test_a_rerun_replays_the_journal_and_pays_nothing(tmp_path):
    def reply(r):
        if is_human_call(r):
            return ("NO MORE QUESTIONS", "stop") if r.seed is None else ("What about clouds?", "stop")
        return "Scattering.", "stop"

    first = run(Scripted(reply), tmp_path, min_rounds=3)
    again_backend = Scripted(reply)
    again = run(again_backend, tmp_path, min_rounds=3)
    assert again_backend.requests == [] and again.metrics["new"]["replies"] == 0
    assert [t.model_dump() for t in again.transcripts] == [t.model_dump() for t in first.transcripts]


def test_conversation_stats_measure_rounds_lengths_and_repeats():
    from baize.transcript import Transcript

    def tr(seed, *texts, **meta):
        turns = [{"role": "human" if i % 2 == 0 else "ai", "text": x} for i, x in enumerate(texts)]
        return Transcript.create(seed=seed, turns=turns, source="t", meta=meta)

    stats = conversation_stats([
        tr("Why is the sky blue?", "Why is the sky blue?", "one two three", "Why is the sky so blue?", "four five",
           ended="max_rounds"),
        tr("What is light?", "What is light?", "a b c d e", "How fast does it travel?", "f", ended="human_done",
           truncated_turns=[3]),
    ])
    assert stats["rounds_per_transcript"] == 2.0 and stats["turns_per_transcript"] == 4.0
    assert stats["followup_repeat_share"] == 0.5  # "so blue" repeats its seed; "how fast" does not
    assert stats["ai_words"] == (3 + 2 + 5 + 1) / 4
    assert stats["ended"] == {"human_done": 1, "max_rounds": 1} and stats["ai_cut"]["kept"] == 1


def test_question_helpers():
    assert prompts.extract_question('Question: "How do tides work?"') == "How do tides work?"
    assert prompts.extract_question("I'm glad you asked. A great question is: What causes tides?\n\nThis") == (
        "What causes tides?"
    )
    assert prompts.extract_question("What a delightful topic!") is None
    assert prompts.extract_question("What's your next question?") is None
    assert prompts.extract_question("No more questions.") == ""
    assert prompts.is_done("") and prompts.is_done("I have no more questions, thanks!")
    assert not prompts.is_done("Are there more questions about tides?")
    assert prompts.repeats("What is glaucoma?", ["What is (are) Glaucoma?"])
    assert not prompts.repeats("How is glaucoma treated?", ["What is (are) Glaucoma?"])


def test_a_sampling_seed_changes_the_request_key_only_when_set():
    r = ChatRequest(messages=[{"role": "user", "content": "hi"}], model="m")
    # The key of a request without a seed (nor the later raw-prompt and structured-output fields) is what it was
    # before those fields existed: old journals still match.
    old = {k: v for k, v in asdict(r).items() if k not in ("seed", "prompt", "response_format", "choices", "top_logprobs")}
    expected = hashlib.sha256(json.dumps({"backend": "b", **old}, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert r.key("b") == expected
    seeded = ChatRequest(messages=r.messages, model="m", seed=1)
    assert seeded.key("b") != r.key("b")
    assert "seed" not in chat_body(r) and chat_body(seeded)["seed"] == 1
