"""benchmarks/gpu_check.py cannot rot: its --cpu-smoke mode runs every small-model path (int8 LoRA steps, resume,
perplexity, the local backend, export) and the measurement code on a tiny LLaMA, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gpu_check_cpu_smoke(base_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--tokenizer", str(base_model_dir),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=220, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    by_part = {r["part"]: r for r in result["rows"]}
    for part in ("int8 LoRA steps (Trainer)", "resume from a checkpoint", "evaluation: perplexity base vs adapter",
                 "local backend (continuous batching, adapter merged)", "export (adapter merged, bf16 folder)"):
        assert by_part[part]["status"] == "ok", by_part.get(part)
        assert by_part[part]["device"] == "cpu"
    measured = [r for r in result["rows"] if r["part"].endswith("(L2 d64)")]
    assert [r["status"] for r in measured] == ["ok", "ok"] and all(r["tokens_per_s"] > 0 for r in measured)
    assert "| part | status |" in proc.stdout and (tmp_path / "gpu_check.md").is_file()
