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

Record-level checks (CHECKS, level "record") reject single transcripts: schema and shape, content (empty,
too long, role markers, bad UTF-8, control characters, the self-chat prompt leaking into a turn, a human
turn that neither asks nor requests anything) and duplicates. Dataset-level checks (level "dataset":
duplicate, refusal, seed-echo and cut-answer rates) fail the gate instead; the duplicate copies themselves
are still rejected, by the record-level `duplicate` check.

Beside the checks, `dataset_stats` measures the data as the paper's Table 2 does (dialogues, rounds, answer
lengths in base-model tokens, distinct-n) plus warning figures that reject nothing (AI turns ending without
closing punctuation, turns spelling a tokenizer special token), for the accepted records and the whole input.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from baize.config import ValidateParams
from baize.errors import BaizeError, InputError, ParamsError
from baize.formats import from_messages, import_baize_json
from baize.selfchat import prompts
from baize.transcript import Transcript, atomic_write_text, iter_json_lines, read_jsonl, write_jsonl
from baize.webassets import localize_data_docs

# --------------------------------------------------------------------------- the checks

# Role markers of the self-chat ([Human]) and training ([|Human|]) formats: inside a turn they would forge a
# turn boundary in the training text.
MARKER_REGEX = r"\[\|?(?:Human|AI)\|?\]"
# What the no_role_markers check rejects: a training marker anywhere (it would forge a turn in the training text),
# or a self-chat marker at the start of a line (another speaker's turn inside this one). "How do I parse a [AI]
# tag?" is a question, and the self-chat parser and cleaning keep it whole too.
FORGED_TURN_REGEX = r"\[\|(?:Human|AI)\|\]|(?:^|\n)[ \t]*\[(?:Human|AI)\]"
# C0 and C1 control characters, except tab, newline and carriage return.
CONTROL_REGEX = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
# U+FFFD is what a decoder leaves for bytes that were not UTF-8; lone surrogates (JSON "\ud800") are
# replaced by it in the feature frame, so one check catches both.
REPLACEMENT_CHAR = "\ufffd"
# Text that spells a common tokenizer special token; the base tokenizer's own are added when one is given.
# Counted (`special_token_text_turns`), not rejected: the tokenize stage keeps such text plain text.
SPECIAL_TOKEN_TEXTS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]",
)
# A prompt leak is a run of this many words of a self-chat prompt sentence inside a turn.
LEAK_SHINGLE = 6
# Shingles made only of these words are how anyone speaks of chatbots ("a conversation between a human and
# an AI"): an AI answer may say them, so they are no evidence of a leak.
_GENERIC_PROMPT_WORDS = frozenset(
    "a an the and is of to in with about between conversation human ai assistant".split()
)
# Where a new sentence starts inside a turn: `^` in the leak and request patterns also matches there.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?\u2026])\s+|(?<=[\u3002\uff01\uff1f])\s*")
# The AI's turn ends by asking the human something: the human's reply needs no question of its own.
_ENDS_WITH_QUESTION = re.compile(r"[?\uff1f]\W*$")
# An AI turn is terminated when its last character closes a sentence, a quote, a bracket or a code span, or
# is an emoji or other symbol: these, plus Unicode classes Pe (closing brackets), Pf (closing quotes), So.
_TERMINATORS = frozenset(".!?;\u2026\u3002\uff01\uff1f\uff61\uff1b\u061f\u0964\"'`)]}>")
# Trailing emoji modifiers (variation selectors, zero-width joiner, keycap) are skipped before that test.
_EMOJI_TAIL = re.compile("[\ufe0e\ufe0f\u200d\u20e3\U0001f3fb-\U0001f3ff]+$")


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
    Check("no_role_markers",   "content", "record",  "turns",
          "no [|Human|]/[|AI|] inside a turn, no [Human]/[AI] at the start of a line"),
    Check("valid_utf8",        "content", "record",  "turns",   "no U+FFFD or lone surrogate (was not UTF-8)"),
    Check("no_control_chars",  "content", "record",  "turns",   "no control characters other than tab/newline"),
    Check("no_prompt_leak",    "content", "record",  "turns",
          f"no turn echoes the self-chat prompt: no {LEAK_SHINGLE}-word run of its instructions, no "
          "validate.prompt_leak_patterns match"),
    Check("human_asks",        "content", "record",  "turns",
          "every human turn asks or requests: a '?' or a validate.request_patterns match (exempt: an opening turn "
          "that is the seed, a reply to an AI turn ending in '?'; no patterns: off)"),
    Check("duplicate",         "dataset", "record",  "records", "the turns do not repeat an earlier transcript's"),
    Check("duplicate_rate",    "dataset", "dataset", "records",
          "share of duplicate transcripts is at most {p.max_duplicate_rate}"),
    Check("refusal_rate",      "dataset", "dataset", "turns",
          "share of AI turns opening with a refusal is at most {p.max_refusal_rate}"),
    Check("seed_echo_rate",    "dataset", "dataset", "turns",
          "share of human turns only repeating the seed (the opening one never does) is at most {p.max_seed_echo_rate}"),
    Check("cut_turn_rate",     "dataset", "dataset", "turns",
          "share of AI turns cut by max_tokens (meta.truncated_turns) is at most {p.max_cut_turn_rate}"),
]}
# fmt: on


@dataclass(frozen=True)
class Rules:
    """The compiled regex params and the special-token texts that the features are computed with."""

    refusal: list[re.Pattern]
    prompt_leak: list[re.Pattern]
    request: list[re.Pattern]
    special_tokens: tuple[str, ...] = SPECIAL_TOKEN_TEXTS


def _compile(p: ValidateParams, key: str) -> list[re.Pattern]:
    patterns = []
    for i, pat in enumerate(getattr(p, key)):
        try:
            patterns.append(re.compile(pat, re.IGNORECASE))
        except re.error as e:
            raise ParamsError(f"params.yaml: validate.{key}.{i} = {pat!r}: invalid regex: {e}") from None
    return patterns


def check_params(p: ValidateParams) -> Rules:
    """Cross-field checks the schema can't express; returns the compiled patterns."""
    if p.min_turns > p.max_turns:
        raise ParamsError(f"params.yaml: validate.min_turns = {p.min_turns}: must be <= max_turns ({p.max_turns})")
    if p.min_turn_chars > p.max_turn_chars:
        raise ParamsError(
            f"params.yaml: validate.min_turn_chars = {p.min_turn_chars}: must be <= max_turn_chars ({p.max_turn_chars})"
        )
    return Rules(
        refusal=_compile(p, "refusal_patterns"),
        prompt_leak=_compile(p, "prompt_leak_patterns"),
        request=_compile(p, "request_patterns"),
    )


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


def _search(patterns: Sequence[re.Pattern], text: str) -> bool:
    """Any pattern found anywhere in `text`; `^` matches at the start of the text and of each sentence."""
    text = text.replace("\u2019", "'")
    sentences: list[str] | None = None
    for p in patterns:
        if p.search(text):
            return True
        if "^" in p.pattern:  # anchored: try each sentence start too
            sentences = _SENTENCE_BREAK.split(text)[1:] if sentences is None else sentences
            if any(p.search(s) for s in sentences):
                return True
    return False


@cache
def prompt_shingles(n: int = LEAK_SHINGLE) -> frozenset[tuple[str, ...]]:
    """Every n-word run (normalized) of the sentences of the self-chat prompts (`prompts.INSTRUCTIONS`: the
    paper's template, its greeting example turns and the seed left out, and the turn-by-turn instructions).
    Runs made only of generic words (`_GENERIC_PROMPT_WORDS`) are left out."""
    out: set[tuple[str, ...]] = set()
    for prompt in prompts.INSTRUCTIONS:
        for line in prompt.splitlines():
            if re.match(r"\s*" + MARKER_REGEX, line):  # "[Human] Hello!" / "[AI] Hi! How can I help you?"
                continue
            for part in re.split(r"\$\{\w+\}", line):  # no run spans a placeholder (${SEED}, ${TRANSCRIPT})
                for sentence in re.split(r"(?<=[.!?])\s+", part):
                    words = _normalize(sentence).split()
                    for i in range(len(words) - n + 1):
                        run = tuple(words[i : i + n])
                        if not set(run) <= _GENERIC_PROMPT_WORDS:
                            out.add(run)
    return frozenset(out)


def _is_prompt_leak(text: str, patterns: Sequence[re.Pattern]) -> bool:
    shingles = prompt_shingles()
    words = _normalize(text).split()
    if any(tuple(words[i : i + LEAK_SHINGLE]) in shingles for i in range(len(words) - LEAK_SHINGLE + 1)):
        return True
    return _search(patterns, text)


def _asks(text: str, patterns: Sequence[re.Pattern]) -> bool:
    return "?" in text or "\uff1f" in text or _search(patterns, text)


def is_terminated(text: str) -> bool:
    """The turn ends like a finished answer: closing punctuation (English or CJK), a closing quote or bracket,
    a code span or fence, or an emoji/symbol. A turn cut by max_tokens mostly ends mid-word instead."""
    tail = _EMOJI_TAIL.sub("", text.rstrip())
    if not tail:
        return False
    last = tail[-1]
    return last in _TERMINATORS or unicodedata.category(last) in ("Pe", "Pf", "So")


def _truncated_turns(t: Transcript) -> set[int]:
    """meta["truncated_turns"] as written by self-chat (AI turns cut by max_tokens and kept); anything else: none."""
    value = t.meta.get("truncated_turns") if isinstance(t.meta, dict) else None
    if not isinstance(value, list):
        return set()
    return {i for i in value if isinstance(i, int) and not isinstance(i, bool)}


def features(transcripts: Sequence[Transcript], rules: Rules):
    """(records, turns) DataFrames: one row per transcript and one per turn, keyed by `row` (and `turn`).

    Per-role columns are NaN for the other role (GX's column-map checks skip them, its means leave them out).
    """
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
                "rounds": sum(a == "human" and b == "ai" for a, b in pairwise(roles)),
            }
        )
        seed_norm = _normalize(t.seed)
        cut = _truncated_turns(t)
        # The opening human turn is never an echo: a conversation about a topic starts by asking it (the released
        # data paraphrases it, `first_human: seed` asks it verbatim, a messages file's seed is taken from it).
        # An echo is a later human turn that only repeats the seed: the self-chat ran out of questions.
        opening = roles.index("human") if "human" in roles else -1
        for i, x in enumerate(t.turns):
            text = re.sub("[\ud800-\udfff]", REPLACEMENT_CHAR, x.text)
            # NaN: not counted in the rate / not checked (human turns for refusals and vice versa)
            echo = refusal = truncated = unterminated = asks = math.nan
            if x.role == "ai":
                refusal = float(_is_refusal(text, rules.refusal))
                truncated = float(i in cut)
                unterminated = float(not is_terminated(text))
            elif x.role == "human":  # an invalid role is roles_valid's business only
                is_seed = bool(seed_norm) and _normalize(text) == seed_norm
                echo = float(i != opening and is_seed)
                # Exempt: the opening turn that is the seed verbatim (`first_human: seed`; Stack Overflow seeds are
                # titles, not questions), and an answer to a question the AI just asked ("What is your budget?").
                prev = t.turns[i - 1] if i > 0 else None
                answers = prev is not None and prev.role == "ai" and bool(_ENDS_WITH_QUESTION.search(prev.text))
                if rules.request and not (i == opening and is_seed) and not answers:
                    asks = float(_asks(text, rules.request))
            turns.append(
                {
                    "row": row,
                    "turn": i,
                    "role": x.role,
                    "text": text,
                    "chars": len(text.strip()),
                    "refusal": refusal,
                    "seed_echo": echo,
                    "prompt_leak": int(_is_prompt_leak(text, rules.prompt_leak)),
                    "human_asks": asks,
                    "truncated": truncated,
                    "unterminated": unterminated,
                    "special_token": int(any(tok in text for tok in rules.special_tokens)),
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
        "rounds",
    ]
    turn_cols = [
        "row",
        "turn",
        "role",
        "text",
        "chars",
        "refusal",
        "seed_echo",
        "prompt_leak",
        "human_asks",
        "truncated",
        "unterminated",
        "special_token",
    ]
    rec_df = pd.DataFrame(records, columns=record_cols)
    turn_df = pd.DataFrame(turns, columns=turn_cols)
    if turn_df.empty:  # keep numeric dtypes so the aggregate checks still run
        turn_df = turn_df.astype(
            {
                "row": "int64",
                "turn": "int64",
                "chars": "int64",
                "refusal": "float64",
                "seed_echo": "float64",
                "prompt_leak": "int64",
                "human_asks": "float64",
                "truncated": "float64",
                "unterminated": "float64",
                "special_token": "int64",
            }
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
        "no_role_markers": gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=FORGED_TURN_REGEX),
        "valid_utf8": gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=REPLACEMENT_CHAR),
        "no_control_chars": gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=CONTROL_REGEX),
        "no_prompt_leak": gxe.ExpectColumnValuesToBeInSet(column="prompt_leak", value_set=[0]),
        # NaN (AI turns, the exempt opening turn, every turn when request_patterns is []) is skipped.
        "human_asks": gxe.ExpectColumnValuesToBeInSet(column="human_asks", value_set=[1]),
        "duplicate": gxe.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=[0]),
        "duplicate_rate": gxe.ExpectColumnMeanToBeBetween(column="is_duplicate", max_value=p.max_duplicate_rate),
        # The means skip NaN: the refusal rate is over AI turns only, the seed-echo rate over human turns.
        "refusal_rate": gxe.ExpectColumnMeanToBeBetween(column="refusal", max_value=p.max_refusal_rate),
        "seed_echo_rate": gxe.ExpectColumnMeanToBeBetween(column="seed_echo", max_value=p.max_seed_echo_rate),
        "cut_turn_rate": gxe.ExpectColumnMeanToBeBetween(column="truncated", max_value=p.max_cut_turn_rate),
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
        "cut_turn_rate": p.max_cut_turn_rate,
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
        # GX's pages load jQuery, Bootstrap, bootstrap-table and fonts from CDNs: offline the index table is
        # empty and every page unstyled. Point them at the copies shipped in baize.webassets.
        localize_data_docs(docs_dir)
    order = list(CHECKS)
    return sorted(results, key=lambda r: order.index(r.check.name))


# --------------------------------------------------------------------------- statistics (Table 2 and warnings)

# The figures of `stats` in metrics.json (accepted records only); reports/validation/stats.json has them all.
STATS_HEADLINE = ("dialogues", "avg_rounds", "avg_ai_tokens", "distinct_2", "truncated_share", "refusal_share")
# Files whose presence makes a model folder hold a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _words(text: str) -> list[str]:
    """Lower-cased word tokens, split at whitespace and punctuation (punctuation itself dropped)."""
    return re.findall(r"\w+", text.lower())


@dataclass
class LengthCounter:
    """Counts turn lengths: in the base model's tokens (no special tokens added) or, without a tokenizer, in
    `_words`. `special_tokens` are the tokenizer's own special-token texts (for `special_token_text_turns`)."""

    unit: Literal["tokens", "words"] = "words"
    tokenizer: str | None = None
    """The folder the tokenizer was loaded from."""
    count: Callable[[list[str]], list[int]] = field(default=lambda texts: [len(_words(t)) for t in texts], repr=False)
    special_tokens: tuple[str, ...] = ()


def length_counter(model_dir: str | os.PathLike | None) -> LengthCounter:
    """The base model's tokenizer from `model_dir` (never remote code); words when the folder holds none."""
    if model_dir is None or not any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES):
        return LengthCounter()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # a folder with tokenizer files that do not load: say so, don't count in words silently
        raise BaizeError(f"{model_dir}: tokenizer does not load: {type(e).__name__}: {e}") from None

    def count(texts: list[str], chunk: int = 1024) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), chunk):
            ids = tok(texts[i : i + chunk], add_special_tokens=False, verbose=False)["input_ids"]
            out += [len(x) for x in ids]
        return out

    specials = {str(x) for x in tok.all_special_tokens}
    specials |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    # Markup-like tokens (`<|...|>`, `<s>`, `[INST]`) only: not words or whitespace that prose is made of.
    specials = {x for x in specials if len(x) >= 3 and re.search(r"[^\w\s]", x)}
    return LengthCounter("tokens", str(model_dir), count, tuple(sorted(specials)))


def _mean(values) -> float | None:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return round(float(sum(values)) / len(values), 4) if values else None


def _distinct(turn_words: list[list[str]], n: int) -> float | None:
    grams = [tuple(w[i : i + n]) for w in turn_words for i in range(len(w) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else None


def dataset_stats(records_df, turns_df, lengths: Sequence[int]) -> dict[str, Any]:
    """The paper's Table 2 figures and the warning figures for the records in `records_df` (turns_df and
    lengths, one per turn row, may hold more rows: only those records' turns are used).

    Lengths are per turn (averages over all AI turns, over all human turns); rounds are human/AI pairs per
    dialogue; distinct-n is distinct n-grams / all n-grams of the AI turns (word tokens, lower case); the
    shares are over AI turns (truncated, unterminated, refusal) or all turns (prompt leak). None: nothing
    to measure.
    """
    rows = set(records_df["row"])
    keep = turns_df["row"].isin(rows).to_numpy()
    turns = turns_df[keep]
    lens = [n for n, k in zip(lengths, keep, strict=True) if k]
    roles = list(turns["role"])
    ai_words = [_words(text) for text, role in zip(turns["text"], roles, strict=True) if role == "ai"]
    ai = turns[turns["role"] == "ai"]
    return {
        "dialogues": len(records_df),
        "avg_rounds": _mean([float(x) for x in records_df["rounds"]]),
        "avg_ai_tokens": _mean([float(n) for n, r in zip(lens, roles, strict=True) if r == "ai"]),
        "avg_human_tokens": _mean([float(n) for n, r in zip(lens, roles, strict=True) if r == "human"]),
        "distinct_1": _distinct(ai_words, 1),
        "distinct_2": _distinct(ai_words, 2),
        "truncated_share": _mean(list(ai["truncated"])),
        "unterminated_ai_rate": _mean(list(ai["unterminated"])),
        "refusal_share": _mean(list(ai["refusal"])),
        "prompt_leak_share": _mean([float(x) for x in turns["prompt_leak"]]),
        "special_token_text_turns": int(turns["special_token"].sum()),
    }


# --------------------------------------------------------------------------- verdict


@dataclass
class Report:
    transcripts: list[Transcript]
    checks: list[CheckResult]
    min_pass_rate: float
    num_turns: int
    stats: dict[str, Any] = field(default_factory=dict)
    """`dataset_stats` of the accepted records and of the whole input, and the length unit: stats.json."""

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

    def headline(self) -> dict[str, float]:
        """The number `dvc metrics show` / `dvc exp show` compare: the accepted share (`pass_rate`, 3 decimals; a
        short name, as the headline must fit a 120-column `dvc exp show`)."""
        n = len(self.transcripts)
        return {"passed": round(len(self.accepted) / n, 3) if n else 0.0}

    def metrics(self) -> dict[str, Any]:
        """Counts, the pass rate of each record-level check and the rates of the dataset-level ones, and the
        headline statistics of the accepted data (report.json; MLflow logs them as e.g.
        `checks.turn_length.pass_rate`)."""
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
        out: dict[str, Any] = {
            "records": n,
            "turns": self.num_turns,
            "accepted": accepted,
            "rejected": n - accepted,
            "pass_rate": round(accepted / n, 6) if n else 0.0,
            "min_pass_rate": self.min_pass_rate,
            "gate_passed": self.gate_passed,
        }
        if self.stats:  # the Table 2 figures; every statistic is in stats.json
            out["stats"] = {k: self.stats["accepted"][k] for k in STATS_HEADLINE}
        out["checks"] = checks
        return out

    def stats_line(self) -> str:
        """The headline statistics of the accepted data, and the warning figures of the input."""
        if not self.stats:
            return ""
        a, i, unit = self.stats["accepted"], self.stats["input"], self.stats["length_unit"]

        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        return (
            f"accepted: {a['dialogues']} dialogues, {num(a['avg_rounds'], '.2f')} rounds, "
            f"AI {num(a['avg_ai_tokens'], '.1f')} / human {num(a['avg_human_tokens'], '.1f')} {unit} per turn, "
            f"distinct-2 {num(a['distinct_2'], '.3f')}, cut {num(a['truncated_share'], '.1%')}, "
            f"refusal {num(a['refusal_share'], '.1%')}; input: unterminated AI turns "
            f"{num(i['unterminated_ai_rate'], '.1%')}, special-token text in {i['special_token_text_turns']} turns"
        )

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


def validate(
    transcripts: Sequence[Transcript],
    p: ValidateParams,
    docs_dir: str | os.PathLike | None = None,
    lengths: LengthCounter | None = None,
) -> Report:
    """Run the suite on `transcripts`; the Report says which are accepted, why the others are not, and
    whether the gate passes, and carries the statistics (lengths counted by `lengths`: words by default,
    `length_counter(models/base)` for the base model's tokens). Raises nothing for bad data: that is the
    Report's job."""
    lengths = lengths or LengthCounter()
    rules = check_params(p)
    specials = tuple(dict.fromkeys([*rules.special_tokens, *lengths.special_tokens]))
    rules = Rules(rules.refusal, rules.prompt_leak, rules.request, specials)
    records_df, turns_df = features(transcripts, rules)
    checks = run_suite(records_df, turns_df, p, docs_dir=docs_dir)
    report = Report(list(transcripts), checks, p.min_pass_rate, len(turns_df))
    failed = report.failures()
    turn_lengths = lengths.count(list(turns_df["text"]))
    report.stats = {
        "length_unit": lengths.unit,
        "tokenizer": lengths.tokenizer,
        "accepted": dataset_stats(records_df[~records_df["row"].isin(failed)], turns_df, turn_lengths),
        "input": dataset_stats(records_df, turns_df, turn_lengths),
    }
    return report


def _json_line(obj: Any) -> str:
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep the record whole, \u-escaped
        line = json.dumps(obj, ensure_ascii=True)
    return line + "\n"


def write_outputs(report: Report, out_dir: str | os.PathLike, report_dir: str | os.PathLike) -> dict[str, Path]:
    """accepted -> out/transcripts.jsonl, rejected -> out/rejected.jsonl, the pass rate -> report/metrics.json
    (the one number `dvc metrics show` needs), counts and every check -> report/report.json, all statistics ->
    report/stats.json."""
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    paths = {
        "accepted": out_dir / "transcripts.jsonl",
        "rejected": out_dir / "rejected.jsonl",
        "metrics": report_dir / "metrics.json",
        "report": report_dir / "report.json",
        "stats": report_dir / "stats.json",
    }
    write_jsonl(paths["accepted"], report.accepted)
    atomic_write_text(paths["rejected"], "".join(_json_line(r) for r in report.rejected()))
    atomic_write_text(paths["metrics"], json.dumps(report.headline(), indent=2) + "\n")
    atomic_write_text(paths["report"], json.dumps(report.metrics(), indent=2) + "\n")
    atomic_write_text(paths["stats"], json.dumps(report.stats, indent=2) + "\n")
    return paths
