"""Transcript quality gate: a great-expectations suite over per-transcript and per-turn features.

Every input record ends up accepted or rejected, and a rejected record carries the name of every check it
failed. How:

1. `load_transcripts` reads pipeline transcripts, a released Baize JSON list or a `messages` JSONL file
   (bad files raise InputError naming file:line).
2. `features` turns the transcripts into two DataFrames: one row per transcript (`row` = its position in
   the input) and one row per turn (`row`, `turn`). Everything a check needs is a column there.
3. `run_suite` runs one GX expectation suite on each frame in an ephemeral context, with
   `result_format=COMPLETE` and the `row` (and `turn`) columns as `unexpected_index_column_names`, so GX's
   unexpected rows map straight back to records. It can also write the GX Data Docs site.
4. `validate` folds that into a `Report`: accepted records, rejected records with their failed checks,
   flat metrics, and the gate verdict.

Record-level checks (CHECKS, level "record") reject single transcripts. Dataset-level checks (level
"dataset": duplicate, refusal and seed-echo rates) fail the gate instead; the duplicate copies themselves
are still rejected, by the record-level `duplicate` check.

great_expectations is imported inside `run_suite` only: its import takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from baize.config import ValidateParams
from baize.errors import BaizeError, InputError, ParamsError
from baize.formats import from_messages, import_baize_json
from baize.transcript import Transcript, atomic_write_text, iter_json_lines, read_jsonl, write_jsonl

# --------------------------------------------------------------------------- the checks

# Role markers of the self-chat ([Human]) and training ([|Human|]) formats: inside a turn they would forge a
# turn boundary in the training text.
MARKER_REGEX = r"\[\|?(?:Human|AI)\|?\]"
# C0 and C1 control characters, except tab, newline and carriage return.
CONTROL_REGEX = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
# U+FFFD is what a decoder leaves for bytes that were not UTF-8; lone surrogates (JSON "\ud800") are
# replaced by it in the feature frame, so one check catches both.
REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Check:
    name: str
    kind: Literal["schema", "shape", "content", "dataset"]
    level: Literal["record", "dataset"]
    frame: Literal["records", "turns"]
    description: str
    """Shown in Data Docs; `{p.<param>}` fields are filled from ValidateParams."""

    def describe(self, p: ValidateParams) -> str:
        return f"{self.name}: {self.description.format(p=p)}"


# fmt: off
CHECKS: dict[str, Check] = {c.name: c for c in [
    #     name                kind       level      frame      description (Data Docs)
    Check("id_present",        "schema",  "record",  "records", "the transcript has a non-empty id"),
    Check("id_unique",         "schema",  "record",  "records", "no earlier transcript has the same id"),
    Check("roles_valid",       "schema",  "record",  "turns",   "every turn's role is human or ai"),
    Check("starts_with_human", "shape",   "record",  "records", "the first turn is a human turn"),
    Check("ends_with_ai",      "shape",   "record",  "records", "the last turn is an AI turn"),
    Check("roles_alternate",   "shape",   "record",  "records", "human and AI turns alternate"),
    Check("turn_count",        "shape",   "record",  "records", "has [{p.min_turns}, {p.max_turns}] turns"),
    Check("turn_not_empty",    "content", "record",  "turns",   "no turn is empty or only whitespace"),
    Check("turn_length",       "content", "record",  "turns",
          "every turn has [{p.min_turn_chars}, {p.max_turn_chars}] characters (stripped)"),
    Check("no_role_markers",   "content", "record",  "turns",   "no [Human]/[AI]/[|Human|]/[|AI|] inside a turn"),
    Check("valid_utf8",        "content", "record",  "turns",   "no U+FFFD or lone surrogate (was not UTF-8)"),
    Check("no_control_chars",  "content", "record",  "turns",   "no control characters other than tab/newline"),
    Check("duplicate",         "dataset", "record",  "records", "the turns do not repeat an earlier transcript's"),
    Check("duplicate_rate",    "dataset", "dataset", "records",
          "share of duplicate transcripts is at most {p.max_duplicate_rate}"),
    Check("refusal_rate",      "dataset", "dataset", "turns",
          "share of AI turns opening with a refusal is at most {p.max_refusal_rate}"),
    Check("seed_echo_rate",    "dataset", "dataset", "turns",
          "share of human turns only repeating the seed (the opening one never does) is at most {p.max_seed_echo_rate}"),
]}
# fmt: on


def check_params(p: ValidateParams) -> list[re.Pattern]:
    """Cross-field checks the schema can't express; returns the compiled refusal patterns."""
    if p.min_turns > p.max_turns:
        raise ParamsError(f"params.yaml: validate.min_turns = {p.min_turns}: must be <= max_turns ({p.max_turns})")
    if p.min_turn_chars > p.max_turn_chars:
        raise ParamsError(
            f"params.yaml: validate.min_turn_chars = {p.min_turn_chars}: must be <= max_turn_chars ({p.max_turn_chars})"
        )
    patterns = []
    for i, pat in enumerate(p.refusal_patterns):
        try:
            patterns.append(re.compile(pat, re.IGNORECASE))
        except re.error as e:
            raise ParamsError(f"params.yaml: validate.refusal_patterns.{i} = {pat!r}: invalid regex: {e}") from None
    return patterns


# --------------------------------------------------------------------------- reading


def sniff_format(path: Path) -> str:
    """`baize-json` if the file starts with `[`; `messages` if its first line is a JSON object with a
    `messages` key; else `transcripts` (whose reader then names the bad line if it is not one)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text = (raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw).strip()
            if text:
                break
        else:
            raise InputError(path, None, "empty file: no records")
    if text[:1] == b"[":
        return "baize-json"
    if text[:1] != b"{":
        raise InputError(
            path,
            lineno,
            "unrecognized format: expected a JSON list (Baize JSON) or JSON lines (transcripts or messages)",
        )
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "transcripts"  # its reader names the line and the problem
    return "messages" if isinstance(obj, dict) and "messages" in obj and "turns" not in obj else "transcripts"


def read_messages_jsonl(path: str | os.PathLike) -> list[Transcript]:
    """A Hugging Face `messages` JSONL file: `{"messages": [...]}` per line, optionally with `seed`/`seed_id`
    (what `baize.formats.to_hf_dataset(...).to_json()` writes). Without a seed, the first user message is the
    seed, and meta["seed_from_first_message"] says so (the opening human turn is never counted as a seed echo anyway)."""
    path = Path(path)
    out = []
    for lineno, obj in iter_json_lines(path):
        if not isinstance(obj, dict) or "messages" not in obj:
            raise InputError(path, lineno, "expected an object with a 'messages' list")
        seed, seed_id = obj.get("seed"), obj.get("seed_id")
        for key, value in (("seed", seed), ("seed_id", seed_id)):
            if value is not None and not isinstance(value, str):
                raise InputError(path, lineno, f"'{key}' must be a string or null")
        meta: dict[str, Any] = {"line": lineno}
        if seed is None:
            meta["seed_from_first_message"] = True
        try:
            t = from_messages(obj["messages"], seed, source=f"messages:{path.name}", seed_id=seed_id, meta=meta)
        except ValueError as e:
            raise InputError(path, lineno, str(e)) from None
        out.append(t)
    return out


def load_transcripts(path: str | os.PathLike, fmt: str = "auto") -> tuple[list[Transcript], str]:
    """Read the input in any supported format; returns (transcripts, the format used).

    Raises InputError (file:line) on a missing or empty file, bad UTF-8, bad JSON or a missing field.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "not found" if not path.exists() else "not a file")
    if fmt == "auto":
        fmt = sniff_format(path)
    readers = {"baize-json": import_baize_json, "messages": read_messages_jsonl, "transcripts": read_jsonl}
    if fmt not in readers:
        raise ParamsError(f"params.yaml: validate.input_format = {fmt!r}: unknown format")
    try:
        transcripts = list(readers[fmt](path))
    except UnicodeEncodeError:
        # A JSON "\ud800" escape decodes to a lone surrogate, which Transcript.create can't hash. (Pipeline
        # transcripts carry their id, so there the record is read and rejected by the valid_utf8 check.)
        raise InputError(path, None, "a lone surrogate escape (e.g. \\ud800) in the text: not valid UTF-8") from None
    if not transcripts:
        raise InputError(path, None, "empty file: no records")
    return transcripts, fmt


# --------------------------------------------------------------------------- features


def _normalize(text: str) -> str:
    """Case, width, punctuation and spacing folded away: for 'is this the same sentence' comparisons."""
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


def _content_key(t: Transcript) -> str:
    """Duplicates are judged on the dialogue only (not seed or id): the same turns under another seed
    are the same training sample."""
    payload = json.dumps([[x.role, " ".join(x.text.split()).casefold()] for x in t.turns], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def _is_refusal(text: str, patterns: Sequence[re.Pattern]) -> bool:
    opening = text.lstrip().replace("\u2019", "'")[:300]
    return any(p.match(opening) for p in patterns)


def features(transcripts: Sequence[Transcript], patterns: Sequence[re.Pattern]):
    """(records, turns) DataFrames: one row per transcript and one per turn, keyed by `row` (and `turn`)."""
    import pandas as pd

    seen_ids: Counter[str] = Counter()
    seen_content: set[str] = set()
    records, turns = [], []
    for row, t in enumerate(transcripts):
        seen_ids[t.id] += 1
        key = _content_key(t)
        duplicate = key in seen_content
        seen_content.add(key)
        roles = [x.role for x in t.turns]
        records.append(
            {
                "row": row,
                "id": t.id,
                "id_occurrence": seen_ids[t.id],
                "num_turns": len(t.turns),
                # "" rather than None: GX column-map checks skip nulls, and an empty transcript must fail.
                "first_role": roles[0] if roles else "",
                "last_role": roles[-1] if roles else "",
                "roles_alternate": int(all(a != b for a, b in pairwise(roles))),
                "is_duplicate": int(duplicate),
            }
        )
        seed_norm = _normalize(t.seed)
        # The opening human turn is never an echo: a conversation about a topic starts by asking it (the released
        # data paraphrases it, `first_human: seed` asks it verbatim, a messages file's seed is taken from it).
        # An echo is a later human turn that only repeats the seed: the self-chat ran out of questions.
        not_an_echo = roles.index("human") if "human" in roles else -1
        for i, x in enumerate(t.turns):
            text = re.sub("[\ud800-\udfff]", REPLACEMENT_CHAR, x.text)
            echo = refusal = math.nan  # NaN: not counted in the rate (human turns for refusals and vice versa)
            if x.role == "ai":
                refusal = float(_is_refusal(text, patterns))
            else:
                echo = float(i != not_an_echo and bool(seed_norm) and _normalize(text) == seed_norm)
            turns.append(
                {
                    "row": row,
                    "turn": i,
                    "role": x.role,
                    "text": text,
                    "chars": len(text.strip()),
                    "refusal": refusal,
                    "seed_echo": echo,
                }
            )
    record_cols = [
        "row",
        "id",
        "id_occurrence",
        "num_turns",
        "first_role",
        "last_role",
        "roles_alternate",
        "is_duplicate",
    ]
    turn_cols = ["row", "turn", "role", "text", "chars", "refusal", "seed_echo"]
    rec_df = pd.DataFrame(records, columns=record_cols)
    turn_df = pd.DataFrame(turns, columns=turn_cols)
    if turn_df.empty:  # keep numeric dtypes so the aggregate checks still run
        turn_df = turn_df.astype(
            {"row": "int64", "turn": "int64", "chars": "int64", "refusal": "float64", "seed_echo": "float64"}
        )
    return rec_df, turn_df


# --------------------------------------------------------------------------- the GX suite


def _expectations(gxe, p: ValidateParams) -> dict[str, Any]:
    """One GX expectation per check, on the frame the check names."""
    return {
        "id_present": gxe.ExpectColumnValueLengthsToBeBetween(column="id", min_value=1),
        "id_unique": gxe.ExpectColumnValuesToBeBetween(column="id_occurrence", min_value=1, max_value=1),
        "roles_valid": gxe.ExpectColumnValuesToBeInSet(column="role", value_set=["human", "ai"]),
        "starts_with_human": gxe.ExpectColumnValuesToBeInSet(column="first_role", value_set=["human"]),
        "ends_with_ai": gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["ai"]),
        "roles_alternate": gxe.ExpectColumnValuesToBeInSet(column="roles_alternate", value_set=[1]),
        "turn_count": gxe.ExpectColumnValuesToBeBetween(
            column="num_turns", min_value=p.min_turns, max_value=p.max_turns
        ),
        "turn_not_empty": gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=1),
        "turn_length": gxe.ExpectColumnValuesToBeBetween(
            column="chars", min_value=p.min_turn_chars, max_value=p.max_turn_chars
        ),
        "no_role_markers": gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=MARKER_REGEX),
        "valid_utf8": gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=REPLACEMENT_CHAR),
        "no_control_chars": gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=CONTROL_REGEX),
        "duplicate": gxe.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=[0]),
        "duplicate_rate": gxe.ExpectColumnMeanToBeBetween(column="is_duplicate", max_value=p.max_duplicate_rate),
        # The means skip NaN: the refusal rate is over AI turns only, the seed-echo rate over human turns.
        "refusal_rate": gxe.ExpectColumnMeanToBeBetween(column="refusal", max_value=p.max_refusal_rate),
        "seed_echo_rate": gxe.ExpectColumnMeanToBeBetween(column="seed_echo", max_value=p.max_seed_echo_rate),
    }


@dataclass
class CheckResult:
    check: Check
    success: bool
    rows: dict[int, list[int]] = field(default_factory=dict)
    """Record-level: failing record rows -> failing turn indices (empty for per-transcript checks)."""
    observed: float | None = None
    """Dataset-level: the observed rate."""
    threshold: float | None = None


def _gx_context(docs_dir: Path | None):
    """An ephemeral (in-memory) context; with docs_dir, its one Data Docs site writes HTML there."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["baize"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx, gx.get_context(project_config=config, mode="ephemeral")


def run_suite(records_df, turns_df, p: ValidateParams, docs_dir: str | os.PathLike | None = None) -> list[CheckResult]:
    """Run the suites (one per frame) and map GX's unexpected rows back to record rows.

    With `docs_dir`, the GX Data Docs site is (re)built there: the folder is emptied first, so it shows
    this run only.
    """
    docs_dir = Path(docs_dir) if docs_dir is not None else None
    gx, context = _gx_context(docs_dir)
    import great_expectations.expectations as gxe

    source = context.data_sources.add_pandas("baize")
    expectations = _expectations(gxe, p)
    frames = {"records": records_df, "turns": turns_df}
    index_columns = {"records": ["row"], "turns": ["row", "turn"]}
    thresholds = {
        "duplicate_rate": p.max_duplicate_rate,
        "refusal_rate": p.max_refusal_rate,
        "seed_echo_rate": p.max_seed_echo_rate,
    }
    results: list[CheckResult] = []
    for frame_name, df in frames.items():
        batch = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"baize_{frame_name}"))
        for name, check in CHECKS.items():
            if check.frame == frame_name:
                exp = expectations[name]
                exp.meta = {"baize_check": name, "level": check.level, "kind": check.kind}
                exp.description = check.describe(p)
                suite.add_expectation(exp)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"baize_{frame_name}", data=batch, suite=suite)
        )
        outcome = definition.run(
            batch_parameters={"dataframe": df},
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": index_columns[frame_name],
                "return_unexpected_index_query": False,
            },
        )
        for res in outcome.results:
            name = res.expectation_config.meta["baize_check"]
            if (res.exception_info or {}).get("raised_exception"):
                raise BaizeError(
                    f"validation check {name} could not run: {res.exception_info.get('exception_message')}"
                )
            check = CHECKS[name]
            out = CheckResult(check=check, success=bool(res.success))
            if check.level == "record":
                for hit in res.result.get("unexpected_index_list") or []:
                    turns = out.rows.setdefault(int(hit["row"]), [])
                    if "turn" in hit:
                        turns.append(int(hit["turn"]))
                if not out.success and not out.rows:  # never let a failure pass unattributed
                    raise BaizeError(f"validation check {name} failed but GX named no rows: {res.result}")
            else:
                value = res.result.get("observed_value")
                out.observed = None if value is None or math.isnan(value) else float(value)
                out.threshold = thresholds[name]
            results.append(out)
    if docs_dir is not None:
        shutil.rmtree(docs_dir, ignore_errors=True)
        context.build_data_docs(site_names=["baize"])
        # GX copies 3.3 MB of tutorial GIFs that no page links to (how-to buttons are off): don't keep or
        # log them to MLflow on every run.
        for gif in (docs_dir / "static" / "images").glob("*.gif"):
            gif.unlink()
    order = list(CHECKS)
    return sorted(results, key=lambda r: order.index(r.check.name))


# --------------------------------------------------------------------------- verdict


@dataclass
class Report:
    transcripts: list[Transcript]
    checks: list[CheckResult]
    min_pass_rate: float
    num_turns: int

    def failures(self) -> dict[int, dict[str, list[int]]]:
        """row -> {check name: failing turn indices ([] for per-transcript checks)}, in check order."""
        out: dict[int, dict[str, list[int]]] = {}
        for r in self.checks:
            for row, turns in r.rows.items():
                out.setdefault(row, {})[r.check.name] = sorted(turns)
        return out

    @property
    def accepted(self) -> list[Transcript]:
        failed = self.failures()
        return [t for i, t in enumerate(self.transcripts) if i not in failed]

    def rejected(self) -> list[dict[str, Any]]:
        """One dict per rejected record: its position, id, failed check names, failing turns, and the record."""
        out = []
        for row, fails in sorted(self.failures().items()):
            t = self.transcripts[row]
            out.append(
                {
                    "index": row,
                    "id": t.id,
                    "failed": list(fails),
                    "failed_turns": {k: v for k, v in fails.items() if v},
                    "transcript": t.model_dump(mode="json"),
                }
            )
        return out

    @property
    def pass_rate(self) -> float:
        return len(self.accepted) / len(self.transcripts) if self.transcripts else 0.0

    def dataset_failures(self) -> list[CheckResult]:
        return [r for r in self.checks if r.check.level == "dataset" and not r.success]

    @property
    def gate_passed(self) -> bool:
        return self.pass_rate >= self.min_pass_rate and not self.dataset_failures()

    def metrics(self) -> dict[str, Any]:
        """Counts, the pass rate of each record-level check and the rates of the dataset-level ones; two
        levels deep so `dvc metrics diff` shows e.g. `checks.turn_length.pass_rate`."""
        n = len(self.transcripts)
        accepted = len(self.accepted)
        checks: dict[str, Any] = {}
        for r in self.checks:
            if r.check.level == "record":
                entry: dict[str, Any] = {"failed": len(r.rows), "pass_rate": round(1 - len(r.rows) / n, 6)}
                if r.check.frame == "turns":
                    entry["failed_turns"] = sum(len(v) for v in r.rows.values())
            else:
                entry = {
                    "observed": None if r.observed is None else round(r.observed, 6),
                    "max": r.threshold,
                    "passed": r.success,
                }
            checks[r.check.name] = entry
        return {
            "records": n,
            "turns": self.num_turns,
            "accepted": accepted,
            "rejected": n - accepted,
            "pass_rate": round(accepted / n, 6) if n else 0.0,
            "min_pass_rate": self.min_pass_rate,
            "gate_passed": self.gate_passed,
            "checks": checks,
        }

    def summary(self, top: int = 5) -> str:
        """One paragraph: accepted share, the most frequent failed checks, failing dataset-level rates."""
        n = len(self.transcripts)
        parts = [f"{len(self.accepted)}/{n} accepted ({self.pass_rate:.1%}, min_pass_rate {self.min_pass_rate:.1%})"]
        counts = Counter(name for fails in self.failures().values() for name in fails)
        if counts:
            reasons = ", ".join(f"{name} ({c})" for name, c in counts.most_common(top))
            parts.append(f"top reasons: {reasons}")
        for r in self.dataset_failures():
            seen = "no turns to measure" if r.observed is None else f"{r.observed:.3f} > max {r.threshold}"
            parts.append(f"{r.check.name} {seen}")
        return "; ".join(parts)


class GateError(BaizeError):
    """The accepted share is under validate.min_pass_rate, or a dataset-level rate is over its max."""


def validate(transcripts: Sequence[Transcript], p: ValidateParams, docs_dir: str | os.PathLike | None = None) -> Report:
    """Run the suite on `transcripts`; the Report says which are accepted, why the others are not, and
    whether the gate passes. Raises nothing for bad data: that is the Report's job."""
    patterns = check_params(p)
    records_df, turns_df = features(transcripts, patterns)
    checks = run_suite(records_df, turns_df, p, docs_dir=docs_dir)
    return Report(list(transcripts), checks, p.min_pass_rate, len(turns_df))


def _json_line(obj: Any) -> str:
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep the record whole, \u-escaped
        line = json.dumps(obj, ensure_ascii=True)
    return line + "\n"


def write_outputs(report: Report, out_dir: str | os.PathLike, report_dir: str | os.PathLike) -> dict[str, Path]:
    """accepted -> out/transcripts.jsonl, rejected -> out/rejected.jsonl, metrics -> report/metrics.json."""
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    paths = {
        "accepted": out_dir / "transcripts.jsonl",
        "rejected": out_dir / "rejected.jsonl",
        "metrics": report_dir / "metrics.json",
    }
    write_jsonl(paths["accepted"], report.accepted)
    atomic_write_text(paths["rejected"], "".join(_json_line(r) for r in report.rejected()))
    atomic_write_text(paths["metrics"], json.dumps(report.metrics(), indent=2) + "\n")
    return paths
