"""Loading raw seed questions from one source: the packaged files, a local file, or a Hub dataset.

Every loader returns the raw strings in file order, with the domain of each; normalization, filtering,
de-duplication and sampling happen afterwards in `prepare.py`. Errors name the file:line (or the missing
field) so a user can fix the input without reading a traceback.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from baize.config import SeedSource
from baize.errors import BaizeError, InputError, ParamsError, json_line

# The seed sets that ship with baize, one question per line in src/baize/seeds/data/<domain>.txt.
PACKAGED_DOMAINS = ("general", "programming", "medical", "finance")

# The paper's three Hub datasets: the field holding the question and the domain it belongs to.
# (Baize's collect.py read x["questions"]["text"][0], x["title"] and x["Questions"].)
KNOWN_HF_DATASETS: dict[str, tuple[str, str]] = {
    "quora": ("questions.text.0", "general"),
    "pacovaldez/stackoverflow-questions": ("title", "programming"),
    "AnonymousSub/MedQuAD_47441_Question_Answer_Pairs": ("Questions", "medical"),
}

FILE_FORMATS = ("txt", "jsonl", "json", "csv", "parquet")
_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
             ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class RawSeed:
    text: str | None
    """As found in the source (None: the field was null)."""
    domain: str


@dataclass
class LoadedSource:
    label: str
    """`packaged:medical`, `file:data/my.csv`, `hf:quora`: what each seed's `source` says."""
    weight: float
    items: list[RawSeed]


def source_label(src: SeedSource) -> str:
    return f"{src.type}:{src.name}"


def load_source(src: SeedSource, index: int = 0) -> LoadedSource:
    """Load one `seed.sources[index]` entry; `index` is only used to name the params key in errors."""
    if src.type == "packaged":
        items = load_packaged(src.name)
        if src.domain:  # an explicit domain overrides the packaged one
            items = [RawSeed(i.text, src.domain) for i in items]
    elif src.type == "file":
        items = load_file(src.name, field=src.field, fmt=src.format, domain=src.domain or "general",
                          limit=src.limit, key=f"seed.sources.{index}")
    else:
        items = load_hf(src.name, field=src.field, split=src.split, config=src.config, domain=src.domain,
                        limit=src.limit, key=f"seed.sources.{index}")
    if src.limit is not None:
        items = items[: src.limit]
    return LoadedSource(source_label(src), src.weight, items)


# --------------------------------------------------------------------------- packaged


def load_packaged(name: str) -> list[RawSeed]:
    """Questions shipped with baize: one domain (`general`, `programming`, `medical`, `finance`) or `all`."""
    domains = PACKAGED_DOMAINS if name == "all" else (name,)
    out: list[RawSeed] = []
    for domain in domains:
        if domain not in PACKAGED_DOMAINS:
            raise ParamsError(f"packaged seed set {name!r} does not exist (allowed: all, {', '.join(PACKAGED_DOMAINS)})")
        text = resources.files("baize.seeds").joinpath("data", f"{domain}.txt").read_text(encoding="utf-8")
        out.extend(RawSeed(line, domain) for line in text.splitlines())
    return out


# --------------------------------------------------------------------------- local files


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise InputError(path, None, f"unknown seed file type {path.suffix!r}: set `format` to one of {', '.join(FILE_FORMATS)}")
    return found


def load_file(
    path: str | Path,
    *,
    field: str | None = None,
    fmt: str = "auto",
    domain: str = "general",
    limit: int | None = None,
    key: str = "seed.sources",
) -> list[RawSeed]:
    """A local seed file: txt (one per line), jsonl, json (a list of records), csv or parquet (`field` names the column)."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise InputError(path, None, "seed file not found")
    if fmt != "txt" and not field:
        raise ParamsError(f"{key}.field: required for a {fmt} seed file ({path}): name the column holding the question")
    reader = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[fmt]
    out: list[RawSeed] = []
    for text in reader(path, field):
        out.append(RawSeed(text, domain))
        if limit is not None and len(out) >= limit:
            break
    return out


def _read_txt(path: Path, field: str | None) -> Iterator[str]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise InputError(path, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(path: Path, field: str) -> Iterator[str | None]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue  # blank lines are tolerated in JSONL
            record = json_line(raw, path, lineno)
            yield from _field_values(record, field, path, lineno)


def _read_json(path: Path, field: str) -> Iterator[str | None]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, None, f"not valid UTF-8: {exc.reason}") from None
    if not isinstance(data, list):
        raise InputError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield from _field_values(record, field, path, None, where=f"record {i}")


def _read_csv(path: Path, field: str) -> Iterator[str | None]:
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM (Excel) is not part of the header
        # strict: a stray quote is an error with its line, not a silently merged row.
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(path, 1, "empty CSV file (expected a header row)")
            if field not in header:
                raise InputError(path, 1, f"missing field {field!r} in the header (columns: {', '.join(header)})")
            col = header.index(field)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise InputError(path, reader.line_num, f"expected {len(header)} columns, got {len(row)}")
                yield row[col]
        except csv.Error as exc:
            raise InputError(path, reader.line_num, f"malformed CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise InputError(path, reader.line_num + 1, f"not valid UTF-8: {exc.reason}") from None


def _read_parquet(path: Path, field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, None, f"not a readable Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise InputError(path, None, f"missing field {field!r} (columns: {', '.join(names)})")
    col_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise InputError(path, None, f"field {field!r} has type {col_type}, expected a string column")
    # Read only the one column, batch by batch: a wide multi-GB dump stays cheap.
    for batch in pf.iter_batches(columns=[field]):
        yield from batch.column(0).to_pylist()


def _field_values(record: Any, field: str, path: Any, lineno: int | None, where: str | None = None) -> Iterator[str | None]:
    """The question(s) at `field` in one record. Dotted paths reach into nested records (`questions.text`),
    a numeric part indexes a list (`questions.text.0`); a list of strings at the end gives several seeds."""
    loc = f"{where}: " if where else ""
    value: Any = record
    for part in field.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            keys = f" (keys: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
            raise InputError(path, lineno, f"{loc}missing field {field!r}{keys}")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is not None and not isinstance(v, str):
            raise InputError(path, lineno, f"{loc}field {field!r} is {type(v).__name__}, expected a string")
        yield v


# --------------------------------------------------------------------------- Hugging Face Hub


def load_hf(
    name: str,
    *,
    field: str | None = None,
    split: str = "train",
    config: str | None = None,
    domain: str | None = None,
    limit: int | None = None,
    key: str = "seed.sources",
) -> list[RawSeed]:
    """A dataset from the Hugging Face Hub (or the local `datasets` cache) via `datasets.load_dataset`.

    Needs network the first time; offline (`HF_DATASETS_OFFLINE=1`, no route to the Hub) it fails with one
    line saying so instead of a traceback. `split` takes slices (`train[:20000]`) to read only part of it.
    """
    known_field, known_domain = KNOWN_HF_DATASETS.get(name, (None, None))
    field = field or known_field
    if not field:
        raise ParamsError(f"{key}.field: required for Hub dataset {name!r}: name the column holding the question")
    domain = domain or known_domain or "general"
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise BaizeError("hf seed sources need the `datasets` package (pip install datasets)") from None

    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the Hub client raises many types (connection, offline, not found, gated)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        hint = ("offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and the dataset is not in the local cache"
                if offline else "the Hugging Face Hub is not reachable or the dataset/split does not exist")
        raise BaizeError(
            f"hf seed source {name!r} (split {split!r}): cannot load: {hint} ({type(exc).__name__}: {first}). "
            f"Download it where there is network, or export the questions to a local file and use `type: file`."
        ) from None
    root = field.split(".")[0]
    if root not in ds.column_names:
        raise InputError(f"hf:{name}", None, f"missing field {field!r} (columns: {', '.join(ds.column_names)})")
    out: list[RawSeed] = []
    # Select just the needed column so a dataset with long answers/bodies is not materialized in full.
    for i, record in enumerate(ds.select_columns([root])):
        for text in _field_values(record, field, f"hf:{name}", None, where=f"row {i}"):
            out.append(RawSeed(text, domain))
        if limit is not None and len(out) >= limit:
            break
    return out
