import json
from pathlib import Path

import pytest

from baize.selfchat import parse, prompts
from baize.selfchat.parse import Dropped, parse_selfchat
from baize.selfchat.prompts import clean_turn
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


# A malformed turn stops the parse: later turns may refer to the missing answer, so they are dropped too.


def test_two_human_turns_in_a_row_stop_the_parse():
    raw = "[Human] q1\n[AI] a1\n[Human] q2\n[Human] As you said above, why?\n[AI] a3\n[Human] q4\n[AI] a4"
    r = parse_selfchat(raw)
    assert r.complete_pairs == [("q1", "a1")]
    assert reasons(r) == [
        ("orphan_human", "human", "q2"),
        ("after_malformed", "human", "As you said above, why?"),
        ("after_malformed", "ai", "a3"),
        ("after_malformed", "human", "q4"),
        ("after_malformed", "ai", "a4"),
    ]


def test_leading_orphan_ai_stops_the_parse():
    # Like the reference code, nothing after an AI turn with no question is kept.
    r = parse_selfchat("[AI] I start oddly.\n[Human] q\n[AI] a")
    assert r.turns == []
    assert reasons(r) == [
        ("orphan_ai", "ai", "I start oddly."),
        ("after_malformed", "human", "q"),
        ("after_malformed", "ai", "a"),
    ]


def test_orphan_ai_mid_reply_keeps_pairs_before_it():
    r = parse_selfchat("[Human] q1\n[AI] a1\n[AI] a1, continued\n[Human] q2\n[AI] a2")
    assert r.complete_pairs == [("q1", "a1")]
    assert reasons(r) == [
        ("orphan_ai", "ai", "a1, continued"),
        ("after_malformed", "human", "q2"),
        ("after_malformed", "ai", "a2"),
    ]


def test_empty_ai_turn_mid_reply_stops_the_parse():
    r = parse_selfchat("[Human] q1\n[AI] a1\n[Human] q2\n[AI]   \n[Human] So why?\n[AI] a3")
    assert r.complete_pairs == [("q1", "a1")]
    assert reasons(r) == [
        ("orphan_human", "human", "q2"),
        ("empty", "ai", ""),
        ("after_malformed", "human", "So why?"),
        ("after_malformed", "ai", "a3"),
    ]


def test_empty_human_turn_stops_the_parse():
    r = parse_selfchat("[Human]\n[AI] answer to nothing\n[Human] q\n[AI] a")
    assert r.turns == []
    assert reasons(r) == [
        ("empty", "human", ""),
        ("after_malformed", "ai", "answer to nothing"),
        ("after_malformed", "human", "q"),
        ("after_malformed", "ai", "a"),
    ]
    # A trailing empty human turn (a Baize-tuned model ends on a dangling "[|Human|] ") costs nothing.
    r = parse_selfchat("[Human] q\n[AI] a\n[Human]  \n")
    assert r.complete_pairs == [("q", "a")]
    assert reasons(r) == [("empty", "human", "")]


def test_truncated_after_malformed_keeps_pairs_closed_before_it():
    r = parse_selfchat("[Human] q1\n[AI] a1\n[AI] more, cut mid-sen", truncated=True)
    assert r.complete_pairs == [("q1", "a1")]
    assert reasons(r) == [("orphan_ai", "ai", "more, cut mid-sen")]


def test_training_markers_parsed_like_template_markers():
    # A model already tuned on Baize data writes the training text's markers.
    raw = (
        "The conversation between human and AI assistant.\n"
        "[|Human|] What is DVC?\n"
        "[|AI|] It versions data; the tag [|Human|] is only text here.\n"
        "  [|Human|]: And MLflow?\n"
        "[|AI|]It tracks runs.\n"
        "[|Human|] "
    )
    r = parse_selfchat(raw)
    assert r.complete_pairs == [
        ("What is DVC?", "It versions data; the tag [|Human|] is only text here."),
        ("And MLflow?", "It tracks runs."),
    ]
    assert reasons(r) == [
        ("preamble", None, "The conversation between human and AI assistant."),
        ("empty", "human", ""),
    ]


def test_mixed_marker_styles():
    r = parse_selfchat("[Human] q1\n[|AI|] a1\n[|Human|] q2\n[AI]: a2")
    assert r.complete_pairs == [("q1", "a1"), ("q2", "a2")]
    assert r.dropped == []
    # Unbalanced pipes are not a marker.
    r = parse_selfchat("[Human] q\n[|AI] not a marker\n[AI] a")
    assert r.complete_pairs == [("q\n[|AI] not a marker", "a")]


def test_one_marker_regex_shared_with_clean_turn():
    assert prompts.MARKER is parse.MARKER


def test_clean_turn_keeps_a_marker_quoted_mid_sentence():
    assert clean_turn("How do I parse a [AI] tag?") == ("How do I parse a [AI] tag?", "")
    assert clean_turn("What does [|Human|] mean in Baize data?") == ("What does [|Human|] mean in Baize data?", "")
    # After a stripped leading marker too: only a marker at a line start cuts.
    assert clean_turn("[AI] Use the [Human] tag.") == ("Use the [Human] tag.", "")
    assert clean_turn("[|AI|] [|Human|] marks the human.") == ("[|Human|] marks the human.", "")


def test_clean_turn_strips_a_leading_marker_of_either_style():
    assert clean_turn("  [Human] What is DVC?  ") == ("What is DVC?", "")
    assert clean_turn("[|Human|]: What is DVC?") == ("What is DVC?", "")
    assert clean_turn("[|AI|] It versions data.") == ("It versions data.", "")


def test_clean_turn_cuts_at_a_line_start_marker_of_either_style():
    assert clean_turn("What is DVC?\n[AI] It versions data.") == ("What is DVC?", "[AI] It versions data.")
    assert clean_turn("[|AI|] It versions data.\n  [|Human|] And MLflow?\n[|AI|] It tracks runs.") == (
        "It versions data.",
        "[|Human|] And MLflow?\n[|AI|] It tracks runs.",
    )
    assert clean_turn("[Human]\n[AI] an answer instead") == ("", "[AI] an answer instead")


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
