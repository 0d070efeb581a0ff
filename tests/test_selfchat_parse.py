import json
from pathlib import Path

import pytest

from baize.selfchat_parse import Dropped, parse_selfchat
from baize.transcript import Turn

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "baize-original"


def reasons(result):
    return [(d.reason, d.role, d.text) for d in result.dropped]


def test_fixture_reply_gives_eight_pairs():
    path = FIXTURES / "raw_selfchat_response.json"
    if not path.exists():
        pytest.skip("shared fixtures not available")
    raw = json.loads(path.read_text(encoding="utf-8"))["raw_response"]
    r = parse_selfchat(raw)
    assert len(r.turns) == 16
    assert len(r.complete_pairs) == 8
    assert r.dropped == []
    assert [t.role for t in r.turns] == ["human", "ai"] * 8
    assert r.turns[0].text == (
        "Can you tell me more about what to expect in the first few days of joining the group?"
    )
    assert r.turns[1].text.startswith("As an AI language model, I am not quite sure")
    assert r.turns[-1].text.endswith("ensure you get the most out of your membership.")
    # The last pair is kept (the reference code would drop the final [Human] segment).
    assert r.complete_pairs[-1][0].startswith("Can you explain what the 22 days time means")
    assert all(t.text == t.text.strip() and t.text for t in r.turns)


def test_basic_and_tolerant_markers():
    raw = (
        "[Human] What is DVC?\r\n\r\n"
        "   [AI]It versions data.\r\n"
        "  It also runs pipelines.  \r\n"
        "[Human]: And MLflow?\n"
        "\t[AI] : It tracks runs.\n\n\n"
    )
    r = parse_selfchat(raw)
    assert r.complete_pairs == [
        ("What is DVC?", "It versions data.\n  It also runs pipelines."),
        ("And MLflow?", "It tracks runs."),
    ]
    assert r.dropped == []


def test_markers_only_at_line_start():
    raw = "[Human] Why do transcripts use [AI] and [Human] tags?\n[AI] The tag [Human] marks a human turn."
    r = parse_selfchat(raw)
    assert r.complete_pairs == [
        ("Why do transcripts use [AI] and [Human] tags?", "The tag [Human] marks a human turn.")
    ]


def test_preamble_dropped():
    r = parse_selfchat("Sure, here is the transcript:\n\n[Human] q\n[AI] a\n")
    assert r.complete_pairs == [("q", "a")]
    assert reasons(r) == [("preamble", None, "Sure, here is the transcript:")]
    # Whitespace-only lead-in is not recorded.
    assert parse_selfchat("\n  \n[Human] q\n[AI] a").dropped == []


def test_no_markers_is_all_preamble():
    r = parse_selfchat("I cannot continue this conversation.")
    assert r.turns == []
    assert reasons(r) == [("preamble", None, "I cannot continue this conversation.")]
    assert parse_selfchat("").turns == [] and parse_selfchat("").dropped == []


def test_trailing_human_dropped_but_last_complete_pair_kept():
    r = parse_selfchat("[Human] q1\n[AI] a1\n[Human] q2\n[AI] a2\n[Human] q3 without answer\n")
    assert r.complete_pairs == [("q1", "a1"), ("q2", "a2")]
    assert reasons(r) == [("trailing_incomplete", "human", "q3 without answer")]


def test_orphans_are_dropped_not_merged():
    raw = "[Human] q1\n[Human] q2\n[AI] a2\n[AI] a3 extra\n[Human] q4\n[AI] a4"
    r = parse_selfchat(raw)
    assert r.complete_pairs == [("q2", "a2"), ("q4", "a4")]
    assert reasons(r) == [("orphan_human", "human", "q1"), ("orphan_ai", "ai", "a3 extra")]


def test_leading_ai_is_orphan_and_parsing_continues():
    # The reference code stops at the first malformed turn; we keep what follows.
    r = parse_selfchat("[AI] I start oddly.\n[Human] q\n[AI] a")
    assert r.complete_pairs == [("q", "a")]
    assert reasons(r) == [("orphan_ai", "ai", "I start oddly.")]


def test_empty_turns_dropped():
    r = parse_selfchat("[Human]\n[AI] answer to nothing\n[Human] q\n[AI]   \n[Human] q2\n[AI] a2")
    assert r.complete_pairs == [("q2", "a2")]
    assert reasons(r) == [
        ("empty", "human", ""),
        ("orphan_ai", "ai", "answer to nothing"),
        ("empty", "ai", ""),
        ("orphan_human", "human", "q"),
    ]


def test_template_echo_dropped():
    r = parse_selfchat("[Human] Hello!\n[AI] Hi! How can I help you?\n[Human] q\n[AI] a")
    assert r.complete_pairs == [("q", "a")]
    assert reasons(r) == [("template_echo", "human", "Hello!"), ("template_echo", "ai", "Hi! How can I help you?")]
    # Only the AI half echoed (the model continued right after the template's [Human] line).
    r = parse_selfchat("[AI]  Hi!  How can I help you?\n[Human] q\n[AI] a")
    assert r.complete_pairs == [("q", "a")]
    assert reasons(r) == [("template_echo", "ai", "Hi!  How can I help you?")]
    # A genuine greeting later in the dialogue is kept.
    r = parse_selfchat("[Human] q\n[AI] a\n[Human] Hello!\n[AI] Hi! How can I help you?")
    assert len(r.complete_pairs) == 2 and r.dropped == []
    # "Hello!" with a real answer is not the template's pair.
    r = parse_selfchat("[Human] Hello!\n[AI] Hello! What would you like to know about DVC?")
    assert len(r.complete_pairs) == 1 and r.dropped == []


def test_truncated_drops_last_pair():
    raw = "[Human] q1\n[AI] a1\n[Human] q2\n[AI] a2 was cut off mid-sen"
    assert parse_selfchat(raw).complete_pairs == [("q1", "a1"), ("q2", "a2 was cut off mid-sen")]
    r = parse_selfchat(raw, truncated=True)
    assert r.complete_pairs == [("q1", "a1")]
    assert reasons(r) == [("truncated", "human", "q2"), ("truncated", "ai", "a2 was cut off mid-sen")]
    assert r.dropped[0] == Dropped("truncated", "q2", "human")


def test_truncated_in_human_turn_keeps_previous_pair():
    # The cut fell inside a human turn: the AI turn before it was closed by the next marker, so it is complete.
    r = parse_selfchat("[Human] q1\n[AI] a1\n[Human] q2 was cu", truncated=True)
    assert r.complete_pairs == [("q1", "a1")]
    assert reasons(r) == [("trailing_incomplete", "human", "q2 was cu")]


def test_turns_are_turn_models():
    r = parse_selfchat("[Human] q\n[AI] a")
    assert r.turns == [Turn(role="human", text="q"), Turn(role="ai", text="a")]
