"""The `baize` console script: the tools that are not pipeline stages.

    baize chat    talk to base + adapter in the terminal (streamed, Baize prompt and history truncation)
    baize export  merge the adapter into the base and save a standalone Hugging Face folder
    baize import  released Baize JSON / OpenAI fine-tuning JSONL -> the pipeline's transcripts.jsonl
    baize params check  validate params.yaml or a profile; print the resolved values and their defaults
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from baize.errors import BaizeError, ParamsError, one_line_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Baize: chat with, export and feed the pipeline's models."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


# --------------------------------------------------------------------------- chat

QUIT = {"/quit", "/exit", ":q"}


@main.command()
@click.option("--base", "base", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Base model folder.")
@click.option("--adapter", default="models/adapter", show_default=True,
              help="Adapter folder, or an MLflow URI (runs:/<run id>/adapter, models:/<name>/<version>, "
                   "models:/<name>@champion).")
@click.option("--no-adapter", is_flag=True, help="Chat with the base model alone.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, 2))
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--max-context-tokens", default=2048, show_default=True, type=click.IntRange(min=64),
              help="Context budget: prompt + reply (the prompt gets this minus --max-new-tokens); the oldest "
                   "turns are dropped beyond it.")
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible replies).")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="auto: what the device computes natively (bf16 on GPUs that have it; see baize.hardware). The "
                   "model runs on the GPU when there is one, whatever the dtype.")
@click.option("--prompt-format", default="training", show_default=True, type=click.Choice(["training", "paper"]),
              help="training: the text the adapter learned (its chat template); paper: the Baize demo's system prompt.")
@one_line_errors
def chat(base: Path, adapter: str, no_adapter: bool, max_new_tokens: int, temperature: float, top_p: float,
         max_context_tokens: int, seed: int | None, dtype: str, prompt_format: str) -> None:
    """Talk to base + adapter. /reset forgets the conversation, /quit (or Ctrl-D) leaves."""
    from baize import inference

    click.echo(f"loading {base}" + ("" if no_adapter else f" + {adapter}") + " ...", err=True)
    budget = inference.prompt_budget(max_context_tokens, max_new_tokens)  # the reply needs room too
    model, tokenizer = inference.load_model(base, None if no_adapter else adapter, dtype=dtype)
    click.echo("ready. /reset forgets the conversation, /quit or Ctrl-D leaves.", err=True)
    history: list[tuple[str, str]] = []
    turn = 0
    while True:
        try:
            question = input("Human: ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            break
        if not question:
            continue
        if question in QUIT:
            break
        if question == "/reset":
            history.clear()
            click.echo("(conversation cleared)")
            continue
        try:
            prompt = inference.build_prompt(question, history, tokenizer, budget, prompt_format)
        except inference.PromptTooLongError as exc:
            click.echo(f"(input too long: {exc})")
            continue
        click.echo("Baize: ", nl=False)
        pieces = []
        try:
            for piece in inference.stream_reply(
                model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=None if seed is None else seed + turn,
            ):
                pieces.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            click.echo(" [interrupted]", nl=False)
        click.echo()
        history.append((question, "".join(pieces).strip()))
        turn += 1


# --------------------------------------------------------------------------- export


@main.command()
@click.option("--base", "base", default="models/base", show_default=True, type=click.Path(path_type=Path))
@click.option("--adapter", default="models/adapter", show_default=True,
              help="Adapter folder or MLflow URI (runs:/..., models:/<name>/<version>, models:/<name>@champion).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder to create.")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@one_line_errors
def export(base: Path, adapter: str, out_dir: Path, dtype: str, force: bool) -> None:
    """Merge the adapter into the base; save a standalone HF folder (safetensors + Baize chat template).

    The result loads with AutoModelForCausalLM.from_pretrained, vLLM and `transformers serve`; clients
    should stop generation on "[|Human|]" and "[|AI|]".
    """
    from baize.export import export_merged

    info = export_merged(base, adapter, out_dir, dtype=dtype, force=force)
    click.echo(f"{out_dir}: merged {info['adapter']} into {info['base']} ({dtype}, {info['num_parameters']:,} parameters)")
    click.echo(f"try: transformers serve {out_dir}   (stop strings: [|Human|], [|AI|])")


# --------------------------------------------------------------------------- import


@main.command("import")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "baize-json", "openai-jsonl"]),
              help="auto: .json -> baize-json, .jsonl -> openai-jsonl.")
@click.option("--out", "out_path", default="data/imported/transcripts.jsonl", show_default=True,
              type=click.Path(path_type=Path))
@one_line_errors
def import_(input_path: Path, fmt: str, out_path: Path) -> None:
    """Turn released Baize data (or OpenAI fine-tuning JSONL) into the pipeline's transcripts.jsonl."""
    from baize.formats import import_baize_json, import_openai_jsonl
    from baize.transcript import write_jsonl

    if not input_path.is_file():
        raise BaizeError(f"{input_path}: no such file")
    if fmt == "auto":
        suffix = input_path.suffix.lower()
        if suffix not in (".json", ".jsonl"):
            raise BaizeError(f"{input_path}: cannot tell the format from {suffix or 'no suffix'!r}; pass --format")
        fmt = "baize-json" if suffix == ".json" else "openai-jsonl"
    transcripts = import_baize_json(input_path) if fmt == "baize-json" else import_openai_jsonl(input_path)
    if not transcripts:
        raise BaizeError(f"{input_path}: no conversations found")
    n = write_jsonl(out_path, transcripts)
    turns = sum(len(t.turns) for t in transcripts)
    click.echo(f"{out_path}: {n} transcripts ({turns} turns) from {input_path} ({fmt})")
    click.echo(
        "to train on them, point the validate stage at this file:\n"
        f"  dvc exp run -S validate.input={out_path}\n"
        f"or set `validate.input: {out_path}` in params.yaml, then `dvc repro`."
    )


# --------------------------------------------------------------------------- params


@main.group()
def params() -> None:
    """params.yaml and the profiles."""


@params.command("check")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--profile", help="A profile of profiles/ by name (micro, paper) instead of a FILE.")
@one_line_errors
def params_check(file: Path | None, profile: str | None) -> None:
    """Validate FILE (default params.yaml) or a profile: print every section's resolved values, the defaults marked;
    a bad value is one line naming the key, exit 2 (what every stage, and `dvc repro`'s first stage, would say)."""
    from baize.config import check_file, describe

    if file is not None and profile is not None:
        raise ParamsError("give a FILE or --profile, not both")
    if profile is not None:
        file = Path("profiles") / f"{profile}.yaml"
        if not file.is_file():
            known = ", ".join(sorted(p.stem for p in Path("profiles").glob("*.yaml"))) or "none here"
            raise ParamsError(f"{file}: no such profile (profiles: {known}; run from the project root)")
    file = file or Path("params.yaml")
    click.echo(describe(file, check_file(file)), nl=False)


if __name__ == "__main__":
    main()
