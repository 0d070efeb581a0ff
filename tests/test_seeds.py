"""The seed stage: packaged questions, file/Hub sources, normalization, de-duplication, weighted sampling."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from baize.config import SeedParams, SeedSource, parse_section
from baize.errors import BaizeError, InputError, ParamsError
from baize.seeds import (
    DROP_REASONS,
    PACKAGED_DOMAINS,
    LoadedSource,
    RawSeed,
    allocate,
    jaccard,
    load_file,
    load_hf,
    load_packaged,
    near_duplicates,
    normalize_text,
    prepare_seeds,
    read_seeds,
    seed_id,
    write_seeds,
)
from baize.seeds.dedupe import shingles
from benchmarks.seed_dedupe import brute_force  # the all-pairs baseline is the oracle

ROOT = Path(__file__).resolve().parents[1]


def _params(**kw) -> SeedParams:
    return SeedParams(**kw)


def _loaded(label: str, texts: list[str | None], weight: float = 1.0, domain: str = "general") -> LoadedSource:
    return LoadedSource(label, weight, [RawSeed(t, domain) for t in texts])


def _questions(domain: str, n: int | None = None) -> list[str]:
    return [r.text for r in load_packaged(domain)][:n]


# --------------------------------------------------------------------------- packaged set


def test_packaged_set_has_300_distinct_questions_in_four_domains():
    items = load_packaged("all")
    texts = [normalize_text(i.text) for i in items]
    assert len(texts) >= 300
    per_domain = {d: sum(i.domain == d for i in items) for d in PACKAGED_DOMAINS}
    assert set(per_domain) == {"general", "programming", "medical", "finance"}
    assert all(n >= 75 for n in per_domain.values()), per_domain
    assert all(10 <= len(t) <= 400 for t in texts)
    # Nothing is dropped by the stage's own filters: no exact or near duplicates among them.
    result = prepare_seeds(_params(num_seeds=len(texts)))
    assert result.dropped == dict.fromkeys(DROP_REASONS, 0)
    assert len(result.seeds) == len(texts)
    # And not even close ones: the most similar pair stays well under the threshold.
    sets = [shingles(t) for t in texts]
    worst = max(len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[:i])
    assert worst < 0.8


def test_packaged_domain_and_unknown_name():
    medical = load_packaged("medical")
    assert {i.domain for i in medical} == {"medical"} and len(medical) >= 75
    with pytest.raises(ParamsError, match="does not exist"):
        load_packaged("astrology")
    with pytest.raises(ParamsError, match=r"seed.sources.0 .*packaged seed set 'astrology' does not exist"):
        parse_section("seed", {"sources": [{"type": "packaged", "name": "astrology"}]})


# --------------------------------------------------------------------------- normalize and filter


def test_normalization_and_filters_are_counted_by_reason():
    src = _loaded("file:a", [
        "  How do   I\tlearn\nPython?  ",       # kept, whitespace normalized
        "",                                      # empty
        "   ",                                   # empty
        None,                                    # empty (null field)
        "?!?!?!?!?!?!",                          # empty: no letters or digits
        "Why?",                                  # too_short
        "What " + "very " * 100 + "long?",       # too_long
        "Tell me about [AI] markers please",     # marker
    ])
    result = prepare_seeds(_params(num_seeds=10, max_chars=200), [src])
    assert [s.text for s in result.seeds] == ["How do I learn Python?"]
    assert result.dropped == {**dict.fromkeys(DROP_REASONS, 0), "empty": 4, "too_short": 1, "too_long": 1, "marker": 1}
    assert result.loaded == {"file:a": 8}
    s = result.seeds[0]
    assert s.id == seed_id("How do I learn Python?") and len(s.id) == 16 and s.source == "file:a"
    assert normalize_text("\ufeffWhat\u200b is\xa0a  BOM?\r\n") == "What is a BOM?"


def test_domain_filter():
    srcs = [_loaded("p:med", _questions("medical", 10), domain="medical"),
            _loaded("p:fin", _questions("finance", 10), domain="finance")]
    result = prepare_seeds(_params(num_seeds=50, domains=["finance"]), srcs)
    assert {s.domain for s in result.seeds} == {"finance"} and len(result.seeds) == 10
    assert result.dropped["domain"] == 10


# --------------------------------------------------------------------------- duplicates


def test_exact_and_near_duplicates_keep_the_first():
    a = _loaded("a", [
        "What is the best way to learn Python?",
        "What is the best way to learn Python?",      # exact duplicate
        "what is the best way to learn python",       # case + punctuation: near (1.0)
        "What's the best way to learn Python?",       # near (0.87)
        "What are the symptoms of Cowden syndrome?",
        "What are the symptoms of Cohen syndrome?",   # similar template, a different disease: kept (0.83)
    ])
    b = _loaded("b", ["What is the best way to learn Python??", "How do bees make honey?"])
    result = prepare_seeds(_params(num_seeds=100), [a, b])
    texts = {s.text: s.source for s in result.seeds}
    assert texts == {
        "What is the best way to learn Python?": "a",
        "What are the symptoms of Cowden syndrome?": "a",
        "What are the symptoms of Cohen syndrome?": "a",
        "How do bees make honey?": "b",
    }
    assert result.dropped["duplicate"] == 1 and result.dropped["near_duplicate"] == 3
    # The threshold is the knob: at 1.0 only case/punctuation/spacing variants are merged.
    strict = prepare_seeds(_params(num_seeds=100, near_duplicate_threshold=1.0), [a, b])
    assert strict.dropped["near_duplicate"] == 2
    assert "What's the best way to learn Python?" in {s.text for s in strict.seeds}


@pytest.mark.parametrize("threshold", [0.6, 0.85, 1.0])
def test_near_duplicates_agree_with_brute_force(threshold):
    rng = random.Random(7)
    base = _questions("all")[:120]
    texts = list(base)
    for _ in range(150):  # perturbed copies: case, a dropped word, a swapped word, punctuation
        words = rng.choice(base).split()
        op = rng.randrange(4)
        if op == 0:
            words = [w.upper() for w in words]
        elif op == 1 and len(words) > 5:
            del words[rng.randrange(len(words))]
        elif op == 2:
            words[rng.randrange(len(words))] = rng.choice(["cat", "data", "money", "heart"])
        texts.append(" ".join(words) + rng.choice(["", "!", " ?"]))
    texts = list(dict.fromkeys(texts))
    found = near_duplicates(texts, threshold)
    assert set(found) == brute_force(texts, threshold)
    assert all(j < i and jaccard(texts[i], texts[j]) >= threshold - 1e-9 for i, j in found.items())


# --------------------------------------------------------------------------- sampling


def test_allocate_by_weight_with_redistribution():
    assert allocate(40, [3, 1], [100, 100]) == [30, 10]
    assert allocate(10, [1, 1, 1], [100, 100, 100]) == [4, 3, 3]  # largest remainder, ties to the first
    assert allocate(20, [1, 1], [5, 100]) == [5, 15]             # what one lacks goes to the other
    assert allocate(50, [1, 2], [5, 10]) == [5, 10]              # fewer than asked: all there is


def test_weights_are_respected_in_the_sample():
    gen = _loaded("gen", _questions("general"), weight=3.0)
    prog = _loaded("prog", _questions("programming"), weight=1.0, domain="programming")
    result = prepare_seeds(_params(num_seeds=40), [gen, prog])
    counts = result.metrics()["sampled"]["by_source"]
    assert counts == {"gen": 30, "prog": 10}
    small = _loaded("small", _questions("finance", 5), domain="finance")
    result = prepare_seeds(_params(num_seeds=20), [small, prog])
    assert result.metrics()["sampled"]["by_source"] == {"small": 5, "prog": 15}


def test_sampling_is_deterministic_and_stable():
    srcs = [_loaded("a", _questions("general")), _loaded("b", _questions("medical"), domain="medical")]
    one = prepare_seeds(_params(num_seeds=20, random_seed=1), srcs)
    again = prepare_seeds(_params(num_seeds=20, random_seed=1), srcs)
    assert one.seeds == again.seeds
    other = prepare_seeds(_params(num_seeds=20, random_seed=2), srcs)
    assert {s.id for s in other.seeds} != {s.id for s in one.seeds}
    # Row order of the input does not change the pick; more seeds keep the earlier ones.
    reversed_srcs = [LoadedSource(s.label, s.weight, s.items[::-1]) for s in srcs]
    assert prepare_seeds(_params(num_seeds=20, random_seed=1), reversed_srcs).seeds == one.seeds
    more = prepare_seeds(_params(num_seeds=40, random_seed=1), srcs)
    assert {s.id for s in one.seeds} < {s.id for s in more.seeds}


# --------------------------------------------------------------------------- file formats

QUESTIONS = ["How do bees make honey?", "What causes kidney stones?", "How do I rename a local Git branch?"]


def test_each_file_format_loads_the_same_questions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "q.txt").write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"q": q, "n": i}) + "\n" for i, q in enumerate(QUESTIONS)))
    (tmp_path / "q.json").write_text(json.dumps([{"topic": q} for q in QUESTIONS]))
    (tmp_path / "q.csv").write_text('id,question\n1,"How do bees make honey?"\n2,What causes kidney stones?\n'
                                    '3,"How do I rename a local Git branch?"\n', encoding="utf-8")
    pq.write_table(pa.table({"question": QUESTIONS, "other": [1, 2, 3]}), tmp_path / "q.parquet")
    (tmp_path / "nested.jsonl").write_text(json.dumps({"questions": {"text": QUESTIONS[:2]}}) + "\n")
    cases = [("q.txt", None), ("q.jsonl", "q"), ("q.json", "topic"), ("q.csv", "question"), ("q.parquet", "question")]
    for name, field in cases:
        got = [r.text for r in load_file(tmp_path / name, field=field, domain="x")]
        assert got == QUESTIONS, name
    assert [r.text for r in load_file(tmp_path / "nested.jsonl", field="questions.text")] == QUESTIONS[:2]
    assert [r.text for r in load_file(tmp_path / "nested.jsonl", field="questions.text.1")] == QUESTIONS[1:2]
    assert len(load_file(tmp_path / "q.txt", limit=2)) == 2
    # Through params: a file source with its own domain and label.
    params = _params(num_seeds=5, sources=[SeedSource(type="file", name=str(tmp_path / "q.csv"), field="question",
                                                      domain="mixed")])
    result = prepare_seeds(params)
    assert {(s.source, s.domain) for s in result.seeds} == {(f"file:{tmp_path / 'q.csv'}", "mixed")}


@pytest.mark.parametrize(
    ("name", "content", "field", "where", "what"),
    [
        ("bad.jsonl", '{"q": "How do bees make honey?"}\n\n{"q": "ok?" \n', "q", "bad.jsonl:3", "invalid JSON"),
        ("bad.jsonl", '{"q": "How do bees make honey?"}\n{"text": "x"}\n', "q", "bad.jsonl:2", "missing field 'q'"),
        ("bad.jsonl", '{"q": 42}\n', "q", "bad.jsonl:1", "is int, expected a string"),
        ("bad.csv", "id,question\n1,fine question here\n2,too,many\n", "question", "bad.csv:3", "expected 2 columns"),
        ("bad.csv", 'id,question\n1,"unclosed quote\n', "question", "bad.csv:", "malformed CSV"),
        ("bad.csv", "id,title\n1,How do bees make honey?\n", "question", "bad.csv:1", "missing field 'question'"),
        ("bad.json", '[{"topic": "a"},\n {"topic": }]', "topic", "bad.json:2", "invalid JSON"),
        ("bad.txt", b"How do bees make honey?\nbad \xff byte\n", None, "bad.txt:2", "not valid UTF-8"),
    ],
)
def test_bad_file_lines_name_file_and_line(tmp_path, name, content, field, where, what):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as err:
        load_file(path, field=field)
    message = str(err.value)
    assert where in message and what in message, message
    assert "\n" not in message


def test_parquet_missing_or_wrong_field_and_field_required(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"title": ["How do bees make honey?"], "n": [1]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"t\.parquet: missing field 'question' \(columns: title, n\)"):
        load_file(tmp_path / "t.parquet", field="question")
    with pytest.raises(InputError, match="has type int64, expected a string column"):
        load_file(tmp_path / "t.parquet", field="n")
    with pytest.raises(ParamsError, match=r"seed.sources.0.field: required for a parquet seed file"):
        load_file(tmp_path / "t.parquet", key="seed.sources.0")
    with pytest.raises(InputError, match="seed file not found"):
        load_file(tmp_path / "nope.txt")
    (tmp_path / "q.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown seed file type '.xlsx'"):
        load_file(tmp_path / "q.xlsx")


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.timeout(120)
def test_hf_source_offline_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    t0 = time.monotonic()
    with pytest.raises(BaizeError) as err:
        load_hf("AnonymousSub/MedQuAD_47441_Question_Answer_Pairs")
    assert time.monotonic() - t0 < 60
    message = str(err.value)
    assert "hf seed source 'AnonymousSub/MedQuAD_47441_Question_Answer_Pairs'" in message
    assert "offline" in message and "type: file" in message and "\n" not in message
    with pytest.raises(ParamsError, match=r"seed.sources.0.field: required for Hub dataset 'someone/questions'"):
        load_hf("someone/questions", key="seed.sources.0")


@pytest.mark.timeout(120)
def test_hf_source_reads_a_local_dataset_folder(tmp_path, monkeypatch):
    """The success path of `type: hf` (a dataset folder works offline): nested field, domain, limit."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    folder = tmp_path / "quora-like"
    folder.mkdir()
    rows = [{"questions": {"id": [2 * i, 2 * i + 1], "text": [q, q.upper()]}, "is_duplicate": True}
            for i, q in enumerate(QUESTIONS)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_hf(str(folder), field="questions.text.0", domain="general")
    assert [r.text for r in got] == QUESTIONS and {r.domain for r in got} == {"general"}
    assert len(load_hf(str(folder), field="questions.text", limit=4)) == 4
    with pytest.raises(InputError, match=r"missing field 'title' \(columns: questions, is_duplicate\)"):
        load_hf(str(folder), field="title")


# --------------------------------------------------------------------------- seeds.jsonl


def test_write_and_read_seeds_roundtrip(tmp_path):
    result = prepare_seeds(_params(num_seeds=5))
    path = tmp_path / "s" / "seeds.jsonl"
    write_seeds(path, result.seeds)
    assert read_seeds(path) == result.seeds
    assert not list(path.parent.glob("*.tmp"))
    path.write_text(path.read_text() + '{"id": "x", "text": "y"}\n')
    with pytest.raises(InputError, match=r"seeds.jsonl:6: not a seed record"):
        read_seeds(path)


# --------------------------------------------------------------------------- the stage


def _stage(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "BAIZE_PIPELINE_ID": "test-seed"}
    return subprocess.run([sys.executable, "-m", "stages.seed", "--out", "data/seeds/seeds.jsonl", *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=180)


def _workdir(tmp_path: Path, seed_section: str | None = None) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    if seed_section is not None:
        text = (tmp_path / "params.yaml").read_text()
        head, _, _ = text.partition("\nseed:\n")
        (tmp_path / "params.yaml").write_text(head + "\nseed:\n" + seed_section)
    return tmp_path


@pytest.mark.timeout(180)
def test_stage_writes_seeds_metrics_and_mlflow_run(tmp_path):
    work = _workdir(tmp_path)
    n = yaml.safe_load((work / "params.yaml").read_text())["seed"]["num_seeds"]  # the default profile's count
    proc = _stage(work)
    assert proc.returncode == 0, proc.stderr
    seeds = read_seeds(work / "data/seeds/seeds.jsonl")
    assert len(seeds) == n and len({s.id for s in seeds}) == n
    assert {s.source for s in seeds} == {"packaged:all"} and len({s.domain for s in seeds}) >= 3
    # The details in report.json; the seconds only in the untracked run.json.
    assert not (work / "reports/seed/metrics.json").exists()  # no headline: `dvc exp show` keeps to 120 columns
    metrics = json.loads((work / "reports/seed/report.json").read_text())
    assert "seconds" not in metrics and "seconds" in json.loads((work / "reports/seed/run.json").read_text())
    assert metrics["written"] == n and metrics["loaded"] == {"packaged:all": len(load_packaged("all"))}
    assert set(metrics["dropped"]) == set(DROP_REASONS)
    assert sum(metrics["sampled"]["by_domain"].values()) == n

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.data.tags.get("baize.stage") == "seed" and r.data.tags.get("baize.kind") == "stage"]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["written"] == n and run.data.metrics["loaded.packaged:all"] == metrics["loaded_total"]
    assert run.data.params["seed.num_seeds"] == str(n)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"seeds.jsonl", "report.json", "run.json"}

    # Same params, same file (byte for byte).
    first = (work / "data/seeds/seeds.jsonl").read_bytes()
    assert _stage(work).returncode == 0
    assert (work / "data/seeds/seeds.jsonl").read_bytes() == first


@pytest.mark.timeout(180)
def test_stage_shortfall_warns_and_zero_fails(tmp_path):
    (tmp_path / "a").mkdir()
    work = _workdir(tmp_path / "a", "  sources: [{type: packaged, name: finance}]\n  num_seeds: 500\n")
    proc = _stage(work)
    assert proc.returncode == 0, proc.stderr
    n = len(load_packaged("finance"))
    assert f"seed.num_seeds is 500 but only {n} seeds are available" in proc.stderr
    assert len(read_seeds(work / "data/seeds/seeds.jsonl")) == n

    (tmp_path / "b").mkdir()
    work = _workdir(tmp_path / "b", "  domains: [astrology]\n")
    proc = _stage(work)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no seeds left" in proc.stderr and f"domain {len(load_packaged('all'))}" in proc.stderr
    assert not (work / "data").exists() and not (work / "reports").exists()


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("  num_seeds: -3\n", "seed.num_seeds = -3"),
        ("  num_seed: 24\n", "unknown key 'seed.num_seed'"),
        ("  sources: [{type: file, name: seeds.csv, weight: -1}]\n", "seed.sources.0.weight = -1"),
    ],
)
def test_stage_bad_params_exit_2_and_write_nothing(tmp_path, section, expected):
    work = _workdir(tmp_path, section)
    proc = _stage(work)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (work / "data").exists() and not (work / "reports").exists() and not (work / "mlflow.db").exists()
