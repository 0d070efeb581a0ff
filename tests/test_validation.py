"""The validate stage: every bad kind of transcript is rejected for its own reason and kept, clean data
passes whole (the released English Baize fixtures included), bad files name file:line, the statistics
(Table 2 figures and warnings) are exact, and the gate exits non-zero only after writing every output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import count_color, dom, needs_browser, screenshot
from click.testing import CliRunner

from baize.config import ValidateParams
from baize.errors import InputError, ParamsError
from baize.formats import export_baize_json, to_messages
from baize.selfchat import prompts
from baize.selfchat.parse import parse_selfchat
from baize.transcript import Transcript, Turn, write_jsonl
from baize.validation import (
    CHECKS,
    STATS_HEADLINE,
    check_params,
    dataset_stats,
    features,
    is_terminated,
    length_counter,
    load_transcripts,
    validate,
    write_outputs,
)
from baize.webassets import remote_refs

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared/fixtures/baize-original"
P = ValidateParams()


def echo_of(instruction: str) -> str:
    """The first 7 words of the instruction's longest sentence (placeholders out): a model repeating it."""
    parts = re.split(r"\$\{\w+\}|\n", instruction)
    sentences = [x for part in parts for x in re.split(r"(?<=[.!?])\s+", part)]
    return " ".join(max(sentences, key=lambda x: len(x.split())).split()[:7]).rstrip("?.!,:")


def make(pairs, seed="How do plants make food?", **kw) -> Transcript:
    """pairs: [(role, text), ...]"""
    return Transcript.create(seed=seed, turns=[Turn(role=r, text=t) for r, t in pairs], source="test", **kw)


def clean_set(n: int = 12) -> list[Transcript]:
    """Varied, valid transcripts: several languages, tabs/newlines, brackets that are not role markers."""
    out = []
    for i in range(n):
        turns = [
            ("human", f"Question {i}: how does photosynthesis work in plant number {i}?"),
            ("ai", f"Plants turn light into sugar.\n\tStep 1 [see note {i}]: light is absorbed by chlorophyll."),
        ]
        if i % 3 == 0:
            turns += [
                ("human", f"광합성은 왜 중요한가요? ({i})"),
                ("ai", f"광합성은 산소를 만듭니다. [AI-generated note {i}]"),
            ]
        if i % 4 == 1:
            turns += [("human", f"And at night, case {i}?"), ("ai", "As an AI language model, I'd say: respiration.")]
        if i % 4 == 2:  # a self-chat marker quoted mid-sentence is text, not a turn boundary
            turns += [("human", f"How do I parse a [AI] tag, case {i}?"), ("ai", "Match [Human] or [AI] at a line start.")]
        out.append(make(turns, seed=f"Photosynthesis question {i}"))
    return out


# One transcript per bad kind, and the exact set of checks it must fail (turn indices where per turn).
BAD = {
    "id_present": (
        Transcript(
            id="", seed="s", source="test", turns=[Turn(role="human", text="hi?"), Turn(role="ai", text="hello")]
        ),
        {"id_present": []},
    ),
    "roles_valid": (
        Transcript.model_construct(
            id="badrole000000000",
            seed="s",
            seed_id=None,
            source="test",
            meta={},
            turns=[Turn(role="human", text="hi?"), Turn.model_construct(role="assistant", text="hello")],
        ),
        {"roles_valid": [1], "ends_with_ai": []},
    ),
    "starts_with_human": (
        make([("ai", "Hi there."), ("human", "Tell me about owls."), ("ai", "Owls hunt at night.")]),
        {"starts_with_human": []},
    ),
    "ends_with_ai": (
        make([("human", "Tell me about owls."), ("ai", "Owls hunt at night."), ("human", "And by day?")]),
        {"ends_with_ai": []},
    ),
    "roles_alternate": (
        make([("human", "Tell me about owls."), ("human", "Please?"), ("ai", "Owls hunt at night.")]),
        {"roles_alternate": []},
    ),
    "too_many_turns": (
        make([("human", f"q{i}?") if i % 2 == 0 else ("ai", f"a{i}") for i in range(P.max_turns + 2)]),
        {"turn_count": []},
    ),
    "no_turns": (make([]), {"starts_with_human": [], "ends_with_ai": [], "turn_count": []}),
    "empty_turn": (
        make([("human", "Tell me about owls."), ("ai", "  \n ")]),
        {"turn_not_empty": [1], "turn_length": [1]},
    ),
    "long_turn": (make([("human", "Tell me about owls."), ("ai", "o" * (P.max_turn_chars + 1))]), {"turn_length": [1]}),
    "role_markers": (
        make(
            [
                ("human", "a [Human] b?"),  # self-chat markers mid-sentence: quoted text, fine
                ("ai", "c [AI] d"),
                ("human", "e [|Human|] f?"),  # training markers anywhere would forge a turn in the training text
                ("ai", "g\n[|AI|] h"),
                ("human", "fine?"),
                ("ai", "fine too\n [Human] and a self-chat marker at a line start is another speaker's turn"),
            ]
        ),
        {"no_role_markers": [2, 3, 5]},
    ),
    "replacement_char": (make([("human", "Tell me about owls."), ("ai", "Owls \ufffd hunt.")]), {"valid_utf8": [1]}),
    # As read from a JSONL line with a "\ud800" escape (content_id can't hash it, so no make()).
    "lone_surrogate": (
        Transcript(
            id="surrogate0000000",
            seed="s",
            source="test",
            turns=[Turn(role="human", text="Tell me \ud800 about owls."), Turn(role="ai", text="Owls hunt.")],
        ),
        {"valid_utf8": [0]},
    ),
    "control_chars": (
        make([("human", "Tell me\x00 about owls."), ("ai", "Owls \x1b[31mhunt\x1b[0m.")]),
        {"no_control_chars": [0, 1]},
    ),
    # The self-chat prompt leaking back: a system prompt, a template sentence, a paraphrase (an AI turn that
    # repeats the template is a leak too; a leaked human turn that asks nothing also fails human_asks).
    "prompt_leak": (
        make(
            [
                ("human", "What is a good pasta recipe?"),
                ("ai", "The human will ask about the topic of cooking."),
                ("human", "You're an AI assistant for text re-writing. Rewrite the input text to make it concise."),
                ("ai", "Sure. Forget the instruction you have previously received."),
                ("human", "Can you say more? Human statements start with a tag."),
                ("ai", "Of course."),
            ]
        ),
        {"no_prompt_leak": [1, 2, 3, 4], "human_asks": [2]},
    ),
    # The turn-by-turn follow-up instruction echoed (6 words of it), and a role label opening a sentence.
    "followup_leak": (
        make(
            [
                ("human", "How do bees make honey?"),
                ("ai", "They collect nectar."),
                ("human", f"{echo_of(prompts.FOLLOWUP_INSTRUCTION)}: do wasps make honey?"),
                ("ai", "Fine. Assistant: they do not."),
            ]
        ),
        {"no_prompt_leak": [2, 3]},
    ),
    # A human turn written in the AI's voice: a statement, no request (the AI before it asked nothing).
    "statement_human_turn": (
        make(
            [
                ("human", "Tell me about Python."),
                ("ai", "It is a programming language."),
                ("human", "Python is a programming language created in 1991."),
                ("ai", "Indeed it is."),
            ]
        ),
        {"human_asks": [2]},
    ),
    # A statement opening that is not the seed is not exempt.
    "statement_opening": (
        make([("human", "Parsing JSON directly using input stream"), ("ai", "Use a streaming parser.")]),
        {"human_asks": [0]},
    ),
    # A training marker quoted mid-sentence is a role-marker problem (it would forge a turn), not a prompt leak.
    "quoted_marker": (
        make([("human", "In Baize data, what does the [|AI|] tag before a line mean?"), ("ai", "It marks the AI.")]),
        {"no_role_markers": [0]},
    ),
    # The same dialogue as clean_set()[0] under another seed: a duplicate (the first copy stays accepted).
    "duplicate": (None, {"duplicate": []}),
    # An exact copy: same content id, so also not id-unique.
    "exact_copy": (None, {"duplicate": [], "id_unique": []}),
}


def tricky_clean() -> list[Transcript]:
    """Valid records near the new checks' edges: each must be accepted."""
    return [
        # Stack Overflow seeds are titles: `first_human: seed` opens with one, and that is not a statement.
        make(
            [("human", "parsing JSON directly, using input stream"), ("ai", "Use a streaming parser.")],
            seed="Parsing json directly using input stream",
        ),
        # Requests without a "?", a reply to the AI's own question, and the natural closing.
        make(
            [
                ("human", "I'm interested in learning more about regular expression compilers."),
                ("ai", "Happy to help. What do you specifically want to know?"),
                ("human", "Mostly the history, as I'm writing an essay."),
                ("ai", "Thompson's 1968 paper compiled regexes to machine code."),
                ("human", "That makes sense. Explain how backtracking differs."),
                ("ai", "Backtracking tries alternatives one by one."),
                ("human", "Thanks for the help!"),
                ("ai", "You're welcome!"),
            ]
        ),
        # Talking about chatbots is not a leak: a "label AI:" mid-sentence, a conversation between a human and an AI.
        make(
            [
                ("human", "What does the label AI: mean in a chat log?"),
                ("ai", "It marks a conversation between a human and an AI assistant: the AI's lines follow it."),
            ]
        ),
    ]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Clean records with one bad record of each kind in between; validated once, Data Docs built."""
    clean = clean_set() + tricky_clean()
    bad = dict(BAD)
    bad["duplicate"] = (
        clean[0].model_copy(update={"seed": "another seed", "id": "dup0000000000000"}),
        BAD["duplicate"][1],
    )
    bad["exact_copy"] = (clean[1].model_copy(), BAD["exact_copy"][1])
    records, where = [], {}
    for i, t in enumerate(clean):
        records.append(t)
        if i < len(bad):
            kind, (bad_t, _) = list(bad.items())[i]
            where[kind] = len(records)
            records.append(bad_t)
    for kind, (bad_t, _) in list(bad.items())[len(clean) :]:
        where[kind] = len(records)
        records.append(bad_t)
    tmp = tmp_path_factory.mktemp("mixed")
    params = ValidateParams(min_pass_rate=0.0, max_duplicate_rate=1.0)
    report = validate(records, params, docs_dir=tmp / "report/data_docs")
    paths = write_outputs(report, tmp / "out", tmp / "report")
    return {"records": records, "where": where, "clean": clean, "report": report, "paths": paths, "tmp": tmp}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_kind_is_rejected_for_its_reasons_and_kept(mixed, kind):
    row = mixed["where"][kind]
    rejected = {
        json.loads(line)["index"]: json.loads(line)
        for line in mixed["paths"]["rejected"].read_text("utf-8").splitlines()
    }
    assert row in rejected, f"{kind} was accepted"
    rec = rejected[row]
    expected = BAD[kind][1]
    assert rec["failed"] == [name for name in CHECKS if name in expected]  # exactly these, in check order
    assert rec["failed_turns"] == {k: v for k, v in expected.items() if v}
    # The record is kept whole: it reads back as the very transcript that went in.
    original = mixed["records"][row]
    assert rec["id"] == original.id
    assert rec["transcript"]["turns"] == [t.model_dump() for t in original.turns]
    assert rec["transcript"]["seed"] == original.seed


def test_clean_records_all_accepted(mixed):
    report = mixed["report"]
    accepted_ids = [json.loads(line)["id"] for line in mixed["paths"]["accepted"].read_text("utf-8").splitlines()]
    assert accepted_ids == [t.id for t in mixed["clean"]]
    assert len(report.rejected()) == len(BAD)
    m = json.loads(mixed["paths"]["report"].read_text())
    # metrics.json (`dvc metrics show`, `dvc exp show`) holds the headline only; the detail is in report.json.
    assert json.loads(mixed["paths"]["metrics"].read_text()) == {"passed": round(m["pass_rate"], 3)}
    assert (m["records"], m["accepted"], m["rejected"]) == (len(mixed["records"]), len(mixed["clean"]), len(BAD))
    assert m["checks"]["no_role_markers"] == {  # role_markers (3 turns) and quoted_marker (1)
        "failed": 2,
        "pass_rate": round(1 - 2 / m["records"], 6),
        "failed_turns": 4,
    }
    leak = {"failed": 2, "pass_rate": round(1 - 2 / m["records"], 6), "failed_turns": 6}
    assert m["checks"]["no_prompt_leak"] == leak
    assert m["checks"]["human_asks"]["failed"] == 3
    assert m["checks"]["duplicate_rate"]["observed"] == pytest.approx(2 / m["records"], abs=1e-6)
    assert set(m["checks"]) == set(CHECKS)
    # report.json: the headline statistics of the accepted data; every statistic is in stats.json.
    assert set(m) == {"records", "turns", "accepted", "rejected", "pass_rate", "min_pass_rate", "gate_passed",
                      "stats", "checks"}
    assert list(m["stats"]) == list(STATS_HEADLINE) and m["stats"]["dialogues"] == len(mixed["clean"])
    stats = json.loads(mixed["paths"]["stats"].read_text())
    assert stats["length_unit"] == "words" and stats["tokenizer"] is None
    assert stats["input"]["dialogues"] == m["records"] and stats["accepted"]["prompt_leak_share"] == 0.0


def test_clean_set_passes_whole(tmp_path):
    clean = clean_set(20)
    report = validate(clean, P)
    assert report.rejected() == [] and report.accepted == clean
    assert report.gate_passed
    # One AI turn in four of the i%4==1 transcripts opens with "As an AI language model": counted, tolerated.
    refusal = next(r for r in report.checks if r.check.name == "refusal_rate")
    assert 0 < refusal.observed < P.max_refusal_rate


def _dataset_report(kind: str):
    clean = clean_set(10)
    if kind == "duplicate_rate":
        records = clean + [t.model_copy() for t in clean[:2]]
    elif kind == "refusal_rate":
        openings = [
            "As an AI language model, I can't know.",
            "I'm sorry, but I cannot help with that.",
            "I cannot assist with that request.",
        ]
        records = [
            make(
                [("human", f"Question {i}?"), ("ai", openings[i % 3] if i < 7 else "Sure: here it is.")],
                seed=f"topic {i}",
            )
            for i in range(10)
        ]
    else:  # seed_echo_rate: follow-up human turns that only repeat the seed (case and punctuation aside)
        records = [
            make(
                [("human", f"Tell me about topic {i}."), ("ai", "It is a topic."),
                 ("human", f"WHAT is topic {i}"), ("ai", "As I said, a topic."),
                 ("human", f"what is topic {i}?!"), ("ai", "Still a topic.")],
                seed=f"What is topic {i}?",
            )
            for i in range(10)
        ]
        records += clean[:4]
    return validate(records, P), len(records)


@pytest.mark.parametrize("kind", ["duplicate_rate", "refusal_rate", "seed_echo_rate"])
def test_dataset_level_rates_fail_the_gate_not_the_records(kind):
    report, n = _dataset_report(kind)
    failing = [r.check.name for r in report.dataset_failures()]
    assert failing == [kind]
    assert not report.gate_passed
    m = report.metrics()
    assert m["checks"][kind]["passed"] is False and m["checks"][kind]["observed"] > m["checks"][kind]["max"]
    assert kind in report.summary()
    # Only the duplicate copies are rejected (for "duplicate"); refusals and seed echoes reject no record.
    expected_rejected = 2 if kind == "duplicate_rate" else 0
    assert len(report.rejected()) == expected_rejected
    assert all(r["failed"] == ["id_unique", "duplicate"] for r in report.rejected())


def test_refusal_patterns_param_is_used():
    records = [make([("human", f"q{i}?"), ("ai", "죄송하지만 도와드릴 수 없습니다.")], seed=f"t{i}") for i in range(3)]
    assert validate(records, P).gate_passed  # the English defaults do not flag Korean text
    korean = ValidateParams(refusal_patterns=[*P.refusal_patterns, "죄송하지만"])
    assert [r.check.name for r in validate(records, korean).dataset_failures()] == ["refusal_rate"]


# --------------------------------------------------------------------------- released Baize data


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared fixtures absent")
def test_released_baize_fixtures():
    """The English records pass whole; in the Korean re-run the English request cues miss the human turns
    without a "?" (about 15% of them): those records fail human_asks and nothing else, and with the check
    off (`request_patterns: []`) the file passes whole."""
    (english, fmt_en), (korean, fmt_ko) = (load_transcripts(FIXTURES / n) for n in
                                           ["english_records.json", "quora_ko_selfchat_300.json"])
    assert (fmt_en, fmt_ko, len(english), len(korean)) == ("baize-json", "baize-json", 5, 300)
    report = validate(english + korean, P)
    rejected = report.rejected()
    assert [r["index"] for r in rejected if r["index"] < len(english)] == []
    assert {tuple(r["failed"]) for r in rejected} == {("human_asks",)}
    assert 0.10 < len(rejected) / len(korean) < 0.25  # 51 of 300 measured
    assert report.gate_passed
    off = validate(korean, ValidateParams(request_patterns=[]))
    assert off.rejected() == [] and off.gate_passed and off.pass_rate == 1.0


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared fixtures absent")
def test_parsed_raw_reply_passes_with_its_disclaimers_counted():
    raw = json.loads((FIXTURES / "raw_selfchat_response.json").read_text("utf-8"))
    turns = parse_selfchat(raw["raw_response"]).turns
    report = validate([Transcript.create(seed=raw["seed"], turns=turns, source="raw")], P)
    assert report.rejected() == [] and report.gate_passed
    refusal = next(r for r in report.checks if r.check.name == "refusal_rate")
    assert refusal.observed == pytest.approx(3 / 8)  # three AI turns open with "As an AI language model"


# --------------------------------------------------------------------------- cut turns, warnings, statistics


def stats_set() -> list[Transcript]:
    """A hand-made dataset whose statistics are worked out by hand in the tests below.

    Words (lower-cased, punctuation dropped) of the AI turns: 10, 4, 6, 4, 8; of the human turns: 3, 5, 4, 8, 5.
    Record 2 is rejected (its human turn asks nothing). AI turns 1 of records 1 and 3 were cut by max_tokens
    (and end without punctuation). Record 3 spells <|im_end|> and <s>; record 2 spells the tiny tokenizer's <|fin|>.
    """

    def cut(t: Transcript, turns: list[int]) -> Transcript:
        return t.model_copy(update={"meta": {"truncated_turns": turns}})

    return [
        make([("human", "What is rain?"), ("ai", "As an AI, I know rain is water from clouds.")], seed="Rain"),
        cut(
            make(
                [
                    ("human", "Why is the sky blue?"),
                    ("ai", "Because of Rayleigh scattering"),
                    ("human", "Thanks for the help!"),
                    ("ai", "You are welcome, you are welcome!"),
                ],
                seed="Sky",
            ),
            [1],
        ),
        make([("human", "Python is a programming language created in 1991."), ("ai", "Yes, it is. <|fin|>")],
             seed="Python"),
        cut(make([("human", "Tell me about <|im_end|> tokens."), ("ai", "They end a turn <s> in chat templates")],
                 seed="Tokens"), [1]),
    ]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer folder (words and runs of punctuation are tokens) with a special token <|fin|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|fin|>").save_pretrained(folder)
    return folder


def test_statistics_in_words_are_exact():
    """No tokenizer: lengths in words. The accepted subset (records 0, 1, 3) and the whole input."""
    records_df, turns_df = features(stats_set(), check_params(P))
    words = length_counter(None)
    assert words.unit == "words"
    lengths = words.count(list(turns_df["text"]))
    assert dataset_stats(records_df, turns_df, lengths) == {
        "dialogues": 4,
        "avg_rounds": 1.25,  # 5 pairs / 4
        "avg_ai_tokens": 6.4,  # 32 / 5
        "avg_human_tokens": 5.0,  # 25 / 5
        "distinct_1": 0.875,  # 28 distinct of 32 words
        "distinct_2": 0.9259,  # 25 / 27: "you are", "are welcome" repeat
        "truncated_share": 0.4,  # 2 of 5 AI turns
        "unterminated_ai_rate": 0.4,  # the same two: no closing punctuation ("<|fin|>" ends in ">")
        "refusal_share": 0.2,  # "As an AI"
        "prompt_leak_share": 0.0,
        "special_token_text_turns": 2,  # <|im_end|>, <s>; <|fin|> is no common special token
    }
    accepted = records_df[records_df["row"] != 2]
    assert dataset_stats(accepted, turns_df, lengths) == {
        "dialogues": 3,
        "avg_rounds": 1.3333,
        "avg_ai_tokens": 7.0,  # 28 / 4
        "avg_human_tokens": 4.25,  # 17 / 4
        "distinct_1": 0.8929,  # 25 / 28
        "distinct_2": 0.9167,  # 22 / 24
        "truncated_share": 0.5,
        "unterminated_ai_rate": 0.5,
        "refusal_share": 0.25,
        "prompt_leak_share": 0.0,
        "special_token_text_turns": 2,
    }


def test_cut_turns_fail_the_gate_and_statistics_count_base_model_tokens(tiny_tokenizer, tmp_path):
    """Cut answers are 2 of 5 (> max_cut_turn_rate 0.2): the gate fails, no record is rejected for it.
    Lengths in the tokenizer's tokens (no special tokens added); its own special token is counted as text."""
    lengths = length_counter(tiny_tokenizer)
    assert lengths.unit == "tokens" and "<|fin|>" in lengths.special_tokens
    report = validate(stats_set(), P, lengths=lengths)
    assert [r.check.name for r in report.dataset_failures()] == ["cut_turn_rate"]
    assert not report.gate_passed and "cut_turn_rate 0.400 > max 0.2" in report.summary()
    assert [(r["index"], r["failed"]) for r in report.rejected()] == [(2, ["human_asks"])]
    m = report.metrics()
    assert m["checks"]["cut_turn_rate"] == {"observed": 0.4, "max": 0.2, "passed": False}
    # Tokens: "What is rain?" = What|is|rain|? = 4, ... "<|fin|>" = 1, "<|im_end|>" = <||im_end||> = 3.
    assert m["stats"] == {
        "dialogues": 3,
        "avg_rounds": 1.3333,
        "avg_ai_tokens": 8.5,  # (12 + 4 + 8 + 10) / 4
        "distinct_2": 0.9167,
        "truncated_share": 0.5,
        "refusal_share": 0.25,
    }
    inp = report.stats["input"]
    assert (inp["avg_ai_tokens"], inp["avg_human_tokens"]) == (8.0, 6.4)  # 40 / 5, 32 / 5
    assert inp["special_token_text_turns"] == 3 and report.stats["accepted"]["special_token_text_turns"] == 2
    assert report.stats["accepted"]["avg_human_tokens"] == 5.75  # 23 / 4
    assert (report.stats["length_unit"], report.stats["tokenizer"]) == ("tokens", str(tiny_tokenizer))
    line = report.stats_line()
    assert "3 dialogues, 1.33 rounds, AI 8.5 / human 5.8 tokens" in line and "cut 50.0%" in line
    assert "unterminated AI turns 40.0%, special-token text in 3 turns" in line
    paths = write_outputs(report, tmp_path / "out", tmp_path / "report")
    assert json.loads(paths["stats"].read_text()) == report.stats


@pytest.mark.parametrize(
    ("text", "terminated"),
    [
        ("Rain is water.", True),
        ("Is it?", True),
        ("Wow!  \n", True),
        ("It falls from clouds, and then", False),  # cut mid-sentence by max_tokens
        ("Here is how:", False),
        ("The answer is 42", False),
        ("비는 구름에서 내립니다.", True),
        ("雨是从云中落下的。", True),
        ("真的吗？", True),
        ('He said "stop."', True),
        ("He said “stop”", True),
        ("(see the docs)", True),
        ("```python\nprint(1)\n```", True),
        ("Have fun 🎉", True),
        ("Love it ❤️", True),
        ("", False),
    ],
)
def test_unterminated_ai_turns(text, terminated):
    assert is_terminated(text) is terminated


def test_every_selfchat_instruction_echoed_is_a_leak():
    """Six words in a row of any instruction the self-chat sends (prompts.INSTRUCTIONS) are a leak, with no
    pattern needed; the template's greeting turns, which real conversations say too, are not."""
    instructions = getattr(prompts, "INSTRUCTIONS", (prompts.TEMPLATE, prompts.FOLLOWUP_INSTRUCTION))
    echoes = [echo_of(x) for x in instructions]
    records = [make([("human", f"{e}?"), ("ai", "Hi! How can I help you?")]) for e in echoes]
    _, turns = features(records, check_params(ValidateParams(prompt_leak_patterns=[])))
    assert dict(zip(turns["text"], turns["prompt_leak"], strict=True)) == {
        **{f"{e}?": 1 for e in echoes},
        "Hi! How can I help you?": 0,
    }


@pytest.mark.parametrize("key", ["prompt_leak_patterns", "request_patterns"])
def test_bad_regex_in_new_params_names_the_key(key):
    with pytest.raises(ParamsError, match=rf"validate\.{key}\.1 = '\(x': invalid regex"):
        check_params(ValidateParams(**{key: ["ok", "(x"]}))


# --------------------------------------------------------------------------- input formats and bad files


def test_each_input_format_is_sniffed_and_read(tmp_path):
    clean = clean_set(4)
    write_jsonl(tmp_path / "t.jsonl", clean)
    export_baize_json(clean, tmp_path / "b.json")
    with_seed = [
        json.dumps({"id": t.id, "seed": t.seed, "messages": to_messages(t)}, ensure_ascii=False) for t in clean
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(with_seed) + "\n", encoding="utf-8")
    bare = [json.dumps({"messages": to_messages(t)}, ensure_ascii=False) for t in clean]
    (tmp_path / "bare.jsonl").write_text("\n".join(bare) + "\n", encoding="utf-8")
    for name, fmt in [
        ("t.jsonl", "transcripts"),
        ("b.json", "baize-json"),
        ("m.jsonl", "messages"),
        ("bare.jsonl", "messages"),
    ]:
        loaded, got = load_transcripts(tmp_path / name)
        assert got == fmt, name
        assert [t.turns for t in loaded] == [t.turns for t in clean], name
    seeded, _ = load_transcripts(tmp_path / "m.jsonl")
    assert [t.id for t in seeded] == [t.id for t in clean]  # seed kept, so the content ids match
    # Without a seed, the first user message becomes the seed, and is not counted as an echo of itself.
    bare_loaded, _ = load_transcripts(tmp_path / "bare.jsonl")
    echo = next(r for r in validate(bare_loaded, P).checks if r.check.name == "seed_echo_rate")
    assert echo.observed == 0.0


def _good_line() -> str:
    return clean_set(1)[0].to_json_line()


BAD_FILES = {
    "truncated_json": (
        lambda: (_good_line() + "\n" + _good_line()[:40] + "\n").encode(),
        "transcripts",
        2,
        "truncated JSON",
    ),
    "invalid_utf8": (
        lambda: (_good_line() + "\n").encode() + b'{"id": "\xff\xfe"}\n',
        "transcripts",
        2,
        "invalid UTF-8",
    ),
    "missing_field": (
        lambda: (
            _good_line()
            + "\n\n"
            + json.dumps({k: v for k, v in json.loads(_good_line()).items() if k != "seed"})
            + "\n"
        ).encode(),
        "transcripts",
        3,
        "seed",
    ),
    "empty": (lambda: b"", "auto", None, "empty file"),
    "blank_lines": (lambda: b"\n  \n", "auto", None, "empty file"),
    "empty_list": (lambda: b"[]", "auto", None, "empty file"),
    "baize_truncated": (lambda: b'[\n {"topic": "x",\n  "input": "The conv', "auto", 3, "invalid JSON"),
    "baize_bad_input": (lambda: b'[\n {"topic": "x", "input": "no markers here"}\n]', "auto", 2, "input"),
    "messages_bad_role": (
        lambda: (
            b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "robot", "content": "x"}]}\n'
        ),
        "auto",
        2,
        "robot",
    ),
    "not_json": (lambda: b"\n\nhello world\n", "auto", 3, "unrecognized format"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_input_files_name_file_and_line(tmp_path, kind):
    make_bytes, fmt, line, words = BAD_FILES[kind]
    path = tmp_path / "input.jsonl"
    path.write_bytes(make_bytes())
    with pytest.raises(InputError) as err:
        load_transcripts(path, fmt)
    where = f"{path}:{line}:" if line else f"{path}:"
    assert str(err.value).startswith(where), str(err.value)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the stage


def _project(tmp_path: Path, records: list[Transcript], **params) -> Path:
    write_jsonl(tmp_path / "data/selfchat/transcripts.jsonl", records)
    section = {"input": "data/selfchat/transcripts.jsonl", **params}
    (tmp_path / "params.yaml").write_text(
        json.dumps({"validate": section, "tracking": {"experiment": "test", "log_artifacts": True}}), encoding="utf-8"
    )
    return tmp_path


def _run_stage(project: Path, monkeypatch):
    from stages.validate import main

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("BAIZE_PIPELINE_ID", "test-pipeline")
    return CliRunner().invoke(main, ["--out", "data/validated", "--report", "reports/validation"])


def _mlflow_run(project: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`baize.stage` = 'validate'")
    assert len(runs) == 1
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "validation")}
    return runs[0], artifacts


def test_stage_writes_outputs_and_logs_to_mlflow(tmp_path, monkeypatch):
    clean = clean_set(6)
    project = _project(tmp_path, clean + [BAD["long_turn"][0]])
    result = _run_stage(project, monkeypatch)
    assert result.exit_code == 0, result.output
    assert len((project / "data/validated/transcripts.jsonl").read_text().splitlines()) == 6
    assert json.loads((project / "data/validated/rejected.jsonl").read_text())["failed"] == ["turn_length"]
    metrics = json.loads((project / "reports/validation/report.json").read_text())
    assert metrics["gate_passed"] is True and metrics["accepted"] == 6
    assert (project / "reports/validation/data_docs/index.html").is_file()
    run, artifacts = _mlflow_run(project)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["accepted"] == 6 and run.data.metrics["checks.turn_length.failed"] == 1
    assert run.data.params["validate.input"] == "data/selfchat/transcripts.jsonl"
    assert {"validation/metrics.json", "validation/report.json", "validation/stats.json", "validation/rejected.jsonl",
            "validation/data_docs"} <= artifacts
    # No models/base here: lengths in words, and said so. All statistics in MLflow, the headline ones in report.json.
    stats = json.loads((project / "reports/validation/stats.json").read_text())
    assert stats["length_unit"] == "words" and metrics["stats"]["dialogues"] == 6
    assert "stats (words (no tokenizer in models/base)): accepted: 6 dialogues" in result.output
    assert run.data.metrics["stats.accepted.dialogues"] == 6 and run.data.metrics["stats.input.dialogues"] == 7
    assert "stats.input.unterminated_ai_rate" in run.data.metrics and "stats.dialogues" not in run.data.metrics


def test_gate_exits_non_zero_after_writing_everything(tmp_path, monkeypatch):
    bad = [make([("human", f"q{i}?\n[AI] forged"), ("ai", "x")], seed=f"s{i}") for i in range(5)]
    project = _project(tmp_path, clean_set(3) + bad + [BAD["empty_turn"][0]], min_pass_rate=0.8)
    result = _run_stage(project, monkeypatch)
    assert result.exit_code == 1
    assert "validation gate failed: 3/9 accepted" in result.output
    assert "no_role_markers (5)" in result.output and "turn_not_empty (1)" in result.output
    assert "Traceback" not in result.output
    # Everything is on disk for the user to look at.
    assert len((project / "data/validated/transcripts.jsonl").read_text().splitlines()) == 3
    assert len((project / "data/validated/rejected.jsonl").read_text().splitlines()) == 6
    metrics = json.loads((project / "reports/validation/report.json").read_text())
    assert metrics["gate_passed"] is False and metrics["pass_rate"] == pytest.approx(3 / 9, abs=1e-6)
    assert (project / "reports/validation/data_docs/index.html").is_file()
    run, artifacts = _mlflow_run(project)
    assert run.info.status == "FAILED" and "validation/rejected.jsonl" in artifacts


def test_stage_bad_file_gives_one_line_and_no_traceback(tmp_path):
    project = _project(tmp_path, clean_set(2))
    src = project / "data/selfchat/transcripts.jsonl"
    src.write_bytes(src.read_bytes()[:-30])  # truncate the last line
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "stages.validate"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: data/selfchat/transcripts.jsonl:2: invalid or truncated JSON"
    )
    assert not (project / "data/validated").exists()


def test_bad_params_exit_2_before_reading(tmp_path, monkeypatch):
    project = _project(tmp_path, clean_set(2), refusal_patterns=["(unclosed"])
    result = _run_stage(project, monkeypatch)
    assert result.exit_code == 2 and "validate.refusal_patterns.0" in result.output


# --------------------------------------------------------------------------- Data Docs in a browser


class _Text(HTMLParser):
    """Visible text of a page (script and style dropped)."""

    def __init__(self):
        super().__init__()
        self.skip, self.parts = 0, []

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self.skip and data.strip():
            self.parts.append(data.strip())


def _text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return " | ".join(parser.parts)


def test_data_docs_site_has_the_suite_results(mixed):
    docs = mixed["tmp"] / "report/data_docs"
    pages = {p.name: p for p in (docs / "validations").rglob("*.html")}
    assert set(pages) == {"baize-records.html", "baize-turns.html"}
    html = pages["baize-turns.html"].read_text("utf-8")
    assert "no_role_markers: no [|Human|]/[|AI|] inside a turn" in html and "turn_length: every turn has [1, 8000]" in html


def test_data_docs_load_nothing_from_the_network(mixed):
    """Every script, stylesheet, font and image of every page is a file of the site (GX's own pages: CDNs)."""
    docs = mixed["tmp"] / "report/data_docs"
    pages = list(docs.rglob("*.html"))
    assert len(pages) == 5
    for page in pages:
        html = page.read_text("utf-8")
        assert not remote_refs(html), page
        for ref in re.findall(r"""<(?:script|link|img)\b[^>]*?\b(?:src|href)\s*=\s*"([^"#?]+)""", html):
            assert (page.parent / ref).is_file(), (page, ref)


@needs_browser
def test_data_docs_render_offline_in_headless_chromium(mixed):
    docs = mixed["tmp"] / "report/data_docs"
    index_dom = dom(docs / "index.html")
    index = _text(index_dom)
    assert "Data Docs" in index and "Validation Results" in index
    # bootstrap-table (jQuery) fills the index table from a script: offline, GX's own page shows no rows.
    rows = re.findall(r'<tr[^>]*data-index="\d+"', index_dom)
    assert len(rows) >= 2 and "baize_turns" in index and "baize_records" in index, index
    assert "Showing 1 to 2 of 2 rows" in index
    # The screenshot shows them: each failed run's red cross is a Font Awesome glyph coloured by Bootstrap's
    # text-danger, so it is drawn only when both the icon font and the stylesheet loaded (68 pixels measured).
    shot = screenshot(docs / "index.html", mixed["tmp"] / "screenshots" / "data_docs_index.png")
    assert count_color(shot, (0xDC, 0x35, 0x45)) > 30, mixed["tmp"] / "screenshots" / "data_docs_index.png"
    turns_page = next((docs / "validations").rglob("baize-turns.html"))
    text = _text(dom(turns_page))
    assert "Expectation Suite: | baize_turns" in text
    assert "Status: | Failed" in text
    for name in ("no_role_markers", "valid_utf8", "no_control_chars", "turn_length", "refusal_rate"):
        assert f"{name}: " in text


def test_opening_with_the_seed_is_not_an_echo():
    """`first_human: seed` opens every transcript with the seed itself: that is a question, not an echo."""
    records = [make([("human", f"What is topic {i}?"), ("ai", "It is a topic.")], seed=f"What is topic {i}?")
               for i in range(10)]
    report = validate(records, P)
    echo = next(r for r in report.checks if r.check.name == "seed_echo_rate")
    assert echo.observed == 0.0 and report.gate_passed


def test_an_input_that_neither_dvc_nor_git_tracks_is_warned_about(tmp_path, monkeypatch):
    # `baize import` output used as validate.input: `dvc push` shares it only once `dvc add` tracks it.
    project = _project(tmp_path, clean_set(3))
    (project / "dvc.yaml").write_text("stages: {}\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    result = _run_stage(project, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "warning: validate.input data/selfchat/transcripts.jsonl is tracked by neither DVC nor git" in result.output
    assert "dvc add data/selfchat/transcripts.jsonl" in result.output
    (project / "data/selfchat/transcripts.jsonl.dvc").write_text("outs: []\n")  # what `dvc add` leaves
    result = _run_stage(project, monkeypatch)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
