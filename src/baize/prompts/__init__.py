"""Evaluation prompts shipped with baize.

`questions.jsonl`: 80 questions written for this project in the spirit of the Vicuna-80 benchmark the paper
used (not its text): 10 generic, 10 knowledge, 10 roleplay, 10 common-sense, 10 Fermi, 10 counterfactual,
7 coding, 3 math, 10 writing. One JSON object per line: `{"id", "category", "text"}`.

`sdf_judge_v1.txt`: the Baize v2 (SDF) judge prompt, one score from 1 to 100 per answer (`baize.judge`), in the
order of Vicuna's judge prompt (question, answer, then the instructions). `sdf_judge_v2.txt`: the same words with
the instructions first, so every judge call starts with the same text and a server's (or the local backend's)
prefix cache computes it once: the local judge's prefill is then the question and the answer only. A changed
prompt is a new file, so a params value names exactly the text that judged a run.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

PACKAGED = {"vicuna80": "questions.jsonl"}


def load_packaged(name: str = "vicuna80") -> list[dict[str, Any]]:
    if name not in PACKAGED:
        raise KeyError(name)
    text = resources.files(__package__).joinpath(PACKAGED[name]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_text(name: str) -> str:
    """A packaged prompt text, `src/baize/prompts/<name>.txt`."""
    path = resources.files(__package__).joinpath(f"{name}.txt")
    if not name or "/" in name or not path.is_file():
        raise KeyError(name)
    return path.read_text(encoding="utf-8")
