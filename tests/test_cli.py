"""End-to-end CLI runs on the tiny digits recipe, and every bad input of the foundation issue."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, run_cli, run_cli_fast

SUMMARY_KEYS = {"student_top1", "teacher_top1", "params", "flops", "latency_ms_b1", "throughput_img_s",
                "peak_mem_mb", "method", "data", "wall_s"}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stable(rows: list[dict]) -> list[dict]:
    """Drop the wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in ("img_s", "epoch_s")} for r in rows]


def test_methods_and_models_list() -> None:
    r = run_cli("methods")
    assert r.returncode == 0
    for name in ("none", "logit-kd", "deit-soft", "deit-hard"):
        assert name in r.stdout
    assert "Touvron" in r.stdout and "Hinton" in r.stdout
    r = run_cli("models")
    assert r.returncode == 0 and "deit_femto_distilled_patch4_16" in r.stdout and "resnet_micro_cnn" in r.stdout


def test_listing_the_methods_does_not_import_timm() -> None:
    # timm's import is most of `vitdistill methods`' time on a small CPU, and no method needs timm
    # to be registered: vitdistill.models loads its timm-backed names on first use
    code = "import sys; from vitdistill.cli import main; main(['methods']); print(sorted(m for m in sys.modules if m.split('.')[0] == 'timm'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"
    assert "deit-hard" in r.stdout


def test_a_reader_that_goes_away_stops_the_listing_quietly() -> None:
    # `vitdistill methods | head -1`: a pipe whose reading end is already closed meets every write
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        for args in (["methods"], ["models", "--timm", "deit*"]):
            r = subprocess.run([sys.executable, "-m", "vitdistill", *args], stdout=write_end, stderr=subprocess.PIPE,
                               text=True, timeout=120)
            assert (r.returncode, r.stderr) == (141, ""), args
    finally:
        os.close(write_end)


def test_help_for_every_command() -> None:
    for cmd in ("train", "distill", "synthesize", "eval", "profile", "demo", "methods", "models"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def test_distill_end_to_end(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "deit"
    r = run_cli("distill", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run),
                "--student", "deit_femto_distilled_patch4_16", "--method", "deit-hard", "--epochs", "2",
                "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "student.safetensors", "checkpoint.pt",
                 "report.md", "report.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys() and summary["method"] == "deit-hard"
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss_ce", "loss_kd", "test_agreement", "train_loss"} <= rows[0].keys()
    assert summary["student_top1"] == rows[-1]["test_top1"]

    # eval on the run directory reproduces the summary's figure
    r = run_cli("eval", "--student", str(out), "--teacher", "resnet_micro_cnn", "--teacher-weights",
                str(teacher_run), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["top1"] == summary["student_top1"] and ev["agreement"] == summary["agreement"]

    # the plain student loads with timm alone (no vitdistill import) and scores what the run scored
    script = f"""
import json, sys, torch, timm
from safetensors import safe_open
from safetensors.torch import load_file
path = {str(out / 'student.safetensors')!r}
with safe_open(path, 'pt') as f:
    meta = f.metadata()
assert 'vitdistill' not in sys.modules
model = timm.create_model(meta['timm_name'], **json.loads(meta['timm_kwargs']))
model.load_state_dict(load_file(path))
model.eval()
x = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)
with torch.no_grad():
    print(json.dumps(model(x).argmax(1).tolist()))
assert 'vitdistill' not in sys.modules
"""
    import torch

    from vitdistill.models import InputPrep, create_model

    model, _ = create_model("deit_femto_distilled_patch4_16", 10, 16, weights=str(out / "student.safetensors"))
    model.eval()
    from vitdistill.data import load_data

    images = load_data("digits").test.images[:64]
    x = InputPrep.for_model(model)(images)
    torch.save(x, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(x).argmax(1).tolist()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected

    r = run_cli("profile", "--model", str(out), "--batch", "8")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout.strip().splitlines()[-1])
    assert prof["params"] == summary["params"] and prof["flops"] == summary["flops"]


def test_same_seed_same_metrics_and_resume(tmp_path: Path) -> None:
    args = ["train", "--model", "vit_femto_patch4_16", "--epochs", "3", *TINY, "--set", "data.train_limit=512"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_cli(*args, "--out", str(a)).returncode == 0
    assert run_cli(*args, "--out", str(b)).returncode == 0
    assert _stable(_metrics(a)) == _stable(_metrics(b))

    # kill a run (SIGKILL, nothing gets to clean up) once its first checkpoint is on disk, then resume
    proc = subprocess.Popen([sys.executable, "-m", "vitdistill", *args, "--out", str(c)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (c / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_metrics(c))
    assert done < 3, "the run finished before it could be killed; the test needs a slower epoch"
    r = run_cli(*args, "--out", str(c), "--resume")
    assert r.returncode == 0, r.stderr
    assert _stable(_metrics(c)) == _stable(_metrics(a))
    assert json.loads((c / "summary.json").read_text())["student_top1"] == _metrics(a)[-1]["test_top1"]


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _tiny_imagefolder(root: Path, classes: int) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_bad_inputs(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    base = ["--out", str(out), *TINY]
    distill = ["distill", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run)]

    # one real process: the one-line contract holds for the console script, not just main()
    _one_line_error(run_cli("train", "--model", "vit_femto_patch4_61", *base), "unknown model", "vit_femto_patch4_16")
    _one_line_error(run_cli_fast(*distill, "--student", "deit_femto_distilled_patch4_16", "--method", "deit-hrd", *base),
                    "unknown method", "deit-hard")
    _one_line_error(run_cli_fast("train", "--data", "cifar1:/nowhere", *base), "unknown data source", "cifar10")
    _one_line_error(run_cli_fast("train", "--data", f"imagefolder:{tmp_path / 'missing'}", *base), "missing")
    _one_line_error(run_cli_fast("train", "--set", "train.epoch=3", *base), "train.epoch", "epochs")
    _one_line_error(run_cli_fast("train", "--set", "train.epochs=three", *base), "train.epochs")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: 0.001\n  warmup: 2\n")
    _one_line_error(run_cli_fast("train", "--config", str(cfg), *base), "train.warmup", "warmup_epochs")
    _one_line_error(run_cli_fast(*distill, "--student", "vit_femto_patch4_16", "--method", "deit-hard", *base),
                    "distillation token", "deit_femto_distilled_patch4_16")
    # weights for another model, and a checkpoint for another class count
    _one_line_error(run_cli_fast("train", "--model", "vit_femto_patch4_16", "--weights", str(teacher_run), *base),
                    "do not fit")
    folder = _tiny_imagefolder(tmp_path / "three", 3)
    _one_line_error(run_cli_fast(*distill, "--student", "deit_femto_distilled_patch4_16", "--method", "deit-hard",
                            "--data", f"imagefolder:{folder}", *base), "do not fit", "classes")
    # a corrupt image inside a tar archive is named
    (folder / "train" / "class1" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    archive = tmp_path / "three.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="three")
    _one_line_error(run_cli_fast("train", "--data", f"imagefolder:{archive}", *base), "class1/2.png")
    assert not out.exists(), "a failed run must leave nothing behind"


def test_pretrained_weights_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: the fetch must fail fast and cleanly
    r = run_cli("train", "--model", "resnet18", "--set", "model.pretrained=true", "--out", str(tmp_path / "p"), *TINY)
    _one_line_error(r, "pretrained weights", "resnet18", "--student-weights")


def test_resume_refuses_other_config(tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["train", "--model", "vit_femto_patch4_16", "--epochs", "1", "--out", str(out), *TINY]
    assert run_cli_fast(*args).returncode == 0
    _one_line_error(run_cli_fast(*args), "already holds a run", "--resume")
    _one_line_error(run_cli_fast(*args, "--resume", "--lr", "0.5"), "cannot resume", "train.lr")
    # a train run resumed by distill would have written student.safetensors beside its model.safetensors
    distill = ["distill", "--student", "vit_femto_patch4_16", "--method", "none", *args[3:]]
    _one_line_error(run_cli_fast(*distill, "--resume"), "with `distill`: it is a `train` run",
                    "vitdistill train --resume")


def test_keys_added_after_a_run_began_do_not_block_its_resume() -> None:
    from vitdistill.config import build_config
    from vitdistill.engine.run import _comparable, _first_difference

    now = build_config([]).to_dict()
    then = {k: v for k, v in now.items() if k != "synth"}  # a run begun before the synth section existed
    then["train"] = {k: v for k, v in now["train"].items() if k != "teacher_stream"}
    assert _first_difference(_comparable(now), _comparable(then)) == ""
    then["train"]["lr"] = 0.5
    assert _first_difference(_comparable(now), _comparable(then)) == "train.lr: 0.5 then, 0.001 now"
    assert "synth" not in _comparable(now)  # synthesis knobs never change a training run


def test_a_method_knob_left_at_its_default_then_set_on_resume_blocks_it() -> None:
    from vitdistill.config import build_config
    from vitdistill.engine.run import _comparable, _first_difference

    then = build_config([{"method": {"name": "dkd"}}]).to_dict()  # saved: no knob given
    same = build_config([{"method": {"name": "dkd", "beta": 8.0, "tau": 4}}]).to_dict()  # the defaults, spelt out
    assert _first_difference(_comparable(same), _comparable(then)) == ""
    now = build_config([{"method": {"name": "dkd", "beta": 2.0}}]).to_dict()
    assert _first_difference(_comparable(now), _comparable(then)) == "method.beta: 8.0 then, 2.0 now"
    # another method is named as such, not by the first of its knobs the alphabet reaches
    other = build_config([{"method": {"name": "logit-kd"}}]).to_dict()
    assert _first_difference(_comparable(other), _comparable(then)) == "method.name: 'dkd' then, 'logit-kd' now"
    # tuple and None defaults compare with the lists and nulls a saved JSON config holds
    attn = build_config([{"method": {"name": "attention", "student_layers": None}}]).to_dict()
    assert _first_difference(_comparable(attn), _comparable(json.loads(json.dumps(attn)))) == ""


def test_a_warmup_longer_than_any_run_trains_without_overflow(tmp_path: Path) -> None:
    # warmup_epochs * steps overflows round() past 1.8e308; the lr then simply never peaks
    out = tmp_path / "long-warmup"
    r = run_cli_fast("train", "--model", "vit_femto_patch4_16", "--epochs", "1", "--out", str(out), *TINY,
                     "--set", "train.warmup_epochs=1e308")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["lr"] < 1e-6
