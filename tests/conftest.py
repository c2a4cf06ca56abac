"""Shared fixtures: a tiny digits recipe and a CLI runner in a subprocess (real exit codes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and one thread per process keeps the CLI subprocesses
# from oversubscribing a 2-core machine.
torch.set_num_threads(1)

# Tiny but real: a few hundred digits, a couple of epochs, batch 64.
TINY = ["--set", "data.train_limit=256", "--set", "data.test_limit=128", "--batch-size", "64",
        "--set", "train.warmup_epochs=0.5", "--threads", "1", "--no-progress"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitdistill", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("VITDISTILL_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN teacher trained on digits through the CLI, shared by the tests that need one."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    r = run_cli("train", "--model", "resnet_micro_cnn", "--epochs", "3", "--out", str(out), "--lr", "3e-3", *TINY)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def vit_teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT teacher (vit_femto_patch4_16, 16 px digits) for the methods that need a ViT teacher."""
    out = tmp_path_factory.mktemp("runs") / "vit-teacher"
    r = run_cli("train", "--model", "vit_femto_patch4_16", "--epochs", "2", "--out", str(out), "--lr", "3e-3", *TINY)
    assert r.returncode == 0, r.stderr
    return out


def distill_args(method: str, student: str, teacher: str, teacher_weights: Path, *extra: str) -> list[str]:
    """A tiny 2-epoch ``distill`` command line for one method (students and teachers at 16 px digits)."""
    return ["distill", "--method", method, "--student", student, "--teacher", teacher,
            "--teacher-weights", str(teacher_weights), "--epochs", "2", *TINY, *extra]


def run_cli_fast(*args: str) -> subprocess.CompletedProcess:
    """:func:`run_cli` in this process, for the many one-line-error checks: same exit code, stdout
    and stderr as the command (an unexpected exception would propagate and fail the test, which is
    what a traceback in the subprocess would do), without importing torch and timm again."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli_here(*args)
    return subprocess.CompletedProcess(["vitdistill", *args], code, out.getvalue(), err.getvalue())


def run_cli_here(*args: str) -> int:
    """The CLI's entry point in this process: the same code path as ``vitdistill ...`` without a new
    interpreter (importing torch and timm again costs seconds per call on a 2-core machine)."""
    from vitdistill.cli import main

    return main(list(args))


def check_distill_and_resume(tmp_path: Path, args: list[str]) -> dict:
    """Run ``args`` for 2 epochs straight through the real command line, and again in this process as
    1 epoch (``train.stop_after=1``) then ``--resume``. Both must end with the same metrics, which
    holds only when the method's own state (projectors, stage, random draws) is saved and restored.
    Returns the straight run's summary."""
    import json

    straight = tmp_path / "straight"
    r = run_cli(*args, "--out", str(straight))
    assert r.returncode == 0, r.stderr
    resumed = tmp_path / "resumed"
    assert run_cli_here(*args, "--out", str(resumed), "--set", "train.stop_after=1") == 0
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 1
    assert run_cli_here(*args, "--out", str(resumed), "--resume") == 0
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    keys = [k for k in a[-1] if k.startswith(("loss", "train_loss", "test_"))]
    assert [[row[k] for k in keys] for row in a] == [[row[k] for k in keys] for row in b]
    return json.loads((straight / "summary.json").read_text())


def load_run_model_top1(run: Path) -> float:
    """Top-1 on the run's own test split of the model that ``vitdistill.evaluation.load_run_model``
    rebuilds from the run directory alone (the Python way back documented in docs/usage.md)."""
    from vitdistill.config import build_config, load_yaml
    from vitdistill.engine.setup import load_run_data
    from vitdistill.evaluation import load_run_model
    from vitdistill.models import InputPrep

    model = load_run_model(run)
    data = load_run_data(build_config([load_yaml(run / "config.yaml")]))
    with torch.no_grad():
        logits = model(InputPrep.for_model(model)(data.test.images))
    return (logits.argmax(1) == data.test.labels).float().mean().item()
