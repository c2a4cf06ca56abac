"""``vitkd`` (Yang et al. 2022): the loss against the paper's equations computed by hand on small tensors
(projectors, mask, convolutional generator and NKD in plain Python), gradients, seeded masks that
survive a resume, real models, and the CLI."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import check_distill_and_resume, distill_args, run_cli_fast
from vitdistill.errors import UserError
from vitdistill.methods import METHODS, build_method, method_knobs
from vitdistill.models import create_model, prepare_student
from vitdistill.models.taps import FeatureTaps, LayerInfo, ModelInfo, describe
from vitdistill.models.wrappers import student_outputs

# ---------------------------------------------------------------- hand math (plain Python)

B, N, SIDE = 2, 4, 2  # two images of 2x2 patches
DS, DT = 3, 2  # student and teacher widths


def val(*idx: int) -> float:
    """Deterministic, irregular hand-made values."""
    return math.sin(0.7 + sum((5 * k + 2) * i for k, i in enumerate(idx))) + 0.05 * idx[-1]


def linear(layer: torch.nn.Linear, x: list[float]) -> list[float]:
    w, b = layer.weight.tolist(), layer.bias.tolist()
    return [b[o] + sum(w[o][i] * x[i] for i in range(len(x))) for o in range(len(w))]


def conv3x3(conv: torch.nn.Conv2d, img: list) -> list:
    """img[c][r][q] -> out[o][r][q], 3x3 kernel, zero padding 1."""
    w, bias = conv.weight.tolist(), conv.bias.tolist()
    out = []
    for o in range(len(w)):
        plane = []
        for r in range(SIDE):
            row = []
            for q in range(SIDE):
                acc = bias[o]
                for i in range(len(img)):
                    for dr in range(3):
                        for dq in range(3):
                            rr, qq = r + dr - 1, q + dq - 1
                            if 0 <= rr < SIDE and 0 <= qq < SIDE:
                                acc += w[o][i][dr][dq] * img[i][rr][qq]
                row.append(acc)
            plane.append(row)
        out.append(plane)
    return out


def sq(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def masked_positions(seed: int, step: int, ratio: float) -> list[set[int]]:
    """The documented mask contract: uniform noise from a generator seeded seed * 2^32 + step; per image
    the tokens ranked after the first int(N * (1 - ratio)) are masked."""
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed((seed * 2654435761 + step) % 2**32)).tolist()
    keep = int(N * (1 - ratio))
    return [set(sorted(range(N), key=noise[b].__getitem__)[keep:]) for b in range(B)]


def hand_features(m, fs: list, ft: list, ft_deep: list, masked: list[set[int]]) -> tuple[float, float]:
    """(L_lr, L_gen) of the paper before alpha and beta: sums over tokens and channels, per image."""
    lr = sum(sq(linear(m.mimic[k], fs[k][b][n]), ft[k][b][n]) for k in range(2) for b in range(B)
             for n in range(N)) / B
    gen = 0.0
    token = m.mask_token.reshape(-1).tolist()
    conv1, conv2 = m.generator[0], m.generator[2]
    for b in range(B):
        toks = [token if n in masked[b] else linear(m.align, fs[2][b][n]) for n in range(N)]
        img = [[[toks[r * SIDE + q][c] for q in range(SIDE)] for r in range(SIDE)] for c in range(DT)]
        hid = [[[max(0.0, v) for v in row] for row in plane] for plane in conv3x3(conv1, img)]
        out = conv2d_tokens(conv3x3(conv2, hid))
        gen += sum(sq(out[n], ft_deep[b][n]) for n in masked[b])
    return lr, gen / (B * m.mask_ratio)


def conv2d_tokens(img: list) -> list[list[float]]:
    return [[img[c][r][q] for c in range(len(img))] for r in range(SIDE) for q in range(SIDE)]


def softmax(row: list[float], tau: float = 1.0) -> list[float]:
    z = [v / tau for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def hand_ce(logits: list[list[float]], target: list[int]) -> float:
    return sum(-math.log(softmax(r)[y]) for r, y in zip(logits, target)) / len(logits)


def hand_nkd(s: list[list[float]], t: list[list[float]], y: list[int], tau: float, gamma: float) -> float:
    """NKD: -p_t[y] log p_s[y] - gamma tau^2 sum_{c != y} q_t[c] log q_s[c], q over non-targets at tau."""
    target = sum(-softmax(tr)[yi] * math.log(softmax(sr)[yi]) for sr, tr, yi in zip(s, t, y)) / len(s)
    non = 0.0
    for sr, tr, yi in zip(s, t, y):
        qs = softmax([v for c, v in enumerate(sr) if c != yi], tau)
        qt = softmax([v for c, v in enumerate(tr) if c != yi], tau)
        non += -sum(a * math.log(b) for a, b in zip(qt, qs))
    return target + gamma * tau * tau * non / len(s)


S = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]
D = [[0.2, -0.7, 1.1], [1.4, 0.9, -0.3]]
T = [[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]]
Y = [1, 2]

STUDENT = ModelInfo("s", "vit", [LayerInfo(f"blocks.{i}", (1 + N, DS), 1) for i in range(3)], num_prefix_tokens=1)
VIT_T = ModelInfo("t", "vit", [LayerInfo(f"blocks.{i}", (1 + N, DT), 1) for i in range(3)], num_prefix_tokens=1)
CNN_T = ModelInfo("c", "cnn", [LayerInfo("layer1", (DT, 4, 4)), LayerInfo("layer2", (DT, 4, 4)),
                               LayerInfo("layer3", (DT, 1, 1))])

FS = [[[[val(k, b, n, d) for d in range(DS)] for n in range(N)] for b in range(B)] for k in range(3)]
FT = [[[[val(k, b, n, d + 4) for d in range(DT)] for n in range(N)] for b in range(B)] for k in range(3)]
CNN_MAPS = [[[[[val(k, b, c, r, q) for q in range(4)] for r in range(4)] for c in range(DT)] for b in range(B)]
            for k in range(2)]
CNN_DEEP = [[[[val(9, b, c)]] for c in range(DT)] for b in range(B)]


def with_prefix(f: list) -> torch.Tensor:
    """Tokens behind a prefix (class) token of large values the method must ignore."""
    return torch.tensor([[[40.0] * len(f[b][0])] + f[b] for b in range(B)])


def pooled(maps: list) -> list:
    """A 4x4 map average-pooled to the student's 2x2 grid, as row-major tokens."""
    return [[[sum(maps[b][c][2 * r + i][2 * q + j] for i in range(2) for j in range(2)) / 4 for c in range(DT)]
             for r in range(2) for q in range(2)] for b in range(B)]


def vitkd(teacher: ModelInfo = VIT_T, **knobs):
    torch.manual_seed(0)
    m = build_method({"name": "vitkd", **knobs})
    m.setup(STUDENT, [teacher])
    with torch.no_grad():  # a non-zero mask token, so a mix-up of masked and kept tokens would show
        m.mask_token.copy_(torch.tensor([[[0.3, -0.8]]]))
    return m


def student_out(dist: bool = True, grad: bool = False) -> dict:
    out = {"logits": torch.tensor(S, requires_grad=grad)}
    if dist:
        out["dist_logits"] = torch.tensor(D, requires_grad=grad)
    out.update({f"block.{k}": with_prefix(FS[k]).requires_grad_(grad) for k in range(3)})
    return out


def vit_teacher_out(grad: bool = False) -> dict:
    return {"logits": torch.tensor(T, requires_grad=grad),
            **{f"block.{k}": with_prefix(FT[k]).requires_grad_(grad) for k in range(3)}}


# ---------------------------------------------------------------- the loss against the equations


@pytest.mark.parametrize("alpha,beta,ratio,tau,gamma", [(0.5, 0.25, 0.5, 1.0, 1.0), (0.1, 1.0, 0.75, 2.0, 1.5)])
def test_loss_matches_the_paper_with_a_vit_teacher(alpha, beta, ratio, tau, gamma):
    m = vitkd(alpha=alpha, beta=beta, mask_ratio=ratio, tau=tau, gamma=gamma, seed=3)
    assert m.pairs == [(0, 0), (1, 1)] and m.deep == (2, 2)
    out = m(student_out(), vit_teacher_out(), torch.tensor(Y))
    lr, gen = hand_features(m, FS, FT, FT[2], masked_positions(3, 0, ratio))
    ce = (hand_ce(S, Y) + hand_ce(D, Y)) / 2
    nkd = (hand_nkd(S, T, Y, tau, gamma) + hand_nkd(D, T, Y, tau, gamma)) / 2
    assert float(out["lr"]) == pytest.approx(lr, rel=1e-5)
    assert float(out["gen"]) == pytest.approx(gen, rel=1e-5)
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(out["nkd"]) == pytest.approx(nkd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + nkd + alpha * lr + beta * gen, rel=1e-5)
    assert set(out) == {"loss", "ce", "nkd", "lr", "gen"}


def test_logit_none_is_vitkd_alone():
    m = vitkd(alpha=0.5, beta=0.25, logit="none")
    out = m(student_out(dist=False), vit_teacher_out(), torch.tensor(Y))
    lr, gen = hand_features(m, FS, FT, FT[2], masked_positions(0, 0, 0.5))
    assert out["loss"].item() == pytest.approx(hand_ce(S, Y) + 0.5 * lr + 0.25 * gen, rel=1e-5)
    assert "nkd" not in out


def test_a_cnn_teacher_is_brought_to_the_student_grid():
    m = vitkd(teacher=CNN_T, alpha=1.0, beta=1.0)
    assert m.pairs == [(0, 0), (1, 1)] and m.deep == (2, 2)
    teacher = {"logits": torch.tensor(T), "block.0": torch.tensor(CNN_MAPS[0]),
               "block.1": torch.tensor(CNN_MAPS[1]), "block.2": torch.tensor(CNN_DEEP)}
    out = m(student_out(), teacher, torch.tensor(Y))
    deep = [[[CNN_DEEP[b][c][0][0] for c in range(DT)] for _ in range(N)] for b in range(B)]  # 1x1 spread
    lr, gen = hand_features(m, FS, [pooled(CNN_MAPS[0]), pooled(CNN_MAPS[1])], deep, masked_positions(0, 0, 0.5))
    assert float(out["lr"]) == pytest.approx(lr, rel=1e-5)
    assert float(out["gen"]) == pytest.approx(gen, rel=1e-5)


def test_masks_follow_the_step_counter_and_survive_a_resume():
    a = vitkd(beta=1.0, seed=5)
    target = torch.tensor(Y)
    for step in range(2):
        out = a(student_out(), vit_teacher_out(), target)
        _, gen = hand_features(a, FS, FT, FT[2], masked_positions(5, step, 0.5))
        assert float(out["gen"]) == pytest.approx(gen, rel=1e-5)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert int(state["draws.step"]) == 2
    expected = [float(a(student_out(), vit_teacher_out(), target)["gen"]) for _ in range(3)]
    b = vitkd(beta=1.0, seed=5)
    b.load_state_dict(state)
    assert [float(b(student_out(), vit_teacher_out(), target)["gen"]) for _ in range(3)] == expected
    assert len(set(expected)) > 1


def test_gradients_reach_the_student_and_the_methods_parts_never_the_teacher():
    m = vitkd()
    s, t = student_out(grad=True), vit_teacher_out(grad=True)
    m(s, t, torch.tensor(Y))["loss"].backward()
    for k in range(3):
        assert s[f"block.{k}"].grad is not None and s[f"block.{k}"].grad[:, 1:].abs().sum() > 0
        assert s[f"block.{k}"].grad[:, 0].abs().sum() == 0  # the class token is not a patch
    assert s["logits"].grad is not None and s["dist_logits"].grad is not None
    named = dict(m.named_parameters())
    assert {"mask_token", "align.weight", "mimic.0.weight", "mimic.1.weight", "generator.0.weight",
            "generator.2.weight"} <= set(named)
    for name, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(v.grad is None for v in t.values())


# ---------------------------------------------------------------- defaults, layers, errors


def test_defaults_follow_the_paper():
    knobs = method_knobs(METHODS.get("vitkd"))
    assert {k: knobs[k] for k in ("alpha", "beta", "mask_ratio", "shallow", "logit", "tau", "gamma")} == {
        "alpha": 3e-5, "beta": 3e-6, "mask_ratio": 0.5, "shallow": 2, "logit": "nkd", "tau": 1.0, "gamma": 1.0}


def test_equal_widths_need_no_projector_and_layer_knobs_pick_the_mimicked_pairs():
    m = build_method({"name": "vitkd", "student_layers": [1], "teacher_layers": [-2]})
    m.setup(STUDENT, [STUDENT])
    assert m.pairs == [(1, 1)] and m.deep == (2, 2)
    assert isinstance(m.align, torch.nn.Identity) and isinstance(m.mimic[0], torch.nn.Identity)
    assert [t.key for t in m.student_taps] == ["block.1", "block.2"]


@pytest.mark.parametrize("knobs", [{"alpha": -1.0}, {"mask_ratio": 1.0}, {"mask_ratio": 0.0}, {"shallow": -1},
                                   {"logit": "kd"}, {"tau": 0.0}, {"seed": -3}])
def test_bad_knobs_are_user_errors(knobs):
    with pytest.raises(UserError, match="bad knob for method 'vitkd'"):
        build_method({"name": "vitkd", **knobs})


def test_impossible_set_ups_are_user_errors():
    cnn_student = ModelInfo("resnet_micro_cnn", "cnn", [LayerInfo("layer1", (16, 16, 16))])
    with pytest.raises(UserError, match="needs a ViT student"):
        build_method({"name": "vitkd"}).setup(cnn_student, [VIT_T])
    with pytest.raises(UserError, match="does not exist"):
        build_method({"name": "vitkd", "shallow": 4}).setup(STUDENT, [VIT_T])
    with pytest.raises(UserError, match="masks none"):
        build_method({"name": "vitkd", "mask_ratio": 1e-20}).setup(STUDENT, [VIT_T])
    with pytest.raises(UserError, match="live teacher"):
        build_method({"name": "vitkd"}).setup(STUDENT, [])


# ---------------------------------------------------------------- real models


@pytest.mark.parametrize("teacher_name", ["vit_femto_patch4_16", "resnet_micro_cnn"])
def test_real_models_give_a_finite_loss_and_gradients(teacher_name):
    torch.manual_seed(0)
    student = create_model("deit_femto_distilled_patch4_16", 10, 16)[0].train()
    prepare_student(student)
    teacher = create_model(teacher_name, 10, 16)[0].eval()
    m = build_method({"name": "vitkd"})
    m.setup(describe(student, "s", (3, 16, 16), 10), [describe(teacher, "t", (3, 16, 16), 10)])
    s_taps, t_taps = FeatureTaps(student, m.student_taps), FeatureTaps(teacher, m.teacher_taps)
    x = torch.randn(6, 3, 16, 16)
    s_out = student_outputs(student, x, s_taps)
    with torch.no_grad(), t_taps.capture():
        t_logits = teacher(x)
    out = m(s_out, {"logits": t_logits, **t_taps.pop()}, torch.randint(0, 10, (6,)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and float(out["lr"]) > 0 and float(out["gen"]) > 0
    assert student.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert m.generator[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the CLI


def test_distills_from_a_vit_teacher_and_resumes_identically(tmp_path, vit_teacher_run):
    args = distill_args("vitkd", "deit_femto_distilled_patch4_16", "vit_femto_patch4_16", vit_teacher_run)
    summary = check_distill_and_resume(tmp_path, args)
    assert summary["method"] == "vitkd"


def test_a_cnn_student_is_a_one_line_error(tmp_path, vit_teacher_run):
    r = run_cli_fast(*distill_args("vitkd", "resnet_micro_cnn", "vit_femto_patch4_16", vit_teacher_run),
                "--out", str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "needs a ViT student" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_the_seed_knob_moves_the_draws() -> None:
    """torch's CPU generator keeps 32 bits of a seed; StepRandom's seed must survive that, so
    ``method.seed`` gives other masks (it once did not), while seed 0 draws as it always did."""
    from vitdistill.methods._features import StepRandom

    def masks(seed: int, steps: int = 3) -> list[torch.Tensor]:
        r = StepRandom(seed)
        return [torch.randperm(64, generator=r.next()) for _ in range(steps)]

    assert all(torch.equal(a, b) for a, b in zip(masks(5), masks(5)))
    assert not any(torch.equal(a, b) for a, b in zip(masks(0), masks(5)))
    assert all(torch.equal(m, torch.randperm(64, generator=torch.Generator().manual_seed(k)))
               for k, m in enumerate(masks(0)))
