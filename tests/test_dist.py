"""``dist`` (DIST): the loss against the paper's Pearson-correlation definitions written out in plain
Python, its invariances, gradients, and CLI runs live and cached."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY, check_distill_and_resume, distill_args, run_cli_fast
from vitdistill.errors import UserError
from vitdistill.methods import build_method

# Three samples, four classes.
S = [[1.0, 2.0, 0.5, -0.3], [0.3, -1.2, 2.2, 0.0], [-0.5, 0.4, 0.1, 1.7]]
D = [[0.2, -0.7, 1.1, 0.4], [1.4, 0.9, -0.3, -1.0], [0.0, 0.5, -0.5, 2.0]]  # distillation head
T = [[2.0, 0.1, -0.4, 0.3], [0.0, 1.5, 0.7, -0.2], [0.9, -1.1, 0.2, 2.5]]
Y = [1, 2, 3]


def softmax(row: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (sa * sb + 1e-8)  # the authors' eps on the product of norms


def hand_dist(s: list[list[float]], t: list[list[float]], tau: float) -> tuple[float, float]:
    ys = [softmax(r, tau) for r in s]
    yt = [softmax(r, tau) for r in t]
    n, c = len(s), len(s[0])
    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(pearson([ys[i][j] for i in range(n)], [yt[i][j] for i in range(n)]) for j in range(c)) / c
    return tau * tau * inter, tau * tau * intra


def hand_ce(logits: list[list[float]], y: list[int]) -> float:
    return sum(-math.log(softmax(row, 1.0)[k]) for row, k in zip(logits, y)) / len(logits)


def t(rows: list[list[float]], **kw) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, **kw)  # float64: exact enough to compare at 1e-9


@pytest.mark.parametrize("beta, gamma, tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_loss_matches_the_paper(beta, gamma, tau):
    method = build_method({"name": "dist", "beta": beta, "gamma": gamma, "tau": tau})
    out = method({"logits": t(S)}, {"logits": t(T)}, torch.tensor(Y))
    inter, intra = hand_dist(S, T, tau)
    assert float(out["inter"]) == pytest.approx(inter, rel=1e-9)
    assert float(out["intra"]) == pytest.approx(intra, rel=1e-9)
    assert float(out["ce"]) == pytest.approx(hand_ce(S, Y), rel=1e-9)
    assert float(out["loss"]) == pytest.approx(hand_ce(S, Y) + beta * inter + gamma * intra, rel=1e-9)
    out32 = method({"logits": t(S).float()}, {"logits": t(T).float()}, torch.tensor(Y))  # the training dtype
    assert out32["loss"].dtype == torch.float32
    assert float(out32["loss"]) == pytest.approx(float(out["loss"]), rel=1e-5)


def test_defaults_follow_the_paper():
    method = build_method({"name": "dist"})
    assert (method.beta, method.gamma, method.tau) == (1.0, 1.0, 1.0)


def test_relation_terms_vanish_for_the_teacher_itself_and_are_at_most_two_tau_squared():
    method = build_method({"name": "dist", "tau": 2.0})
    same = method({"logits": t(T)}, {"logits": t(T) + 3.0}, torch.tensor(Y))  # a shift keeps the softmax
    assert float(same["inter"]) == pytest.approx(0.0, abs=1e-5)  # only the eps keeps it from 0
    assert float(same["intra"]) == pytest.approx(0.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    out = method({"logits": torch.randn(8, 5, generator=g)}, {"logits": torch.randn(8, 5, generator=g)},
                 torch.zeros(8, dtype=torch.long))
    assert 0 <= float(out["inter"]) <= 8 and 0 <= float(out["intra"]) <= 8  # 1 - rho in [0, 2], times tau^2


def test_distillation_head_gets_the_relation_terms_and_class_head_the_label():
    method = build_method({"name": "dist"})
    out = method({"logits": t(S), "dist_logits": t(D)}, {"logits": t(T)}, torch.tensor(Y))
    inter, intra = hand_dist(D, T, 1.0)
    assert float(out["ce"]) == pytest.approx(hand_ce(S, Y), rel=1e-9)
    assert float(out["inter"]) == pytest.approx(inter, rel=1e-9)
    assert float(out["intra"]) == pytest.approx(intra, rel=1e-9)


def test_soft_targets_give_soft_ce():
    soft = t([[0.1, 0.7, 0.2, 0.0], [0.0, 0.4, 0.6, 0.0], [0.3, 0.0, 0.0, 0.7]])
    out = build_method({"name": "dist"})({"logits": t(S)}, {"logits": t(T)}, soft)
    soft_ce = -sum(soft[i, c].item() * math.log(softmax(S[i], 1.0)[c]) for i in range(3) for c in range(4)) / 3
    assert float(out["ce"]) == pytest.approx(soft_ce, rel=1e-9)


def test_gradients_reach_both_heads_and_never_the_teacher():
    s, d = t(S, requires_grad=True), t(D, requires_grad=True)
    teacher = t(T, requires_grad=True)  # a leaf that would collect a gradient if the loss used it
    out = build_method({"name": "dist"})({"logits": s, "dist_logits": d}, {"logits": teacher}, torch.tensor(Y))
    out["loss"].backward()
    assert s.grad.abs().sum() > 0 and d.grad.abs().sum() > 0
    assert teacher.grad is None


def test_gradient_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    z_t = torch.randn(4, 5, dtype=torch.float64, generator=g)
    method = build_method({"name": "dist", "tau": 2.0})
    y = torch.tensor([0, 1, 2, 3])
    assert torch.autograd.gradcheck(lambda z: method({"logits": z}, {"logits": z_t}, y)["loss"], (s,))


@pytest.mark.parametrize("options", [{"beta": -1.0}, {"gamma": -0.5}, {"tau": 0.0}])
def test_bad_knobs_are_user_errors(options):
    with pytest.raises(UserError, match="bad knob for method 'dist'"):
        build_method({"name": "dist", **options})


def test_cli_distill_and_resume_with_a_cnn_teacher(teacher_run: Path, tmp_path: Path):
    args = distill_args("dist", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run)
    summary = check_distill_and_resume(tmp_path, args)
    assert summary["method"] == "dist"
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in rows[0] for k in ("loss_ce", "loss_inter", "loss_intra"))


def test_cli_distill_from_a_teacher_cache(teacher_run: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    r = run_cli_fast("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), "--epochs",
                "2", "--cache", str(cache), *TINY)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cached"
    r = run_cli_fast("distill", "--method", "dist", "--student", "deit_femto_distilled_patch4_16", "--teacher-cache",
                str(cache), "--epochs", "2", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["loss_inter"] <= 2 and 0 <= r["loss_intra"] <= 2 for r in rows)
    assert json.loads((out / "summary.json").read_text())["teacher_cache"] == str(cache)


def test_micro_batches_of_one_sample_are_refused(teacher_run: Path, tmp_path: Path):
    """L_intra correlates a class's column over the batch: a micro-batch of one would teach nothing."""
    args = [*distill_args("dist", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run), "--out", str(tmp_path / "r")]
    r = run_cli_fast(*args, "--batch-size", "4", "--set", "train.accum_steps=4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "each micro-batch needs at least 2; this run's hold 1 (4 images a step" in r.stderr
    assert not (tmp_path / "r").exists()
    r = run_cli_fast(*args, "--batch-size", "4", "--set", "train.accum_steps=2", "--set", "train.stop_after=1")
    assert r.returncode == 0, r.stderr  # two samples a micro-batch serve
