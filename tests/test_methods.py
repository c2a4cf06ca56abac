"""Tests of the distillation methods: the shared KD math, each method's loss against hand-computed
values, gradients through a tiny real student, and the user errors of building a method."""
from __future__ import annotations

import math
import re

import pytest
import torch

from vitdistill.errors import UserError
from vitdistill.methods import METHODS, Method, build_method, method_knobs, soft_kl
from vitdistill.models import Teacher, create_model, prepare_student, student_outputs
from vitdistill.models.wrappers import InputPrep

# Two samples, three classes. The teacher's argmax ([0, 1]) differs from the labels ([1, 2]) on
# purpose, so hard distillation and label CE cannot be confused.
S = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]
D = [[0.2, -0.7, 1.1], [1.4, 0.9, -0.3]]  # a second (distillation) head
T = [[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]]
Y = [1, 2]


# ---------------------------------------------------------------- hand math (plain Python)


def log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    z = [v / tau for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def hand_kl(s: list[list[float]], t: list[list[float]], tau: float, normalize: str) -> float:
    """tau^2 * sum_i KL(softmax(t_i/tau) || softmax(s_i/tau)) / (B or B*C)."""
    total = 0.0
    for s_row, t_row in zip(s, t):
        ls, lt = log_softmax(s_row, tau), log_softmax(t_row, tau)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    denom = len(s) if normalize == "batchmean" else len(s) * len(s[0])
    return tau * tau * total / denom


def hand_ce(logits: list[list[float]], target: list[int], eps: float = 0.0) -> float:
    """Mean over the batch of (1 - eps) * -log p_y + eps * mean_c(-log p_c) (PyTorch's smoothing)."""
    total = 0.0
    for row, y in zip(logits, target):
        lp = log_softmax(row)
        total += (1 - eps) * -lp[y] + eps * sum(-v for v in lp) / len(lp)
    return total / len(logits)


def argmax(rows: list[list[float]]) -> list[int]:
    return [max(range(len(r)), key=r.__getitem__) for r in rows]


def tensor(rows: list[list[float]], **kw) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, **kw)


def approx(x: torch.Tensor | float, rel: float = 1e-5):
    return pytest.approx(x, rel=rel, abs=1e-7)


# ---------------------------------------------------------------- soft_kl


def test_hand_helpers_agree_with_a_closed_form():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert hand_kl([[0.0, 0.0]], [[math.log(3.0), 0.0]], 1.0, "batchmean") == approx(expected, 1e-12)
    assert float(soft_kl(tensor([[0.0, 0.0]]), tensor([[math.log(3.0), 0.0]]), 1.0)) == approx(expected)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("normalize", ["batchmean", "elements"])
def test_soft_kl_matches_the_equation(tau, normalize):
    got = soft_kl(tensor(S), tensor(T), tau, normalize=normalize)
    assert got.shape == ()
    assert float(got) == approx(hand_kl(S, T, tau, normalize))


def test_soft_kl_default_is_batchmean_and_elements_is_c_times_smaller():
    batchmean = soft_kl(tensor(S), tensor(T), 2.0)
    elements = soft_kl(tensor(S), tensor(T), 2.0, normalize="elements")
    assert float(batchmean) == approx(hand_kl(S, T, 2.0, "batchmean"))
    assert float(elements) * 3 == approx(float(batchmean))


def test_soft_kl_includes_the_tau_squared_factor():
    # Without tau^2 the value at tau=4 would be 16x smaller than the hand value.
    raw = hand_kl(S, T, 4.0, "batchmean") / 16.0
    assert float(soft_kl(tensor(S), tensor(T), 4.0)) == approx(raw * 16.0)
    assert float(soft_kl(tensor(S), tensor(T), 4.0)) > 10 * raw


def test_soft_kl_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert float(soft_kl(z, z.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    # adding a constant per row does not change a softmax
    assert float(soft_kl(z + 10.0, z, 3.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(soft_kl(z, z.flip(1), 3.0)) > 0


def test_soft_kl_rejects_an_unknown_normalisation():
    with pytest.raises(ValueError, match="batchmean"):
        soft_kl(tensor(S), tensor(T), 1.0, normalize="mean")


def test_soft_kl_is_finite_and_right_for_huge_float32_logits():
    s = [[1e4, 0.0, -1e4], [-5e3, 2e4, 1.0]]
    t = [[0.0, 1e4, -1e4], [3e4, -2e4, 0.0]]
    s_t = tensor(s, requires_grad=True)
    loss = soft_kl(s_t, tensor(t), 1.0)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == approx(hand_kl(s, t, 1.0, "batchmean"))  # about (1e4 + 2.5e4) / 2
    loss.backward()
    assert torch.isfinite(s_t.grad).all()


def test_soft_kl_upcasts_half_precision_logits():
    s16, t16 = tensor(S).half() * 1000, tensor(T).half() * 1000
    got = soft_kl(s16, t16, 2.0)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert float(got) == approx(float(soft_kl(s16.float(), t16.float(), 2.0)))


@pytest.mark.parametrize("normalize", ["batchmean", "elements"])
def test_soft_kl_student_gradient_matches_the_hand_derivative(normalize):
    # d/ds [tau^2/D * sum p_t (log p_t - log p_s)] = tau/D * (softmax(s/tau) - softmax(t/tau))
    tau = 4.0
    s = tensor(S, requires_grad=True)
    t = tensor(T)
    soft_kl(s, t, tau, normalize=normalize).backward()
    denom = 2 if normalize == "batchmean" else 6
    for i in range(2):
        ps = [math.exp(v) for v in log_softmax(S[i], tau)]
        pt = [math.exp(v) for v in log_softmax(T[i], tau)]
        for c in range(3):
            assert float(s.grad[i, c]) == pytest.approx(tau / denom * (ps[c] - pt[c]), abs=1e-6)
    assert t.grad is None
    t = tensor(T, requires_grad=True)  # even a teacher tensor that tracks gradients gets none
    soft_kl(tensor(S, requires_grad=True), t, tau, normalize=normalize).backward()
    assert t.grad is None


@pytest.mark.parametrize("name", [n for n, cls in METHODS.items() if cls.teacher_outputs == ("logits",) and cls.teachers_needed == 1])
def test_logit_methods_send_no_gradient_to_the_teacher(name):
    method = build_method({"name": name})
    s, d = tensor(S, requires_grad=True), tensor(D, requires_grad=True)
    t = tensor(T, requires_grad=True)
    method({"logits": s, "dist_logits": d}, {"logits": t}, torch.tensor(Y))["loss"].backward()
    assert t.grad is None, name
    assert s.grad is not None or d.grad is not None


@pytest.mark.parametrize("normalize", ["batchmean", "elements"])
def test_soft_kl_student_gradient_passes_gradcheck_in_double(normalize):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda z: soft_kl(z, t, 2.5, normalize=normalize), (s,))


# ---------------------------------------------------------------- the methods' losses


def test_none_is_label_smoothed_cross_entropy():
    method = build_method({"name": "none"}, label_smoothing=0.1)
    out = method({"logits": tensor(S)}, None, torch.tensor(Y))
    assert float(out["loss"]) == approx(hand_ce(S, Y, 0.1))
    assert float(out["ce"]) == approx(hand_ce(S, Y, 0.1))
    assert set(out) == {"loss", "ce"}
    assert not method.needs_teacher


def test_none_averages_both_heads_of_a_distilled_student():
    method = build_method({"name": "none"}, label_smoothing=0.2)
    out = method({"logits": tensor(S), "dist_logits": tensor(D)}, None, torch.tensor(Y))
    assert float(out["loss"]) == approx((hand_ce(S, Y, 0.2) + hand_ce(D, Y, 0.2)) / 2)


@pytest.mark.parametrize("alpha,tau,eps", [(0.5, 4.0, 0.0), (0.3, 1.0, 0.1), (1.0, 2.0, 0.0)])
def test_logit_kd_matches_the_hand_formula(alpha, tau, eps):
    method = build_method({"name": "logit-kd", "alpha": alpha, "tau": tau}, label_smoothing=eps)
    out = method({"logits": tensor(S)}, {"logits": tensor(T)}, torch.tensor(Y))
    ce, kd = hand_ce(S, Y, eps), hand_kl(S, T, tau, "batchmean")
    assert float(out["ce"]) == approx(ce)
    assert float(out["kd"]) == approx(kd)
    assert float(out["loss"]) == approx((1 - alpha) * ce + alpha * kd)
    assert set(out) == {"loss", "ce", "kd"}
    assert not out["ce"].requires_grad and not out["kd"].requires_grad


def test_logit_kd_defaults_follow_hinton():
    method = build_method({"name": "logit-kd"})
    assert (method.alpha, method.tau) == (0.5, 4.0)
    assert method_knobs(METHODS.get("logit-kd")) == {"alpha": 0.5, "tau": 4.0}
    out = method({"logits": tensor(S)}, {"logits": tensor(T)}, torch.tensor(Y))
    assert float(out["loss"]) == approx(0.5 * hand_ce(S, Y) + 0.5 * hand_kl(S, T, 4.0, "batchmean"))


def test_logit_kd_gives_both_heads_the_same_loss():
    method = build_method({"name": "logit-kd", "alpha": 0.4, "tau": 2.0})
    out = method({"logits": tensor(S), "dist_logits": tensor(D)}, {"logits": tensor(T)}, torch.tensor(Y))
    ce = (hand_ce(S, Y) + hand_ce(D, Y)) / 2
    kd = (hand_kl(S, T, 2.0, "batchmean") + hand_kl(D, T, 2.0, "batchmean")) / 2
    assert float(out["loss"]) == approx(0.6 * ce + 0.4 * kd)


@pytest.mark.parametrize("alpha,tau,eps", [(0.1, 3.0, 0.0), (0.5, 1.0, 0.1), (0.7, 5.0, 0.2)])
def test_deit_soft_matches_the_hand_formula(alpha, tau, eps):
    method = build_method({"name": "deit-soft", "alpha": alpha, "tau": tau}, label_smoothing=eps)
    out = method({"logits": tensor(S), "dist_logits": tensor(D)}, {"logits": tensor(T)}, torch.tensor(Y))
    ce = hand_ce(S, Y, eps)  # class head, labels, smoothed
    kd = hand_kl(D, T, tau, "elements")  # distillation head, teacher, per-element, never smoothed
    assert float(out["ce"]) == approx(ce)
    assert float(out["kd"]) == approx(kd)
    assert float(out["loss"]) == approx((1 - alpha) * ce + alpha * kd)
    assert set(out) == {"loss", "ce", "kd"}


def test_deit_soft_defaults_follow_the_paper():
    method = build_method({"name": "deit-soft"}, label_smoothing=0.1)
    assert (method.alpha, method.tau) == (0.1, 3.0)
    out = method({"logits": tensor(S), "dist_logits": tensor(D)}, {"logits": tensor(T)}, torch.tensor(Y))
    expected = 0.9 * hand_ce(S, Y, 0.1) + 0.1 * hand_kl(D, T, 3.0, "elements")
    assert float(out["loss"]) == approx(expected)
    # it is the distillation head, not the class head, that sees the teacher
    assert float(out["loss"]) != approx(0.9 * hand_ce(S, Y, 0.1) + 0.1 * hand_kl(S, T, 3.0, "elements"))


@pytest.mark.parametrize("alpha,eps", [(0.5, 0.0), (0.5, 0.1), (0.25, 0.3)])
def test_deit_hard_matches_the_hand_formula(alpha, eps):
    method = build_method({"name": "deit-hard", "alpha": alpha}, label_smoothing=eps)
    out = method({"logits": tensor(S), "dist_logits": tensor(D)}, {"logits": tensor(T)}, torch.tensor(Y))
    y_t = argmax(T)
    assert y_t == [0, 1]
    ce = hand_ce(S, Y, eps)  # the true label: smoothed
    kd = hand_ce(D, y_t, 0.0)  # the teacher's decision: not smoothed
    assert float(out["ce"]) == approx(ce)
    assert float(out["kd"]) == approx(kd)
    assert float(out["loss"]) == approx((1 - alpha) * ce + alpha * kd)


def test_deit_hard_defaults_to_half_and_half():
    method = build_method({"name": "deit-hard"})
    assert method.alpha == 0.5
    assert method_knobs(METHODS.get("deit-hard")) == {"alpha": 0.5}
    assert method_knobs(METHODS.get("deit-soft")) == {"alpha": 0.1, "tau": 3.0}


def test_label_smoothing_reaches_the_method():
    assert build_method({"name": "logit-kd"}, label_smoothing=0.3).label_smoothing == 0.3


# ---------------------------------------------------------------- gradients through a real student


@pytest.fixture(scope="module")
def teachers() -> dict[str, Teacher]:
    torch.manual_seed(0)
    cnn, _ = create_model("resnet_micro_cnn", 10, 16)
    vit, _ = create_model("vit_femto_patch4_16", 10, 16)
    return {"cnn": Teacher(cnn), "vit": Teacher(vit)}


def _students_for(method: Method) -> list[str]:
    if method.needs_dist_token:
        return ["deit_femto_distilled_patch4_16"]
    return ["vit_femto_patch4_16", "deit_femto_distilled_patch4_16"]


def _set_up(name: str, student: torch.nn.Module, student_name: str, teachers: dict[str, Teacher]):
    """The engine's order (adapt, check, setup, taps) with the first teacher pairing the method serves."""
    from vitdistill.models.taps import FeatureTaps, describe
    from vitdistill.models.wrappers import TeacherEnsemble

    choices = [["cnn", "vit"]] if METHODS.get(name).teachers_needed > 1 else [["cnn"], ["vit"]]
    for kinds in choices:
        method = build_method({"name": name}, label_smoothing=0.1)
        adapted = method.adapt_student(student, student_name)
        method.check_student(adapted, student_name)
        prepare_student(adapted)
        chosen = [teachers[k] for k in kinds]
        try:
            method.setup(describe(adapted, student_name, (3, 16, 16), 10),
                         [describe(t.model, k, (3, 16, 16), 10) for k, t in zip(kinds, chosen)])
        except UserError:
            continue
        for t in chosen:
            t.tap(method.teacher_taps)
        source = chosen[0] if len(chosen) == 1 else TeacherEnsemble(chosen)
        taps = FeatureTaps(adapted, method.student_taps) if method.student_taps else None
        return method, adapted, source, taps
    raise AssertionError(f"{name} serves neither a CNN nor a ViT teacher")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_student_parameter_learns_and_the_teacher_does_not(name, teachers):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    target = torch.tensor([0, 3, 7, 9])
    for student_name in _students_for(METHODS.get(name)):
        torch.manual_seed(0)
        student, _ = create_model(student_name, 10, 16)
        method, student, source, taps = _set_up(name, student, student_name, teachers)
        student.train()
        method.train()
        method.on_epoch_start(0)
        for t in teachers.values():
            t.train()  # what an owner switching everything to train mode would do
        s_out = student_outputs(student, InputPrep.for_model(student)(images), taps)
        t_out = source(images) if method.needs_teacher else None
        out = method(s_out, t_out, target)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()

        no_grad = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
        assert no_grad == [], f"{name} on {student_name}: no gradient for {no_grad}"
        for n, p in student.named_parameters():
            assert torch.isfinite(p.grad).all(), n
        no_grad = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert no_grad == [], f"{name}: its own parameters {no_grad} get no gradient"
        heads = [m for m in ("head", "head_dist") if isinstance(getattr(student, m, None), torch.nn.Linear)]
        for h in heads:
            assert getattr(student, h).weight.grad.abs().sum() > 0, f"{name}: {h} does not learn"

        for t in teachers.values():
            assert not t.training
            t.tap(())
            for n, p in t.named_parameters():
                assert not p.requires_grad and p.grad is None, n
        if taps is not None:
            taps.remove()


# ---------------------------------------------------------------- building and checking


def test_unknown_method_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown method 'deit-hrd'.*did you mean 'deit-hard'"):
        build_method({"name": "deit-hrd"})
    with pytest.raises(UserError, match="did you mean 'logit-kd'"):
        build_method({"name": "logit_kd"})


def test_unknown_knob_lists_the_knobs():
    with pytest.raises(UserError, match=r"no knob 'temperature'.*alpha, tau"):
        build_method({"name": "logit-kd", "temperature": 2.0})
    with pytest.raises(UserError, match=r"no knob 'tau'; its knobs are: alpha"):
        build_method({"name": "deit-hard", "tau": 2.0})
    with pytest.raises(UserError, match="knobs are: none"):
        build_method({"name": "none", "alpha": 0.5})


@pytest.mark.parametrize(
    "options",
    [
        {"name": "logit-kd", "alpha": 2},
        {"name": "logit-kd", "alpha": -0.1},
        {"name": "logit-kd", "tau": 0},
        {"name": "deit-soft", "tau": -1.0},
        {"name": "deit-hard", "alpha": 1.5},
    ],
)
def test_bad_knob_value_is_a_user_error(options):
    with pytest.raises(UserError, match=f"bad knob for method '{options['name']}'"):
        build_method(options)


@pytest.mark.parametrize("options, says", [
    ({"name": "deit-hard", "alpha": "half"}, "method.alpha of 'deit-hard' expects a number, got 'half'"),
    ({"name": "logit-kd", "tau": True}, "method.tau of 'logit-kd' expects a number, got True"),
])
def test_a_knob_of_the_wrong_type_is_named_with_what_it_expects(options, says):
    with pytest.raises(UserError, match=re.escape(says)):
        build_method(options)


def test_build_method_does_not_consume_the_config_section():
    options = {"name": "logit-kd", "alpha": 0.2}
    build_method(options)
    assert options == {"name": "logit-kd", "alpha": 0.2}


@pytest.mark.parametrize("name", ["deit-hard", "deit-soft"])
def test_deit_methods_refuse_a_student_without_distillation_token(name):
    method = build_method({"name": name})
    vit, _ = create_model("vit_femto_patch4_16", 10, 16)
    with pytest.raises(UserError, match=r"distillation token.*deit_femto_distilled_patch4_16") as info:
        method.check_student(vit, "vit_femto_patch4_16")
    assert "vit_femto_patch4_16" in str(info.value)
    assert "\n" not in str(info.value)
    deit, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    method.check_student(deit, "deit_femto_distilled_patch4_16")  # no error


def test_methods_without_token_need_accept_a_plain_vit():
    vit, _ = create_model("vit_femto_patch4_16", 10, 16)
    for name in ("none", "logit-kd"):
        build_method({"name": name}).check_student(vit, "vit_femto_patch4_16")


def test_every_registered_method_describes_itself():
    names = list(METHODS)
    assert {"none", "logit-kd", "deit-soft", "deit-hard"} <= set(names)
    for name, cls in METHODS.items():
        assert issubclass(cls, Method)
        assert cls.name == name
        for attr in ("summary", "paper"):
            value = getattr(cls, attr)
            assert isinstance(value, str) and value.strip(), f"{name}.{attr}"
        assert isinstance(cls.teacher_outputs, tuple)
        method = build_method({"name": name})
        assert method.needs_teacher == (name != "none")
        assert isinstance(method_knobs(cls), dict)


def test_teacher_layers_alone_keep_the_methods_own_student_layers():
    """``method.teacher_layers`` given alone pairs the method's default student layers with them,
    as each page says (it once fell back to every student block, and the lengths then differed)."""
    from vitdistill.models.taps import LayerInfo, ModelInfo

    def vit(name: str, depth: int) -> ModelInfo:
        return ModelInfo(name, "vit", [LayerInfo(f"blocks.{i}", (17, 32), 2) for i in range(depth)],
                         num_prefix_tokens=1)

    student, teacher = vit("s", 6), vit("t", 6)
    for options, expect in [
        ({"name": "vitkd", "teacher_layers": [3, 4]}, [(0, 3), (1, 4)]),  # the first `shallow` (2)
        ({"name": "tat", "teacher_layers": [2]}, [(5, 2)]),  # the last block
        ({"name": "minivit", "teacher_layers": [2]}, [(5, 2)]),  # the last block
        ({"name": "attention", "target": "qkv", "teacher_layers": [2]}, [(5, 2)]),  # qkv: the last block
        ({"name": "manifold", "teacher_layers": [1, 2, 3, 4]}, [(0, 1), (1, 2), (4, 3), (5, 4)]),  # first, last thirds
        ({"name": "dearkd", "teacher_layers": [3, 4, 5]}, [(0, 3), (1, 4), (2, 5)]),  # the early half
        ({"name": "hidden", "teacher_layers": [0, 1, 2, 3, 4, 5]}, [(i, i) for i in range(6)]),  # every block
    ]:
        method = build_method(options)
        method.setup(student, [teacher])
        assert method.pairs == expect, options


def test_soft_kl_of_a_teacher_that_masks_a_class_is_finite() -> None:
    # a class the teacher rules out (-inf) adds 0 * log 0 = 0, not NaN; its gradient stays finite
    s = tensor([[0.5, -0.2, 0.1]], requires_grad=True)
    t = tensor([[1.0, float("-inf"), 0.0]])
    got = soft_kl(s, t, 2.0)
    p = torch.softmax(tensor([[0.5, float("-inf"), 0.0]]), 1)[0, [0, 2]]
    log_q = torch.log_softmax(s.detach() / 2.0, 1)[0, [0, 2]]
    expected = 4.0 * float((p * (p.log() - log_q)).sum())
    assert float(got.detach()) == approx(expected, rel=1e-6)
    got.backward()
    assert torch.isfinite(s.grad).all()
