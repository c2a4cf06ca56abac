"""Tests of ``hidden``: the FitNets/TinyBERT hidden-state loss against plain-Python sums, token choices
with ViT and CNN teachers, gradients, errors, real taps, and a CLI run with resume."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import check_distill_and_resume, distill_args, run_cli_fast

from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.models import create_model, student_outputs
from vitdistill.models.taps import FeatureTaps, LayerInfo, ModelInfo, describe

LOGITS = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]
Y = [1, 2]

# ---------------------------------------------------------------- plain-Python math


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def hand_ce(rows: list[list[float]], target: list[int]) -> float:
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, target)) / len(rows)


def linear(tokens: list, w: list[list[float]], b: list[float]) -> list:
    """y = x W^T + b for nested tokens [B][n][D_in], W as [D_out][D_in]."""
    return [[[sum(wi * xi for wi, xi in zip(row, x)) + bo for row, bo in zip(w, b)] for x in seq] for seq in tokens]


def hand_mse(a: list, b: list) -> float:
    flat = [(x - y) ** 2 for sa, sb in zip(a, b) for ta, tb in zip(sa, sb) for x, y in zip(ta, tb)]
    return sum(flat) / len(flat)


def hand_cosine(a: list, b: list) -> float:
    vals = []
    for sa, sb in zip(a, b):
        for x, y in zip(sa, sb):
            dot = sum(p * q for p, q in zip(x, y))
            vals.append(1 - dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y))))
    return sum(vals) / len(vals)


def pooled_grid(fmap: list, grid: int) -> list:
    """Average-pool one [C][H][W] map to grid x grid and flatten to tokens [grid*grid][C], row-major."""
    c, h = len(fmap), len(fmap[0])
    k = h // grid
    tokens = []
    for gy in range(grid):
        for gx in range(grid):
            tokens.append([sum(fmap[ch][gy * k + dy][gx * k + dx] for dy in range(k) for dx in range(k)) / (k * k)
                           for ch in range(c)])
    return tokens


# ---------------------------------------------------------------- the method on hand-made tensors


def vit(name: str, depth: int, prefix: int, width: int, patches: int = 4) -> ModelInfo:
    return ModelInfo(name, "vit", [LayerInfo(f"blocks.{i}", (prefix + patches, width), 2) for i in range(depth)],
                     num_prefix_tokens=prefix)


CNN = ModelInfo("resnet_micro_cnn", "cnn", [LayerInfo("layer1", (3, 4, 4)), LayerInfo("layer2", (5, 2, 2))])


def method(student: ModelInfo, teacher: ModelInfo, **knobs):
    m = build_method({"name": "hidden", **knobs})
    m.setup(student, [teacher])
    return m


def rand(*shape: int, seed: int, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def weights(m, k: int) -> tuple[list, list]:
    return m.projectors[k].weight.tolist(), m.projectors[k].bias.tolist()


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("tokens", ["all", "cls", "patch"])
def test_vit_teacher_matches_hand_math(tokens, loss):
    s_info, t_info = vit("s", 2, prefix=1, width=3), vit("t", 4, prefix=1, width=5)
    m = method(s_info, t_info, tokens=tokens, loss=loss, beta=0.5)
    assert m.pairs == [(0, 1), (1, 3)] and m.mode == tokens
    assert [tuple(p.weight.shape) for p in m.projectors] == [(5, 3), (5, 3)]
    hs = {i: rand(2, 5, 3, seed=i) for i in (0, 1)}
    ht = {j: rand(2, 5, 5, seed=10 + j) for j in (1, 3)}
    out = m({"logits": torch.tensor(LOGITS), **{f"block.{i}": v for i, v in hs.items()}},
            {"logits": torch.zeros(2, 3), **{f"block.{j}": v for j, v in ht.items()}}, torch.tensor(Y))
    pick = {"all": slice(0, 5), "cls": slice(0, 1), "patch": slice(1, 5)}[tokens]
    dist = hand_mse if loss == "mse" else hand_cosine
    per_pair = [dist(linear(hs[i][:, pick].tolist(), *weights(m, k)), ht[j][:, pick].tolist())
                for k, (i, j) in enumerate(m.pairs)]
    hidden = sum(per_pair) / 2
    assert float(out["hidden"]) == pytest.approx(hidden, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(hand_ce(LOGITS, Y) + 0.5 * hidden, rel=1e-5)


def test_cnn_teacher_patch_tokens_match_hand_pooling():
    # a 2x2 student grid: the 4x4 map is average-pooled 2x2 -> 2x2; the 2x2 map is already on the grid
    s_info = vit("s", 2, prefix=2, width=3)
    m = method(s_info, CNN, alpha=0.5, tau=2.0)
    assert m.mode == "patch" and m.grid == (2, 2) and m.pairs == [(0, 0), (1, 1)]
    assert [tuple(p.weight.shape) for p in m.projectors] == [(3, 3), (5, 3)]
    hs = [rand(2, 6, 3, seed=i) for i in (0, 1)]
    maps = [rand(2, 3, 4, 4, seed=5), rand(2, 5, 2, 2, seed=6)]
    t_logits = [[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]]
    out = m({"logits": torch.tensor(LOGITS), "block.0": hs[0], "block.1": hs[1]},
            {"logits": torch.tensor(t_logits), "block.0": maps[0], "block.1": maps[1]}, torch.tensor(Y))
    per_pair = [hand_mse(linear(hs[k][:, 2:].tolist(), *weights(m, k)), [pooled_grid(f, 2) for f in maps[k].tolist()])
                for k in range(2)]
    kd = 4.0 * sum(sum(p * math.log(p / q) for p, q in zip(softmax([v / 2 for v in tr]), softmax([v / 2 for v in sr])))
                   for sr, tr in zip(LOGITS, t_logits)) / 2
    assert float(out["hidden"]) == pytest.approx(sum(per_pair) / 2, rel=1e-5)
    assert float(out["kd"]) == pytest.approx(kd, rel=1e-5)
    total = 0.5 * hand_ce(LOGITS, Y) + 0.5 * kd + sum(per_pair) / 2
    assert float(out["loss"].detach()) == pytest.approx(total, rel=1e-5)


def test_auto_tokens_and_errors():
    s1, s2 = vit("s", 2, prefix=1, width=3), vit("s", 2, prefix=2, width=3)
    assert method(s1, vit("t", 2, prefix=1, width=4)).mode == "all"
    assert method(s2, vit("t", 2, prefix=1, width=4)).mode == "patch"
    assert method(s2, vit("t", 2, prefix=1, width=4), tokens="cls").mode == "cls"
    assert method(s1, CNN).mode == "patch"
    for tokens in ("all", "cls"):
        with pytest.raises(UserError, match=f"tokens={tokens} needs a ViT teacher.*method.tokens=patch"):
            method(s1, CNN, tokens=tokens)
    with pytest.raises(UserError, match="tokens=all needs the same tokens.*method.tokens=patch"):
        method(s2, vit("t", 2, prefix=1, width=4), tokens="all")
    with pytest.raises(UserError, match="tokens=cls needs a class token"):
        method(s1, vit("t", 2, prefix=0, width=4), tokens="cls")
    with pytest.raises(UserError, match="live teacher"):
        build_method({"name": "hidden"}).setup(s1, [])
    m = method(s1, vit("t", 6, prefix=1, width=4), student_layers=[-1], teacher_layers=[2])
    assert m.pairs == [(1, 2)] and len(m.projectors) == 1 and [t.key for t in m.teacher_taps] == ["block.2"]
    for bad in ({"loss": "l1"}, {"tokens": "dist"}, {"beta": -1}, {"alpha": 1.5}, {"teacher_layers": []}):
        with pytest.raises(UserError):
            build_method({"name": "hidden", **bad})


def test_gradients_reach_the_student_and_the_projectors_never_the_teacher():
    m = method(vit("s", 1, prefix=1, width=3), vit("t", 1, prefix=1, width=4))
    s = rand(2, 5, 3, seed=1, requires_grad=True)
    t = rand(2, 5, 4, seed=2, requires_grad=True)
    logits, t_logits = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    m({"logits": logits, "block.0": s}, {"logits": t_logits, "block.0": t}, torch.tensor(Y))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projectors.parameters())
    assert t.grad is None and t_logits.grad is None


@pytest.mark.parametrize("teacher_name", ["vit_femto_patch4_16", "resnet_micro_cnn"])
def test_real_taps_with_vit_and_cnn_teachers(teacher_name):
    student, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    teacher, _ = create_model(teacher_name, 10, 16, overrides={"embed_dim": 96} if "vit" in teacher_name else None)
    teacher.eval().requires_grad_(False)
    m = build_method({"name": "hidden"})
    m.setup(describe(student, "s", (3, 16, 16), 10), [describe(teacher, teacher_name, (3, 16, 16), 10)])
    assert m.mode == "patch" and len(m.projectors) == 4
    s_taps, t_taps = FeatureTaps(student, m.student_taps), FeatureTaps(teacher, m.teacher_taps)
    x = torch.randn(2, 3, 16, 16)
    with t_taps.capture(), torch.no_grad():
        t_logits = teacher(x)
    out = m(student_outputs(student, x, s_taps), {"logits": t_logits, **t_taps.pop()}, torch.tensor([1, 2]))
    out["loss"].backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.projectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- the CLI


def test_distill_with_a_cnn_teacher_resumes_and_a_bad_token_choice_is_one_line(tmp_path, teacher_run):
    # the projectors live in the method: the resumed run matches only if they were saved and restored
    weights_file = teacher_run / "model.safetensors"
    args = distill_args("hidden", "vit_femto_patch4_16", "resnet_micro_cnn", weights_file, "--set", "method.beta=0.5")
    summary = check_distill_and_resume(tmp_path, args)
    assert summary["method"] == "hidden"
    r = run_cli_fast(*distill_args("hidden", "vit_femto_patch4_16", "resnet_micro_cnn", weights_file,
                              "--set", "method.tokens=cls"), "--out", str(tmp_path / "cls"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and "method.tokens=patch" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
