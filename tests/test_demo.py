"""`vitdistill demo` end to end at a few per cent of its epochs: the runs, the table and the refusal."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import run_cli


def test_demo_trains_three_runs_and_reports_them(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", str(out), "--seed", "0", "--scale", "0.03", "--threads", "1")  # one epoch per run
    assert r.returncode == 0, r.stderr
    demo = json.loads((out / "demo.json").read_text())
    assert demo["threads"] == 1
    assert all(yaml.safe_load((out / d / "config.yaml").read_text())["train"]["threads"] == 1
               for d in ("teacher", "student-none", "student-deit-hard"))
    assert [(row["role"], row["method"]) for row in demo["rows"]] == [
        ("teacher", "none"), ("baseline", "none"), ("distilled", "deit-hard")]
    assert [row["model"] for row in demo["rows"]] == [
        "resnet_micro_cnn", "vit_femto_patch4_16", "deit_femto_distilled_patch4_16"]
    for run, weights in (("teacher", "model"), ("student-none", "model"), ("student-deit-hard", "student")):
        assert (out / run / f"{weights}.safetensors").is_file() and (out / run / "report.md").is_file()
        summary = json.loads((out / run / "summary.json").read_text())
        assert summary["epochs"] == 1
    teacher, baseline, distilled = demo["rows"]
    gain = (distilled["top1"] - baseline["top1"]) * 100
    assert f"deit-hard vs no-KD student: {gain:+.2f} points top-1" in r.stdout
    assert "Top-1 on 359 test digits, so one image is 0.28 points" in r.stdout
    assert "deit_femto_distilled_patch4_16" in (out / "demo.md").read_text()

    again = run_cli("demo", "--out", str(out), "--scale", "0.03")
    assert again.returncode == 2 and "already holds a demo" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr


def test_demo_threads_out_of_range_is_one_line(tmp_path: Path) -> None:
    for n in ("0", "5000"):  # the demo has no config, so the flag is named, before any run prints
        r = run_cli("demo", "--out", str(tmp_path / "d"), "--threads", n)
        assert r.returncode == 2 and r.stderr.strip() == f"error: --threads {n}: give a number from 1 to 1024"
        assert r.stdout == "" and not (tmp_path / "d").exists()
