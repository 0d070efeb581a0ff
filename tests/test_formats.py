import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baize.errors import BaizeError, InputError
from baize.formats import (
    AI,
    HUMAN,
    PREAMBLE,
    MarkerCollisionError,
    TrainingFormatError,
    export_baize_json,
    export_openai_jsonl,
    from_hf_records,
    from_messages,
    import_baize_json,
    import_openai_jsonl,
    parse_training,
    render_training,
    to_hf_dataset,
    to_messages,
)
from baize.transcript import Transcript, Turn

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "baize-original"


def fixture(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip("shared fixtures not available")
    return path


def turns_of(*texts):
    return [Turn(role="human" if i % 2 == 0 else "ai", text=t) for i, t in enumerate(texts)]


def transcript(*texts, seed="topic", meta=None):
    return Transcript.create(seed=seed, turns=turns_of(*texts), source="test", meta=meta)


# --- training text ---


def test_render_training_exact():
    text = render_training(turns_of("Hi there", "Hello!", "How are you?", "Fine."))
    assert text == (
        "The conversation between human and AI assistant.\n"
        "[|Human|] Hi there\n[|AI|] Hello!\n"
        "[|Human|] How are you?\n[|AI|] Fine.\n"
        "[|Human|] "
    )
    assert render_training([]) == PREAMBLE + "[|Human|] "
    assert render_training(turns_of("q", "a"), preamble="P\n") == "P\n[|Human|] q\n[|AI|] a\n[|Human|] "
    # A Transcript works too.
    assert render_training(transcript("q", "a")) == PREAMBLE + "[|Human|] q\n[|AI|] a\n[|Human|] "


def test_render_requires_alternation():
    with pytest.raises(TrainingFormatError, match="complete human/ai pairs"):
        render_training(turns_of("q", "a", "q2"))
    with pytest.raises(TrainingFormatError, match="expected 'human'"):
        render_training([Turn(role="ai", text="a"), Turn(role="human", text="q")])
    with pytest.raises(TrainingFormatError, match="turn 3"):
        render_training(turns_of("q", "a") + [Turn(role="human", text="q"), Turn(role="human", text="q")])


@pytest.mark.parametrize("marker", [HUMAN, AI, HUMAN + " ", AI + " "])
@pytest.mark.parametrize("where", [0, 1, 3])
def test_marker_in_turn_raises(marker, where):
    texts = ["q", "a", "q2", "a2"]
    texts[where] = f"look: {marker}forged"
    with pytest.raises(MarkerCollisionError, match=f"turn {where}"):
        render_training(turns_of(*texts))
    assert issubclass(MarkerCollisionError, BaizeError)


def test_marker_in_preamble_raises():
    with pytest.raises(MarkerCollisionError):
        render_training(turns_of("q", "a"), preamble="x [|AI|] y\n")


def test_parse_training_exact():
    text = PREAMBLE + "[|Human|]  two spaces \n\n[|AI|] a\nb\n\n[|Human|] "
    assert parse_training(text) == (PREAMBLE, turns_of(" two spaces \n", "a\nb\n"))
    assert parse_training("[|Human|] ") == ("", [])


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("no markers at all", "no '\\[\\|Human\\|\\] ' marker"),
        (PREAMBLE + "[|Human|] q\n[|AI|] a\n", "dangling"),
        (PREAMBLE + "[|Human|] q\n[|Human|] ", "without an"),
        (PREAMBLE + "[|Human|] q\n[|Human|] a\n[|Human|] ", "where '\\[\\|AI\\|\\]' was expected"),
        (PREAMBLE + "[|Human|] q\n[|AI|]a\n[|Human|] ", "not followed by a space"),
        (PREAMBLE + "[|Human|] q [|AI|] a\n[|Human|] ", "newline"),
        ("[|AI|] pre\n[|Human|] q\n[|AI|] a\n[|Human|] ", "before the first"),
        # A marker inside a turn is a boundary, never text: the AI turn before it is then malformed.
        (PREAMBLE + "[|Human|] q\n[|AI|] a [|Human|]x\n[|Human|] ", "turn 1: text does not end with a newline"),
    ],
)
def test_parse_training_rejects_malformed(text, pattern):
    with pytest.raises(TrainingFormatError, match=pattern):
        parse_training(text)


# Texts built from pieces near the markers, so near-collisions are common; real markers are filtered out.
_piece = st.sampled_from(
    ["[", "]", "|", "Human", "AI", "[Human]", "[AI]", "[|Human|", "|AI|]", "[|", "|]", " ", "\n", "\r\n", "\t",
     "é", "中文", "🙂", "\u2028", ""]
)
_text = st.one_of(st.text(), st.lists(st.one_of(_piece, st.text(max_size=3)), max_size=12).map("".join)).filter(
    lambda s: HUMAN not in s and AI not in s
)


@settings(max_examples=400)
@given(st.lists(st.tuples(_text, _text), max_size=5))
def test_render_parse_round_trip(pairs):
    turns = turns_of(*[t for pair in pairs for t in pair])
    text = render_training(turns)
    assert parse_training(text) == (PREAMBLE, turns)


@settings(max_examples=200)
@given(st.lists(st.tuples(_text, _text), min_size=1, max_size=4), st.data())
def test_marker_never_splits_silently(pairs, data):
    texts = [t for pair in pairs for t in pair]
    i = data.draw(st.integers(0, len(texts) - 1))
    marker = data.draw(st.sampled_from([HUMAN, AI]))
    cut = data.draw(st.integers(0, len(texts[i])))
    texts[i] = texts[i][:cut] + marker + data.draw(st.sampled_from([" ", "", "x"])) + texts[i][cut:]
    with pytest.raises(MarkerCollisionError):
        render_training(turns_of(*texts))


# --- released Baize JSON ---


def test_import_english_fixture():
    path = fixture("english_records.json")
    ts = import_baize_json(path)
    assert len(ts) == 5
    assert [len(t.turns) // 2 for t in ts] == [5, 2, 1, 1, 1]
    assert ts[0].seed == "What is the step by step guide to invest in share market in india?"
    assert ts[0].turns[0] == Turn(role="human", text="I want to know the step by step guide to invest in share market in India.")
    assert ts[0].source == "baize-json:english_records.json"
    assert ts[0].meta["preamble"] == PREAMBLE and ts[4].meta["record_index"] == 4
    # Code with blank lines and indentation stays inside one AI turn.
    assert ts[1].turns[3].text.startswith("Sure thing. Here's an example code snippet in Java:\n\nJsonReader")
    assert ts[1].turns[3].text.endswith("jsonReader.endArray();")
    assert ts[3].seed == "" and ts[3].meta["topic_null"] is True
    for t in ts:
        t.pairs()  # raises unless turns alternate human/ai


def test_import_korean_fixture():
    path = fixture("quora_ko_selfchat_300.json")
    ts = import_baize_json(path)
    assert len(ts) == 300
    counts = [len(t.pairs()) for t in ts]
    assert min(counts) == 1 and max(counts) == 6
    assert sum(counts) == sum(r["input"].count("[|AI|]") for r in json.loads(path.read_text(encoding="utf-8")))
    assert {t.meta["preamble"] for t in ts} == {"인간과 AI 어시스턴트 간의 대화입니다.\n"}
    assert all(t.turns and all(t.text for t in t.turns) for t in ts)
    assert len({t.id for t in ts}) > 290  # content ids tell records apart


@pytest.mark.parametrize("name, indent", [("english_records.json", 1), ("quora_ko_selfchat_300.json", None)])
def test_baize_json_round_trip(tmp_path, name, indent):
    path = fixture(name)
    original = json.loads(path.read_text(encoding="utf-8"))
    out = tmp_path / name
    assert export_baize_json(import_baize_json(path), out, indent=indent) == len(original)
    assert json.loads(out.read_text(encoding="utf-8")) == original  # same topic (null included) and input
    # With the matching layout the file itself comes back byte for byte.
    assert out.read_bytes() == path.read_bytes()


def test_export_baize_json_from_new_transcripts(tmp_path):
    out = tmp_path / "o.json"
    export_baize_json([transcript("q", "a", seed="s")], out)
    assert json.loads(out.read_text(encoding="utf-8")) == [
        {"topic": "s", "input": PREAMBLE + "[|Human|] q\n[|AI|] a\n[|Human|] "}
    ]


def test_baize_json_keeps_extra_keys(tmp_path):
    src = tmp_path / "in.json"
    recs = [{"topic": "t", "input": "[|Human|] q\n[|AI|] a\n[|Human|] ", "lang": "en"}]
    src.write_text(json.dumps(recs), encoding="utf-8")
    out = tmp_path / "out.json"
    export_baize_json(import_baize_json(src), out)
    assert json.loads(out.read_text(encoding="utf-8")) == recs


@pytest.mark.parametrize(
    "content, line, pattern",
    [
        ('[\n {"topic": "a", "input": "[|Human|] q\\n[|AI|] a\\n[|Human|] "},\n {"topic": "b", "input": "x"}\n]',
         3, "record 1: 'input': no"),
        ('[\n {"topic": "a", "input": "[|Human|] q\\n[|AI|] a\\n[|Human|] "},\n 7\n]', 3, "record 1: expected an object"),
        ('[\n {"topic": "a"}\n]', 2, "record 0: 'input' must be a string"),
        ('[\n {"topic": 3, "input": "[|Human|] "}\n]', 2, "'topic' must be a string or null"),
        ('[\n {"topic": "a", "input": "[|Human|] "},\n {"topic": "b", "input": \n', 4, "record 1: invalid JSON"),
        ('[\n {"topic": "a", "input": "[|Human|] "}\n {"topic": "b"}]', 3, "expected ',' or ']'"),
        ('{"topic": "a", "input": "[|Human|] "}', 1, "expected a JSON list"),
        ('[]\n[]', 2, "extra data"),
        ('[\n {"topic": "a", "input": "[|Human|] q\\n[|AI|] a [|Human|] "}\n]', 2, "record 0: 'input'"),
    ],
)
def test_import_baize_json_errors(tmp_path, content, line, pattern):
    p = tmp_path / "bad.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=pattern) as exc:
        import_baize_json(p)
    assert exc.value.line == line
    assert str(exc.value).startswith(f"{p}:{line}: ")


def test_import_baize_json_bad_utf8_and_missing(tmp_path):
    p = tmp_path / "bad.json"
    p.write_bytes(b'[\n{"topic": "\xff", "input": ""}]')
    with pytest.raises(InputError, match="UTF-8") as exc:
        import_baize_json(p)
    assert exc.value.line == 2
    with pytest.raises(InputError, match="cannot read"):
        import_baize_json(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    assert import_baize_json(tmp_path / "empty.json") == []


# --- OpenAI JSONL and messages ---


def test_messages_round_trip():
    t = transcript("q1", "a1", "q2 ü", "a2\nmulti", seed="q1", meta={"system": "Be brief."})
    msgs = to_messages(t)
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2 ü"},
        {"role": "assistant", "content": "a2\nmulti"},
    ]
    back = from_messages(msgs)
    assert back.turns == t.turns and back.seed == "q1" and back.meta["system"] == "Be brief."
    assert back.id == t.id
    assert to_messages(t, system="Other")[0] == {"role": "system", "content": "Other"}
    assert to_messages(transcript("q", "a"))[0]["role"] == "user"
    assert from_messages(msgs, seed="given").seed == "given"


@pytest.mark.parametrize(
    "msgs, pattern",
    [
        ([{"role": "tool", "content": "x"}], "message 0: role 'tool'"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "message 1: role 'system'"),
        ([{"role": "user", "content": ["part"]}], "message 0: 'content' must be a string"),
        (["user: hi"], "message 0: expected an object"),
        ("not a list", "must be a list"),
    ],
)
def test_from_messages_errors(msgs, pattern):
    with pytest.raises(ValueError, match=pattern):
        from_messages(msgs)


def test_openai_jsonl_round_trip(tmp_path):
    ts = [transcript("q1", "a1", seed="q1"), transcript("中文?", "答案\n", "q2", "a2", seed="中文?")]
    p = tmp_path / "ft.jsonl"
    assert export_openai_jsonl(ts, p, system="You are Baize.") == 2
    lines = p.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"messages": [
        {"role": "system", "content": "You are Baize."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
    ]}
    back = import_openai_jsonl(p)
    assert [b.turns for b in back] == [t.turns for t in ts]
    assert [b.id for b in back] == [t.id for t in ts]
    assert all(b.meta["system"] == "You are Baize." for b in back)
    assert back[1].source == "openai-jsonl:ft.jsonl" and back[1].meta["line"] == 2
    # Re-exporting without `system` keeps each transcript's own system message.
    p2 = tmp_path / "again.jsonl"
    export_openai_jsonl(back, p2)
    assert p2.read_bytes() == p.read_bytes()
    # And without any system message there is none.
    export_openai_jsonl(ts, p2)
    assert "system" not in p2.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}', "message 1: role 'bot'"),
        ('{"messages": [{"role": "user", "content": "q"}', "truncated JSON"),
        ('{"prompt": "q", "completion": "a"}', "'messages' list"),
        ('{"messages": {"role": "user"}}', "must be a list"),
    ],
)
def test_import_openai_jsonl_errors(tmp_path, bad, pattern):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    p = tmp_path / "ft.jsonl"
    p.write_text(good + "\n\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=pattern) as exc:
        import_openai_jsonl(p)
    assert exc.value.line == 3
    assert str(exc.value).startswith(f"{p}:3: ")


def test_hf_dataset_round_trip():
    ts = [transcript("q1", "a1", seed="s1", meta={"system": "sys"}), transcript("q2", "a2", "q3", "a3", seed="s2")]
    ds = to_hf_dataset(ts)
    assert ds.column_names == ["id", "seed", "messages"]
    assert ds.num_rows == 2
    assert ds[1]["messages"][2] == {"role": "user", "content": "q3"}
    back = from_hf_records(ds)
    assert [b.turns for b in back] == [t.turns for t in ts]
    assert [b.seed for b in back] == ["s1", "s2"]
    assert [b.id for b in back] == [t.id for t in ts]
    assert back[0].meta["system"] == "sys" and "system" not in back[1].meta
    with pytest.raises(ValueError, match="row 0: no 'messages'"):
        from_hf_records([{"text": "x"}])
    with pytest.raises(ValueError, match="row 1: message 0"):
        from_hf_records([{"messages": []}, {"messages": [{"role": "tool", "content": ""}]}])
