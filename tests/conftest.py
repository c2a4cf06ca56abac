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


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
