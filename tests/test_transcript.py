import json
import os

import pytest
from pydantic import ValidationError

from baize.errors import InputError
from baize.transcript import Transcript, Turn, read_jsonl, write_jsonl


def make(seed="What is DVC?", texts=("What is DVC?", "A data version control tool."), **kw):
    turns = [Turn(role="human" if i % 2 == 0 else "ai", text=t) for i, t in enumerate(texts)]
    return Transcript.create(seed=seed, turns=turns, source=kw.pop("source", "selfchat:local"), **kw)


def test_id_is_content_derived_and_stable():
    a = make()
    assert len(a.id) == 16 and int(a.id, 16) >= 0
    # Same seed and turns, different origin: same id.
    b = make(source="openai-jsonl:x.jsonl", meta={"model": "m"}, seed_id="q7")
    assert a.id == b.id
    assert make(seed="other").id != a.id
    assert make(texts=("What is DVC?", "Something else.")).id != a.id
    # Role is part of the content.
    swapped = Transcript.create(
        seed=a.seed, turns=[Turn(role="ai", text=t.text) for t in a.turns], source="x"
    )
    assert swapped.id != a.id
    # Known value: guards against the hash recipe changing silently (ids are stored on disk).
    assert a.id == "7e73d48854b0c9db"
    assert a.id == Transcript.content_id("What is DVC?", a.turns)


def test_create_accepts_dicts_and_copies_meta():
    meta = {"backend": "local"}
    t = Transcript.create(seed="s", turns=[{"role": "human", "text": "h"}, {"role": "ai", "text": "a"}],
                          source="x", meta=meta)
    assert t.turns == [Turn(role="human", text="h"), Turn(role="ai", text="a")]
    t.meta["extra"] = 1
    assert meta == {"backend": "local"}


def test_structure_is_strict_content_is_not():
    with pytest.raises(ValidationError):
        Turn(role="assistant", text="x")
    with pytest.raises(ValidationError):
        Turn(role="human", text="x", weight=1)
    with pytest.raises(ValidationError):
        Transcript(id="x", seed="s", source="x", turns=[], bogus=1)
    # Marker-like content is allowed here; the validation stage judges it.
    t = make(texts=("[Human] hi [|AI|]", "[AI] ok"))
    assert t.turns[0].text == "[Human] hi [|AI|]"


def test_pairs():
    t = make(texts=("h1", "a1", "h2", "a2"))
    assert t.pairs() == [("h1", "a1"), ("h2", "a2")]
    assert make(texts=()).pairs() == []
    with pytest.raises(ValueError, match="odd"):
        make(texts=("h1", "a1", "h2")).pairs()
    bad = Transcript.create(seed="s", turns=[Turn(role="ai", text="a"), Turn(role="human", text="h")], source="x")
    with pytest.raises(ValueError, match="expected human/ai"):
        bad.pairs()


def test_json_line_round_trip_keeps_unicode_raw():
    t = make(seed="Ünïcode 中文", texts=("line\nbreak\u2028sep", "tab\there \"quoted\""),
             meta={"usage": {"prompt_tokens": 3}, "dropped": [{"reason": "preamble", "text": "x"}]})
    line = t.to_json_line()
    assert "\n" not in line and "中文" in line
    assert Transcript.from_json_line(line) == t


def test_write_read_jsonl_round_trip(tmp_path):
    ts = [make(), make(seed="second", texts=("q\u2028with LS", "a\r\nwith CRLF"), meta={"raw": "é"})]
    p = tmp_path / "sub" / "t.jsonl"
    assert write_jsonl(p, ts) == 2
    assert list(read_jsonl(p)) == ts
    raw = p.read_bytes()
    assert raw.count(b"\n") == 2 and "é".encode() in raw
    assert os.listdir(p.parent) == ["t.jsonl"]  # no temp file left behind


def test_write_jsonl_is_atomic(tmp_path):
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [make()])
    before = p.read_bytes()

    def boom():
        yield make(seed="new")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(p, boom())
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.jsonl"]


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n" + make().to_json_line() + "\n\n  \n", encoding="utf-8")
    assert [t.id for t in read_jsonl(p)] == [make().id]


@pytest.mark.parametrize(
    "bad_line, line_no, pattern",
    [
        (None, 2, "truncated JSON"),
        ('{"id": "x", "seed": "s", "source": "x", "turns": [{"role": "bot", "text": "t"}]}', 2, r"turns\.0\.role"),
        ('{"id": "x", "source": "x", "turns": []}', 2, r"seed: Field required"),
        ('{"id": "x", "seed": "s", "source": "x", "turns": [], "extra": 1}', 2, r"extra: Extra inputs"),
        ("[1, 2]", 2, r"invalid transcript"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, line_no, pattern):
    good = make().to_json_line()
    if bad_line is None:
        bad_line = good[: len(good) // 2]  # a write cut short
    p = tmp_path / "t.jsonl"
    p.write_text(good + "\n" + bad_line + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=pattern) as exc:
        list(read_jsonl(p))
    assert exc.value.line == line_no
    assert str(exc.value).startswith(f"{p}:{line_no}: ")


def test_read_jsonl_invalid_utf8(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(make().to_json_line().encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    with pytest.raises(InputError, match="UTF-8") as exc:
        list(read_jsonl(p))
    assert exc.value.line == 2


def test_read_jsonl_json_is_plain(tmp_path):
    # The stored form is plain JSON other tools can read.
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [make()])
    obj = json.loads(p.read_text(encoding="utf-8"))
    assert set(obj) == {"id", "seed", "seed_id", "source", "turns", "meta"}
    assert obj["turns"][1] == {"role": "ai", "text": "A data version control tool."}


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_json_error_at_the_end_of_a_line_names_its_real_column(tmp_path, newline):
    """The line end is not part of the JSON: `{"id": "x", "text": ` misses its value at column 21 of line 2, not
    at column 1 of a line that does not exist."""
    from baize.errors import InputError
    from baize.transcript import iter_json_lines
    from stages.selfchat import read_seeds

    bad = '{"id": "x", "text": ' + newline
    good = json.dumps({"id": "a", "text": "fine"}) + newline
    path = tmp_path / "seeds.jsonl"
    path.write_text(good + bad + good.replace('"a"', '"b"'), newline="")
    with pytest.raises(InputError) as info:
        read_seeds(path)
    assert str(info.value) == f"{path}:2: invalid JSON: Expecting value (column 21)"
    with pytest.raises(InputError, match=r"transcripts.jsonl:2: invalid or truncated JSON: Expecting value \(column 21\)"):
        (tmp_path / "transcripts.jsonl").write_text(good + bad, newline="")
        list(iter_json_lines(tmp_path / "transcripts.jsonl"))
