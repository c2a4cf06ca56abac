"""Calibration beside top-1: the expected calibration error (Guo et al., ICML 2017) and the test
NLL, checked against a hand computation, and reported by runs, eval and the leaderboard."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli_fast
from vitdistill.engine.evaluate import calibration


def _by_hand(logits: np.ndarray, labels: np.ndarray, bins: int) -> tuple[float, float]:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    ece = 0.0
    for m in range(bins):  # bin m: ((m)/M, (m+1)/M]
        inside = (conf > m / bins) & (conf <= (m + 1) / bins)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    nll = -np.mean(np.log(p[np.arange(len(labels)), labels]))
    return ece, nll


@pytest.mark.parametrize("bins", [15, 4])
def test_ece_and_nll_match_the_equation(bins: int) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 7)) * rng.uniform(0.2, 4, size=(500, 1))
    labels = rng.integers(0, 7, size=500)
    got = calibration(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), bins=bins)
    ece, nll = _by_hand(logits, labels, bins)
    assert got["ece"] == pytest.approx(ece, abs=1e-6) and got["nll"] == pytest.approx(nll, rel=1e-5)


def test_ece_of_known_cases() -> None:
    # always right with confidence 1 (to float precision): no calibration error; a confident
    # wrong answer: error 1; a uniform guesser among 4 classes that is right a quarter of the time: 0
    sure = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert calibration(sure, torch.tensor([0, 1]))["ece"] == pytest.approx(0.0, abs=1e-6)
    assert calibration(sure, torch.tensor([1, 0]))["ece"] == pytest.approx(1.0, abs=1e-6)
    flat = torch.zeros(4, 4)
    assert calibration(flat, torch.tensor([0, 1, 2, 3]))["ece"] == pytest.approx(0.0, abs=1e-6)
    assert calibration(flat, torch.tensor([0, 1, 2, 3]))["nll"] == pytest.approx(math.log(4), rel=1e-6)


def test_runs_and_eval_report_calibration(teacher_run: Path) -> None:
    rows = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["test_ece"] <= 1 and r["test_nll"] > 0 for r in rows)
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert summary["student_ece"] == rows[-1]["test_ece"] and summary["student_nll"] == rows[-1]["test_nll"]
    assert "ECE (%)" in (teacher_run / "report.md").read_text()
    r = run_cli_fast("eval", "--student", str(teacher_run))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # eval scores the run's own test subset with the run's final weights: the same figures
    assert out["ece"] == pytest.approx(summary["student_ece"], abs=1e-6)
    assert out["nll"] == pytest.approx(summary["student_nll"], rel=1e-5)


def test_top1_is_argmax_on_tied_logits() -> None:
    """int8 logits tie often; top-1 and agreement are what an argmax over the file gives."""
    from vitdistill.engine.evaluate import accuracy

    logits = torch.tensor([[2.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 0])
    got = accuracy(logits, labels, teacher_pred=logits.argmax(1))
    assert got["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert got["top1"] == 1.0 and got["agreement"] == 1.0
