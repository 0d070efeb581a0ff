"""Stage `evaluate`: base vs base + adapter (v1.5) and, when the SDF adapter exists, Baize v2, on the validation split
and a fixed prompt set, in one run on one loaded model.

Outputs: reports/eval/samples.jsonl (one row per prompt with every model's answer), reports/eval/metrics.json (the
headline, for `dvc metrics show` / `dvc exp show`), report.json (every figure), details.json (the judge's
per-category scores and every judgment), report.md (one table per comparison), run.json (seconds, untracked), and
one MLflow run with the metrics and the samples and judgments as tables, tagged with the run that trained the
adapter (`baize.train_run_id`) and, with v2, the SDF training run (`baize.sdf_train_run_id`): the runs tagged with
these adapters' digests.

Models: `base` (adapters off, Baize's prompt), `base_chat` (the base with its own chat template), `adapter` (v1.5)
and `v2` (the stacked SDF adapter). Every model answers the same prompts with the same sampling seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import click

from baize import evaluation, inference
from baize.config import EvaluateParams
from baize.errors import BaizeError
from baize.transcript import atomic_write_text
from stages import _common

def headline(metrics: dict) -> dict:
    """The numbers `dvc exp show` compares, by model: 0 the base, 1 v1.5 (base + adapter), 2 v2 (the stacked SDF
    adapter). Validation perplexity (`ppl0..2`), the share of answers that stop by themselves (`stop0..2`), of v1.5's
    and v2's that leak a role (`leak1`, `leak2`), and with the judge v2's pairwise win rate over v1.5 (`win2`).
    Short names: eleven columns in a 120-column terminal. The rest (base_chat, the judge's scores): report.json."""
    ppl, gen = metrics["perplexity"], metrics["generation"]
    models = [("0", "base"), ("1", "adapter"), *([("2", "v2")] if "v2" in gen else [])]
    out = {f"ppl{i}": ppl[name] for i, name in models}
    out.update({f"stop{i}": gen[name].get("stop_rate") for i, name in models})
    out.update({f"leak{i}": gen[name].get("role_leak_rate") for i, name in models if i != "0"})
    win = ((metrics.get("pairwise") or {}).get("v2_vs_adapter") or {}).get("win_rate")
    if win is not None:  # the judge's verdict (its scores: report.json); none when it parsed no verdict
        out["win2"] = win
    return out


def registry_metrics(metrics: dict, name: str) -> dict:
    """What a registered version carries (tags `metric.*`; the champion is the lowest `ppl`): `name`'s own figures."""
    ppl, gen = metrics["perplexity"], metrics["generation"][name]
    return {"ppl": ppl[name], "ppl_base": ppl["base"], "stop": gen.get("stop_rate"), "leak": gen.get("role_leak_rate")}


def _judge(params: EvaluateParams, base_dir: Path, rows: list[dict], models: list[str],
           pairs: list[tuple[str, str]]) -> dict:
    """The paper's protocol for every model (reference first, both scored 1-10, relative score, per category) and
    the pairwise comparisons, each pair judged in both orders; one backend, one journal."""
    from baize import judge
    from baize.selfchat.journal import Journal

    from baize.selfchat.stopping import Stopper

    jp = params.judge
    model = jp.model
    if jp.backend == "local":
        from baize.selfchat.local_backend import LocalBackend, model_identity

        backend = LocalBackend(base_dir, batch_size=params.batch_size, seed=params.seed, dtype=params.dtype)
        # Keyed by the local model's files and dtype, not by the `judge.model` name it does not use.
        model = model_identity(base_dir, params.dtype)
    else:
        from baize.selfchat.openai_backend import OpenAIBackend

        backend = OpenAIBackend(base_url=jp.base_url, concurrency=jp.concurrency)

    async def everything(journal) -> dict:
        stopper = Stopper(what="judge")  # Ctrl-C / SIGTERM: the verdicts in flight are journaled first
        out: dict = {"single": {}, "pairwise": {}}
        with stopper.signals_handled():
            for name in models:
                judged, summary = await judge.judge_rows(backend, journal, rows, model=model, reference=jp.reference,
                                                         answer_key=name, max_tokens=jp.max_tokens, stopper=stopper)
                out["single"][name] = {"summary": summary, "by_category": _by_category(rows, judged), "rows": judged}
            for a, b in pairs:
                results, summary = await judge.pairwise(backend, journal, rows, a, b, model=model,
                                                        max_tokens=jp.max_tokens)
                out["pairwise"][f"{a}_vs_{b}"] = {"summary": summary, "rows": results}
        return out

    try:
        with Journal(jp.cache) as journal:
            return asyncio.run(everything(journal))
    finally:
        close = getattr(backend, "close", None)
        if close:
            close()


def _by_category(rows: list[dict], judged: list[dict]) -> dict[str, float | None]:
    """The relative score (model total / reference total, %) per question category."""
    totals: dict[str, list[float]] = {}
    for row, j in zip(rows, judged, strict=True):
        if j["reference_score"] is not None:
            t = totals.setdefault(row.get("category") or "none", [0.0, 0.0])
            t[0] += j["answer_score"]
            t[1] += j["reference_score"]
    return {cat: round(100.0 * a / r, 1) if r else None for cat, (a, r) in sorted(totals.items())}


def _report(metrics: dict, models: list[str]) -> str:
    """reports/eval/report.md: one table per comparison."""
    names = {"base": "base (Baize prompt)", "base_chat": "base (own chat template)", "adapter": "v1.5", "v2": "v2"}
    ppl = metrics["perplexity"]
    lines = ["# Evaluation", "", "## Perplexity (AI-turn tokens; lower is better)", "",
             "| model | val split | SDF best answers |", "| --- | ---: | ---: |"]
    sdf_best = metrics.get("perplexity_sdf_best") or {}
    for name in [m for m in models if m != "base_chat"]:
        best = sdf_best.get(name)
        lines.append(f"| {names[name]} | {ppl[name]:.3f} | {f'{best:.3f}' if best is not None else '-'} |")
    lines += ["", "## Answers (same prompts, same sampling seeds)", "",
              "| model | stop by itself | role leak | empty | mean tokens |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in models:
        g = metrics["generation"][name]
        lines.append(f"| {names[name]} | {g['stop_rate']:.2f} | {g['role_leak_rate']:.2f} | {g['empty_rate']:.2f} | "
                     f"{g['mean_tokens']:.1f} |")
    if "judge" in metrics:
        lines += ["", "## Judge: score relative to the reference (the paper's protocol)", "",
                  "| model | relative score % | mean score (1-10) | judged | unparsed |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, j in metrics["judge"].items():
            rel = j["relative_score_pct"]
            mean = j["answer_mean"]
            lines.append(f"| {names[name]} | {f'{rel:.1f}' if rel is not None else '-'} | "
                         f"{f'{mean:.2f}' if mean is not None else '-'} | {j['judged']} | {j['unparsed']} |")
    if metrics.get("pairwise"):
        lines += ["", "## Pairwise (each pair judged in both orders; order-inconsistent = tie)", "",
                  "| comparison | win | tie | loss | inconsistent share | unparsed |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for key, p in metrics["pairwise"].items():
            a, b = key.split("_vs_")
            share = p["inconsistent_share"]
            lines.append(f"| {names[a]} vs {names[b]} | {p['win']} | {p['tie']} | {p['loss']} | "
                         f"{f'{share:.2f}' if share is not None else '-'} | {p['unparsed']} |")
    return "\n".join(lines) + "\n"


def _check_stack(adapter_v2: Path, adapter_dir: Path) -> None:
    """v2 must stack on the v1.5 adapter being evaluated, or "v1.5" and "v2" would be two unrelated models."""
    first = inference.stacked_on(inference.check_adapter_dir(adapter_v2))
    if first is None:
        raise BaizeError(f"{adapter_v2}: not a stacked SDF adapter (no stacked_on in baize_adapter.json)")
    mine = (adapter_v2 / first / "adapter_model.safetensors").read_bytes()
    if mine != (adapter_dir / "adapter_model.safetensors").read_bytes():
        raise BaizeError(f"{adapter_v2} was trained on another v1.5 adapter than {adapter_dir}; re-run sdf_train")


def _data_summary(data_dir: Path) -> dict:
    """What the adapter was trained and measured on (the tokenize stage's info.json): samples and rounds per
    sample, so `dvc metrics show` puts the data's shape beside the results it produced."""
    info_path = data_dir / "info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    samples = info.get("samples") or {}
    rounds = info.get("rounds_per_sample") or {}
    return {
        "train_samples": samples.get("train"),
        "val_samples": samples.get("val"),
        "rounds_per_transcript": rounds.get("total"),
    }


@click.command()
@click.option("--adapter", "adapter", default="models/adapter", show_default=True,
              help="Adapter folder, or an MLflow runs:/ or models:/ URI.")
@click.option("--model", "model_dir", default="models/base", show_default=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", default="data/tokenized", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", default="reports/eval", show_default=True, type=click.Path(path_type=Path))
@click.option("--adapter-v2", "adapter_v2", default=None, type=click.Path(path_type=Path),
              help="The stacked SDF (Baize v2) adapter: compared with base and v1.5 when the folder exists.")
@click.option("--sdf-data", "sdf_data", default=None, type=click.Path(path_type=Path),
              help="The sdf_train stage's tokenized best answers (data/sdf/tokenized): perplexity on them too.")
@_common.entrypoint
def main(adapter: str, model_dir: Path, data_dir: Path, out_dir: Path, adapter_v2: Path | None,
         sdf_data: Path | None) -> None:
    params, tracking = _common.load("evaluate", "tracking")
    started = time.perf_counter()
    adapter_dir = inference.resolve_adapter(adapter)
    use_v2 = adapter_v2 is not None and adapter_v2.is_dir()
    if use_v2:
        _check_stack(adapter_v2, adapter_dir)
    val = evaluation.load_split(data_dir / "val")
    model, tokenizer = inference.load_model(model_dir, adapter_v2 if use_v2 else adapter_dir, dtype=params.dtype)
    models = ["base", "adapter", *(["v2"] if use_v2 else [])]

    n_ppl = len(val) if params.max_ppl_samples is None else min(len(val), params.max_ppl_samples)
    rows = [val[i] for i in range(n_ppl)]
    click.echo(f"evaluate: perplexity on {n_ppl} validation transcripts ({', '.join(models)})", err=True)
    ppl = evaluation.compare_perplexity(model, rows, batch_size=params.ppl_batch_size,
                                        pad_token_id=tokenizer.pad_token_id)
    ppl_sdf = None
    if use_v2 and sdf_data is not None and (sdf_data / "train").is_dir():
        best = evaluation.load_split(sdf_data / "train")
        each = evaluation.perplexities(model, [best[i] for i in range(len(best))], models,
                                       batch_size=params.ppl_batch_size, pad_token_id=tokenizer.pad_token_id)
        ppl_sdf = {name: r["perplexity"] for name, r in each.items()}

    prompts = evaluation.load_prompts(params.prompts, params.num_prompts)
    prompts += evaluation.heldout_prompts(val, tokenizer, params.heldout_prompts)
    which = ["base", "base_chat", *models[1:]]
    click.echo(f"evaluate: {len(prompts)} prompts x {len(which)} models, up to {params.max_new_tokens} new tokens",
               err=True)
    sampling = dict(which=which, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                    top_p=params.top_p, batch_size=params.batch_size, seed=params.seed,
                    max_context_tokens=params.max_context_tokens, prompt_format=params.prompt_format,
                    chat_tokenizer=inference.load_tokenizer(model_dir))
    from baize import progress

    with contextlib.closing(progress.bar(len(prompts) * len(which), desc="evaluate: answers", unit="answer")) as bar:
        if params.engine == "local":
            del model  # the engine loads the base once more and serves every adapter beside it
            answers = evaluation.generate_answers_served(
                model_dir, {"base": None, "adapter": adapter_dir, "v2": adapter_v2}, tokenizer, prompts,
                dtype=params.dtype, progress=bar.update, **sampling)
        else:
            answers = evaluation.generate_answers(model, tokenizer, prompts, progress=bar.update, **sampling)
            del model  # the judge's local backend and lm-eval load their own copies
    samples = evaluation.sample_rows(prompts, answers)
    metrics: dict = {
        "data": _data_summary(data_dir),
        "perplexity": ppl,
        **({"perplexity_sdf_best": ppl_sdf} if ppl_sdf else {}),
        "generation": {name: evaluation.format_metrics(gens) for name, gens in answers.items()},
    }

    details: dict = {}
    if params.judge.enabled:
        pairs = [("v2", "adapter"), ("adapter", "base")] if use_v2 else [("adapter", "base")]
        details = _judge(params, model_dir, samples, which, pairs)
        keep = ("judged", "unparsed", "answer_mean", "reference_mean", "relative_score_pct")
        metrics["judge"] = {name: {k: j["summary"][k] for k in keep} for name, j in details["single"].items()}
        metrics["pairwise"] = {
            key: {k: p["summary"][k] for k in ("win", "tie", "loss", "win_rate", "inconsistent_share", "unparsed")}
            for key, p in details["pairwise"].items()
        }
    if params.lm_eval_tasks:
        metrics["lm_eval"] = evaluation.run_lm_eval(model_dir, adapter_dir, params.lm_eval_tasks, params.lm_eval_limit)
    from baize import hardware

    placed = hardware.placement(params.dtype, model_dir)  # what load_model and the local backend chose
    device_tags, device_keys = placed.tags(), placed.run_keys()
    timing: dict = {"wall_s": round(time.perf_counter() - started, 1), **device_keys}

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    paths = _common.write_reports(out_dir / "metrics.json", headline=headline(metrics), report=metrics, run=timing)
    _common.write_json(out_dir / "details.json", {
        "by_category": {name: j["by_category"] for name, j in details.get("single", {}).items()},
        "judgments": {name: j["rows"] for name, j in details.get("single", {}).items()},
        "pairwise": {key: p["rows"] for key, p in details.get("pairwise", {}).items()},
    })
    atomic_write_text(out_dir / "report.md", _report(metrics, which))

    train_run = _common.adapter_run(adapter_dir, tracking.experiment)
    sdf_run = _common.adapter_run(adapter_v2, tracking.experiment, "sdf_train") if use_v2 else None
    with _common.mlflow_run("evaluate", tracking, ("evaluate",)) as run:
        import mlflow

        from baize.tracking import log_metrics

        tags = {"baize.adapter": str(adapter), **device_tags}
        if train_run:
            tags["baize.train_run_id"] = train_run  # the link from this evaluation to the run that trained it
        if sdf_run:
            tags["baize.sdf_train_run_id"] = sdf_run
        mlflow.set_tags(tags)
        log_metrics({**metrics, **timing})
        mlflow.log_table(data=evaluation.flat_table(samples), artifact_file="eval/samples.json")
        for name, j in details.get("single", {}).items():
            mlflow.log_table(data=evaluation.flat_table(j["rows"]), artifact_file=f"eval/judge_{name}.json")
        for key, p in details.get("pairwise", {}).items():
            mlflow.log_table(data=evaluation.flat_table(p["rows"]), artifact_file=f"eval/pairwise_{key}.json")
        mlflow.log_text(_report(metrics, which), "eval/report.md")
        if tracking.log_artifacts:
            for path in paths.values():
                mlflow.log_artifact(str(path), artifact_path="eval")
        # The model registry (tracking.registered_model): a version per adapter, @champion on the best.
        reg = _common.register_adapter(adapter_dir, tracking, registry_metrics(metrics, "adapter"), run.info.run_id,
                                       train_run)
        if reg:
            click.echo(reg.summary())
        if use_v2 and tracking.registered_model:  # v2 as its own model (`<name>-v2`): its champion is the best v2
            reg = _common.register_adapter(adapter_v2, tracking, registry_metrics(metrics, "v2"), run.info.run_id, sdf_run,
                                           name=f"{tracking.registered_model}-v2")
            click.echo(reg.summary())
        click.echo(
            f"reports/eval: perplexity base {ppl['base']:.3f} -> adapter {ppl['adapter']:.3f} "
            f"({ppl['drop_pct']:.1f}% lower) over {ppl['tokens']} AI-turn tokens; "
            f"stop rate base {metrics['generation']['base']['stop_rate']:.2f}, "
            f"adapter {metrics['generation']['adapter']['stop_rate']:.2f}"
            + (f"; v2 perplexity {ppl['v2']:.3f}, stop rate {metrics['generation']['v2']['stop_rate']:.2f}"
               if use_v2 else "")
            + f" (mlflow run {run.info.run_id})"
        )


if __name__ == "__main__":
    main()
