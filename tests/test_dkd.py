"""``dkd`` (Decoupled Knowledge Distillation): the loss against the paper's definitions written out in
plain Python, the KD decomposition identity, the warm-up, gradients, and CLI runs live and cached."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY, check_distill_and_resume, distill_args, run_cli_fast
from vitdistill.errors import UserError
from vitdistill.methods import build_method, soft_kl

# Three samples, four classes; the teacher's argmax differs from the label in row 0.
S = [[1.0, 2.0, 0.5, -0.3], [0.3, -1.2, 2.2, 0.0], [-0.5, 0.4, 0.1, 1.7]]
D = [[0.2, -0.7, 1.1, 0.4], [1.4, 0.9, -0.3, -1.0], [0.0, 0.5, -0.5, 2.0]]  # distillation head
T = [[2.0, 0.1, -0.4, 0.3], [0.0, 1.5, 0.7, -0.2], [0.9, -1.1, 0.2, 2.5]]
Y = [1, 2, 3]


def softmax(row: list[float], tau: float) -> list[float]:
    m = max(v / tau for v in row)
    e = [math.exp(v / tau - m) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def hand_dkd(s: list[list[float]], t: list[list[float]], y: list[int], tau: float) -> tuple[float, float]:
    """TCKD and NCKD straight from the paper: binary [p_t, 1 - p_t] and the renormalised non-target
    distribution p_c / (1 - p_t), c != t; tau^2 * KL, averaged over the batch."""
    tckd = nckd = 0.0
    for s_row, t_row, k in zip(s, t, y):
        ps, pt = softmax(s_row, tau), softmax(t_row, tau)
        tckd += kl([pt[k], 1 - pt[k]], [ps[k], 1 - ps[k]])
        rest = [c for c in range(len(s_row)) if c != k]
        nckd += kl([pt[c] / (1 - pt[k]) for c in rest], [ps[c] / (1 - ps[k]) for c in rest])
    return tau * tau * tckd / len(s), tau * tau * nckd / len(s)


def hand_ce(logits: list[list[float]], y: list[int]) -> float:
    return sum(-math.log(softmax(row, 1.0)[k]) for row, k in zip(logits, y)) / len(logits)


def t(rows: list[list[float]], **kw) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, **kw)  # float64: exact enough to compare at 1e-9


@pytest.mark.parametrize("alpha, beta, tau", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_loss_matches_the_paper(alpha, beta, tau):
    method = build_method({"name": "dkd", "alpha": alpha, "beta": beta, "tau": tau, "warmup_epochs": 0})
    out = method({"logits": t(S)}, {"logits": t(T)}, torch.tensor(Y))
    tckd, nckd = hand_dkd(S, T, Y, tau)
    assert float(out["tckd"]) == pytest.approx(tckd, rel=1e-9)
    assert float(out["nckd"]) == pytest.approx(nckd, rel=1e-9)
    assert float(out["ce"]) == pytest.approx(hand_ce(S, Y), rel=1e-9)
    assert float(out["loss"]) == pytest.approx(hand_ce(S, Y) + alpha * tckd + beta * nckd, rel=1e-9)
    out32 = method({"logits": t(S).float()}, {"logits": t(T).float()}, torch.tensor(Y))  # the training dtype
    assert out32["loss"].dtype == torch.float32
    assert float(out32["loss"]) == pytest.approx(float(out["loss"]), rel=1e-5)


def test_kd_is_tckd_plus_weighted_nckd():
    # the paper's reformulation, per sample: KD = TCKD + (1 - p_t^T) * NCKD
    method = build_method({"name": "dkd", "warmup_epochs": 0, "tau": 2.0})
    for i in range(len(S)):
        out = method({"logits": t(S[i:i + 1])}, {"logits": t(T[i:i + 1])}, torch.tensor(Y[i:i + 1]))
        pt = softmax(T[i], 2.0)[Y[i]]
        kd = soft_kl(t(S[i:i + 1]), t(T[i:i + 1]), 2.0)
        assert float(out["tckd"] + (1 - pt) * out["nckd"]) == pytest.approx(float(kd), rel=1e-9)


def test_distillation_head_gets_the_kd_terms_and_class_head_the_label():
    method = build_method({"name": "dkd", "warmup_epochs": 0})
    out = method({"logits": t(S), "dist_logits": t(D)}, {"logits": t(T)}, torch.tensor(Y))
    tckd, nckd = hand_dkd(D, T, Y, 4.0)
    assert float(out["ce"]) == pytest.approx(hand_ce(S, Y), rel=1e-9)
    assert float(out["tckd"]) == pytest.approx(tckd, rel=1e-9)
    assert float(out["nckd"]) == pytest.approx(nckd, rel=1e-9)


def test_soft_targets_use_their_argmax_class_and_soft_ce():
    method = build_method({"name": "dkd", "warmup_epochs": 0})
    soft = t([[0.1, 0.7, 0.2, 0.0], [0.0, 0.4, 0.6, 0.0], [0.3, 0.0, 0.0, 0.7]])  # argmax = Y
    out = method({"logits": t(S)}, {"logits": t(T)}, soft)
    tckd, nckd = hand_dkd(S, T, Y, 4.0)
    soft_ce = -sum(soft[i, c].item() * math.log(softmax(S[i], 1.0)[c]) for i in range(3) for c in range(4)) / 3
    assert float(out["ce"]) == pytest.approx(soft_ce, rel=1e-9)
    assert float(out["tckd"]) == pytest.approx(tckd, rel=1e-9)
    assert float(out["nckd"]) == pytest.approx(nckd, rel=1e-9)


def test_linear_warmup_of_the_kd_terms():
    method = build_method({"name": "dkd"})  # 20 epochs, as in the paper
    assert method.warmup_epochs == 20 and (method.alpha, method.beta, method.tau) == (1.0, 8.0, 4.0)
    base = build_method({"name": "dkd", "warmup_epochs": 0})
    full = base({"logits": t(S)}, {"logits": t(T)}, torch.tensor(Y))
    kd_full = float(full["loss"] - full["ce"])
    for epoch, weight in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        method.on_epoch_start(epoch)
        out = method({"logits": t(S)}, {"logits": t(T)}, torch.tensor(Y))
        assert float(out["loss"] - out["ce"]) == pytest.approx(weight * kd_full, rel=1e-9)


def test_confident_teacher_stays_finite():
    s = t([[0.0, 30.0, -30.0, 5.0]], requires_grad=True)
    out = build_method({"name": "dkd", "warmup_epochs": 0, "tau": 1.0})(
        {"logits": s}, {"logits": t([[0.0, 200.0, -100.0, 0.0]])}, torch.tensor([1]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(s.grad).all()


def test_gradients_reach_both_heads_and_never_the_teacher():
    s, d = t(S, requires_grad=True), t(D, requires_grad=True)
    teacher = t(T, requires_grad=True)  # a leaf that would collect a gradient if the loss used it
    out = build_method({"name": "dkd", "warmup_epochs": 0})({"logits": s, "dist_logits": d}, {"logits": teacher},
                                                            torch.tensor(Y))
    out["loss"].backward()
    assert s.grad.abs().sum() > 0 and d.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("options", [{"alpha": -1.0}, {"beta": -0.5}, {"tau": 0.0}, {"warmup_epochs": -1},
                                     {"warmup_epochs": 2.5}])
def test_bad_knobs_are_user_errors(options):
    with pytest.raises(UserError, match="bad knob for method 'dkd'"):
        build_method({"name": "dkd", **options})


def test_cli_distill_and_resume_with_a_cnn_teacher(teacher_run: Path, tmp_path: Path):
    args = distill_args("dkd", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run, "--set",
                        "method.warmup_epochs=2")
    summary = check_distill_and_resume(tmp_path, args)
    assert summary["method"] == "dkd"
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in rows[0] for k in ("loss_ce", "loss_tckd", "loss_nckd"))


def test_cli_distill_from_a_teacher_cache(teacher_run: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    r = run_cli_fast("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), "--epochs",
                "2", "--cache", str(cache), *TINY)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cached"
    r = run_cli_fast("distill", "--method", "dkd", "--student", "deit_femto_distilled_patch4_16", "--teacher-cache",
                str(cache), "--epochs", "2", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss_nckd"]) and r["loss_tckd"] >= 0 for r in rows)
    assert json.loads((out / "summary.json").read_text())["teacher_cache"] == str(cache)
