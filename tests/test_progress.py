"""Progress off a terminal (DVC's queued/temp experiments, CI, `| tee`): plain lines, also while nothing advances."""

from __future__ import annotations

import time

from baize import progress


def test_off_a_terminal_a_bar_prints_plain_lines_while_nothing_advances(capsys, monkeypatch):
    monkeypatch.delenv("BAIZE_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.3)
    ticks = iter(range(1000))
    bar = progress.bar(4, desc="selfchat", unit="seed", postfix=lambda: f"{next(ticks)} tok")
    time.sleep(1.5)  # a batch under way: no seed finished yet
    bar.update(4)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) >= 3, err  # the first, at least one while waiting, the last
    assert all(line.startswith("selfchat:") for line in lines), err
    assert "0/4" in lines[0] and "4/4" in lines[-1] and "seed/s" in lines[-1] and "tok" in lines[-1]


def test_progress_can_be_turned_off(capsys, monkeypatch):
    monkeypatch.setenv("BAIZE_PROGRESS", "0")
    with progress.phases("base_model", ["read", "save"]) as start:
        start("read")
        start("save")
    bar = progress.bar(2, desc="x")
    bar.update(2)
    bar.close()
    assert capsys.readouterr().err == ""


def test_phases_name_the_step_under_way(capsys, monkeypatch):
    monkeypatch.delenv("BAIZE_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.2)
    with progress.phases("base_model", ["read GGUF", "write safetensors"]) as start:
        start("read GGUF")
        time.sleep(0.7)
        start("write safetensors")
    lines = capsys.readouterr().err.splitlines()
    assert any("step 0/2, read GGUF" in line for line in lines), lines
    assert "2/2" in lines[-1], lines
