"""Tests of ``attention``: the attention KL and MiniViT's relation KL against plain-Python sums of the
papers' equations, the method's prefix and head handling, gradients, layer maps, errors and a CLI run."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import check_distill_and_resume, distill_args, run_cli_fast

from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.methods.attention import attention_kl, relation_kl
from vitdistill.models import create_model, student_outputs
from vitdistill.models.taps import FeatureTaps, LayerInfo, ModelInfo, describe

# ---------------------------------------------------------------- plain-Python math


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_k p_k log(p_k / q_k)."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def hand_attention_kl(s: list, t: list) -> float:
    """mean over b, h, n of KL(t[b][h][n] || s[b][h][n]) for nested lists [B][H][N][N]."""
    rows = [(sr, tr) for sb, tb in zip(s, t) for sh, th in zip(sb, tb) for sr, tr in zip(sh, th)]
    return sum(kl(tr, sr) for sr, tr in rows) / len(rows)


def relation(x: list, y: list) -> list[list[float]]:
    """softmax_rows(x y^T / sqrt(d)) for token lists x, y of width d."""
    d = len(x[0])
    return [softmax([sum(a * b for a, b in zip(xi, yj)) / math.sqrt(d) for yj in y]) for xi in x]


def hand_relation_kl(s: list, t: list, pairs: list[tuple[int, int]]) -> float:
    """Mean over (i, j) of the mean over b, h, rows of KL(R^t_ij || R^s_ij), s, t nested [3][B][H][N][d]."""
    total = 0.0
    for i, j in pairs:
        maps_s = [[relation(s[i][b][h], s[j][b][h]) for h in range(len(s[i][b]))] for b in range(len(s[i]))]
        maps_t = [[relation(t[i][b][h], t[j][b][h]) for h in range(len(t[i][b]))] for b in range(len(t[i]))]
        total += hand_attention_kl(maps_s, maps_t)
    return total / len(pairs)


SELF = [(0, 0), (1, 1), (2, 2)]
ALL = [(i, j) for i in range(3) for j in range(3)]


def probs(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


def approx(x: float, rel: float = 1e-5):
    return pytest.approx(x, rel=rel, abs=1e-7)


# ---------------------------------------------------------------- the two loss functions


def test_attention_kl_closed_form_and_hand_sum():
    # one row: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    t = torch.tensor([[[[0.75, 0.25], [0.5, 0.5]]]])
    s = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 0.0) / 2
    assert float(attention_kl(s, t)) == approx(expected)
    s, t = probs(2, 3, 4, 4, seed=0), probs(2, 3, 4, 4, seed=1)
    assert float(attention_kl(s, t)) == approx(hand_attention_kl(s.tolist(), t.tolist()))
    assert float(attention_kl(t, t)) == pytest.approx(0.0, abs=1e-7)
    # teacher zeros contribute 0, student zeros stay finite
    z = torch.tensor([[[[1.0, 0.0]]]])
    assert float(attention_kl(z, z)) == 0.0
    assert math.isfinite(float(attention_kl(torch.tensor([[[[0.0, 1.0]]]]), z)))


@pytest.mark.parametrize("pairs", ["self", "all"])
def test_relation_kl_matches_minivit_equation(pairs):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 2, 2, 3, 2, generator=g)  # [3, B, H, N, d_s]
    t = torch.randn(3, 2, 2, 3, 5, generator=g)  # teacher heads are wider: relations are N x N
    expected = hand_relation_kl(s.tolist(), t.tolist(), SELF if pairs == "self" else ALL)
    assert float(relation_kl(s, t, pairs)) == approx(expected)
    assert float(relation_kl(s, t)) == approx(hand_relation_kl(s.tolist(), t.tolist(), SELF))
    with pytest.raises(ValueError):
        relation_kl(s, t[:, :, :1])


# ---------------------------------------------------------------- the method


def vit(name: str, depth: int, heads: int, prefix: int, patches: int = 4, width: int = 8) -> ModelInfo:
    layers = [LayerInfo(f"blocks.{i}", (prefix + patches, width), heads) for i in range(depth)]
    return ModelInfo(name, "vit", layers, num_prefix_tokens=prefix)


def method(student: ModelInfo, teacher: ModelInfo, **knobs):
    m = build_method({"name": "attention", **knobs})
    m.setup(student, [teacher])
    return m


LOGITS = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]
Y = [1, 2]


def hand_ce(rows: list[list[float]], target: list[int]) -> float:
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, target)) / len(rows)


def patch_rows(a: list, prefix: int) -> list:
    """Hand version of dropping prefix rows/columns and renormalising: nested [B][H][N][N]."""
    out = []
    for b in a:
        out.append([[[v / sum(r[prefix:]) for v in r[prefix:]] for r in h[prefix:]] for h in b])
    return out


def head_mean(a: list) -> list:
    """[B][H][N][N] -> [B][1][N][N], the mean over heads."""
    return [[[[sum(h[n][k] for h in b) / len(b) for k in range(len(b[0][n]))] for n in range(len(b[0]))]] for b in a]


def test_attn_target_with_distillation_token_and_unequal_heads_matches_hand_math():
    # DeiT student (class + distillation token, 2 heads) under a ViT teacher (class token, 4 heads):
    # patch-to-patch rows, renormalised, averaged over heads on each side, KL per pair, mean of pairs.
    s_info, t_info = vit("s", 2, 2, prefix=2), vit("t", 4, 4, prefix=1)
    m = method(s_info, t_info, beta=0.7)
    assert m.pairs == [(0, 1), (1, 3)] and m.average_heads and m.prefix == (2, 1)
    sa = [probs(2, 2, 6, 6, seed=10 + i) for i in range(2)]
    ta = {j: probs(2, 4, 5, 5, seed=20 + j) for j in (1, 3)}
    student = {"logits": torch.tensor(LOGITS), "attn.0": sa[0], "attn.1": sa[1]}
    teacher = {"logits": torch.zeros(2, 3), "attn.1": ta[1], "attn.3": ta[3]}
    out = m(student, teacher, torch.tensor(Y))
    per_pair = [hand_attention_kl(head_mean(patch_rows(sa[i].tolist(), 2)), head_mean(patch_rows(ta[j].tolist(), 1)))
                for i, j in m.pairs]
    attn = sum(per_pair) / 2
    assert float(out["attn"]) == approx(attn)
    assert float(out["ce"]) == approx(hand_ce(LOGITS, Y))
    assert float(out["loss"].detach()) == approx(hand_ce(LOGITS, Y) + 0.7 * attn)
    assert set(out) == {"loss", "ce", "attn"}


def test_attn_target_aligned_heads_mse_and_alpha():
    info = vit("v", 2, 2, prefix=1)
    m = method(info, info, loss="mse", alpha=0.25, tau=2.0)
    assert not m.average_heads and m.prefix == (0, 0) and m.pairs == [(0, 0), (1, 1)]
    sa, ta = [probs(1, 2, 5, 5, seed=i) for i in (1, 2)], [probs(1, 2, 5, 5, seed=i) for i in (3, 4)]
    t_logits = [[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]]
    out = m({"logits": torch.tensor(LOGITS), "attn.0": sa[0], "attn.1": sa[1]},
            {"logits": torch.tensor(t_logits), "attn.0": ta[0], "attn.1": ta[1]}, torch.tensor(Y))
    mse = [sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())) / s.numel()
           for s, t in zip(sa, ta)]
    kd = 4.0 * sum(kl(softmax([v / 2 for v in tr]), softmax([v / 2 for v in sr]))
                   for sr, tr in zip(LOGITS, t_logits)) / 2
    assert float(out["attn"]) == approx(sum(mse) / 2)
    assert float(out["kd"]) == approx(kd)
    assert float(out["loss"].detach()) == approx(0.75 * hand_ce(LOGITS, Y) + 0.25 * kd + sum(mse) / 2)


def test_qkv_target_defaults_to_last_layers_and_matches_relation_kl():
    s_info, t_info = vit("s", 2, 2, prefix=2, width=4), vit("t", 3, 2, prefix=1, width=8)
    m = method(s_info, t_info, target="qkv")
    assert m.pairs == [(1, 2)] and [t.key for t in m.student_taps] == ["qkv.1"]
    assert [t.key for t in m.teacher_taps] == ["qkv.2"]
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 2, 2, 6, 2, generator=g), torch.randn(3, 2, 2, 5, 4, generator=g)
    out = m({"logits": torch.tensor(LOGITS), "qkv.1": s}, {"logits": torch.zeros(2, 3), "qkv.2": t}, torch.tensor(Y))
    # prefix tokens (2 on the student, 1 on the teacher) leave; nine relations, MiniViT's equation
    expected = hand_relation_kl(s[:, :, :, 2:].tolist(), t[:, :, :, 1:].tolist(), ALL)
    assert float(out["qkv"]) == approx(expected)
    m3 = method(s_info, t_info, target="qkv", relations="self")
    out3 = m3({"logits": torch.tensor(LOGITS), "qkv.1": s}, {"logits": torch.zeros(2, 3), "qkv.2": t},
              torch.tensor(Y))
    assert float(out3["qkv"]) == approx(hand_relation_kl(s[:, :, :, 2:].tolist(), t[:, :, :, 1:].tolist(), SELF))
    # heads=average takes the probability path: relation maps averaged over heads, then the KL
    avg = method(s_info, t_info, target="qkv", heads="average")
    out_avg = avg({"logits": torch.tensor(LOGITS), "qkv.1": s}, {"logits": torch.zeros(2, 3), "qkv.2": t},
                  torch.tensor(Y))
    expected_avg = sum(
        hand_attention_kl(head_mean([[relation(s[i, b, h, 2:].tolist(), s[j, b, h, 2:].tolist()) for h in range(2)]
                                     for b in range(2)]),
                          head_mean([[relation(t[i, b, h, 1:].tolist(), t[j, b, h, 1:].tolist()) for h in range(2)]
                                     for b in range(2)]))
        for i, j in ALL) / 9
    assert float(out_avg["qkv"]) == approx(expected_avg, 1e-4)


def regrouped(x: torch.Tensor, groups: int) -> list:
    """Hand regrouping of a qkv stack [3, B, H, N, d] into relation heads: each token's heads laid end to
    end (head 0's channels, then head 1's...), then cut into ``groups`` equal channel blocks."""
    three, batch, heads, tokens, _ = x.shape
    out = []
    for i in range(three):
        per_b = []
        for b in range(batch):
            rows = [sum((x[i, b, h, n].tolist() for h in range(heads)), []) for n in range(tokens)]
            w = len(rows[0]) // groups
            per_b.append([[r[g * w:(g + 1) * w] for r in rows] for g in range(groups)])
        out.append(per_b)
    return out


@pytest.mark.parametrize("groups", [1, 2])
def test_relation_heads_let_unequal_head_counts_compare_as_minilm_does(groups):
    # student: 2 heads of width 2 (4 channels); teacher: 4 heads of width 2 (8 channels)
    s_info, t_info = vit("s", 1, 2, prefix=1, width=4), vit("t", 1, 4, prefix=1, width=8)
    with pytest.raises(UserError, match="relation_heads=N"):
        method(s_info, t_info, target="qkv")
    m = method(s_info, t_info, target="qkv", relation_heads=groups)
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, 2, 2, 5, 2, generator=g), torch.randn(3, 2, 4, 5, 2, generator=g)
    out = m({"logits": torch.tensor(LOGITS), "qkv.0": s}, {"logits": torch.zeros(2, 3), "qkv.0": t}, torch.tensor(Y))
    s_r, t_r = regrouped(s, groups), regrouped(t, groups)  # equal prefixes: the class tokens are compared too
    assert float(out["qkv"]) == approx(hand_relation_kl(s_r, t_r, ALL))
    # with as many relation heads as the model has, a model's own heads come back unchanged
    from vitdistill.methods._features import relation_heads
    assert torch.equal(relation_heads(s, 2), s)


def test_relation_heads_refuse_what_they_cannot_do():
    s_info = vit("s", 1, 2, prefix=1, width=4)
    with pytest.raises(UserError, match="4 wide.*3 relation heads"):
        method(s_info, vit("t", 1, 4, prefix=1, width=8), target="qkv", relation_heads=3)
    for bad in ({"relation_heads": 2}, {"relation_heads": 0, "target": "qkv"},
                {"relation_heads": 2, "target": "qkv", "heads": "average"}):
        with pytest.raises(UserError, match="relation_heads"):
            build_method({"name": "attention", **bad})


@pytest.mark.parametrize("target", ["attn", "qkv"])
def test_gradients_reach_the_student_and_never_the_teacher(target):
    info = vit("v", 1, 2, prefix=1)
    m = method(info, info, target=target, alpha=0.5)
    shape = (2, 2, 5, 5) if target == "attn" else (3, 2, 2, 5, 4)
    key = f"{target}.0"
    raw_s = torch.randn(*shape, requires_grad=True)
    raw_t = torch.randn(*shape, requires_grad=True)
    s = torch.softmax(raw_s, -1) if target == "attn" else raw_s
    t = torch.softmax(raw_t, -1) if target == "attn" else raw_t
    logits, t_logits = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    out = m({"logits": logits, key: s}, {"logits": t_logits, key: t}, torch.tensor(Y))
    out["loss"].backward()
    assert raw_s.grad is not None and raw_s.grad.abs().sum() > 0 and logits.grad is not None
    assert raw_t.grad is None and t_logits.grad is None


@pytest.mark.parametrize("target,knobs", [("attn", {"heads": "average"}), ("qkv", {"heads": "average"}),
                                          ("qkv", {"relation_heads": 1})])
def test_real_taps_train_the_student_weights(target, knobs):
    # real timm models through the real taps: a DeiT student (2 heads) and a 4-head ViT teacher
    student, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    teacher, _ = create_model("vit_femto_patch4_16", 10, 16, overrides={"num_heads": 4})
    teacher.eval().requires_grad_(False)
    m = build_method({"name": "attention", "target": target, **knobs})
    m.setup(describe(student, "s", (3, 16, 16), 10), [describe(teacher, "t", (3, 16, 16), 10)])
    s_taps, t_taps = FeatureTaps(student, m.student_taps), FeatureTaps(teacher, m.teacher_taps)
    x = torch.randn(2, 3, 16, 16)
    with t_taps.capture(), torch.no_grad():
        t_logits = teacher(x)
    s_out, t_out = student_outputs(student, x, s_taps), {"logits": t_logits, **t_taps.pop()}
    assert torch.isfinite(m(s_out, t_out, torch.tensor([1, 2]))["loss"].detach())
    i, j = m.pairs[-1]
    m.pair_loss(s_out[f"{target}.{i}"], t_out[f"{target}.{j}"]).backward()  # the distillation term alone
    qkv_grad = student.blocks[-1].attn.qkv.weight.grad
    assert qkv_grad is not None and qkv_grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_setup_errors_and_layer_maps():
    s_info = vit("s", 2, 2, prefix=1)
    cnn = ModelInfo("resnet_micro_cnn", "cnn", [LayerInfo("layer1", (8, 2, 2))])
    with pytest.raises(UserError, match="needs a ViT teacher .*serves a ViT student with a ViT teacher"):
        method(s_info, cnn)
    with pytest.raises(UserError, match="patch grid"):
        method(s_info, vit("t", 2, 2, prefix=1, patches=9))
    with pytest.raises(UserError, match="heads=aligned.*4 heads.*method.heads=average"):
        method(s_info, vit("t", 2, 4, prefix=1), heads="aligned")
    with pytest.raises(UserError, match="head by head.*2 heads and the teacher 4"):
        method(s_info, vit("t", 2, 4, prefix=1), target="qkv")
    with pytest.raises(UserError, match="live teacher"):
        build_method({"name": "attention"}).setup(s_info, [])
    m = method(s_info, vit("t", 4, 2, prefix=1), student_layers=[-1], teacher_layers=[1])
    assert m.pairs == [(1, 1)] and [t.key for t in m.student_taps] == ["attn.1"]
    for bad in ({"loss": "l1"}, {"heads": "some"}, {"target": "v"}, {"relations": "qk"}, {"beta": -1},
                {"alpha": 2}, {"student_layers": "3"}):
        with pytest.raises(UserError):
            build_method({"name": "attention", **bad})


# ---------------------------------------------------------------- the CLI


def random_cnn_teacher(path) -> str:
    """Untrained resnet_micro_cnn weights: enough for a pairing the method refuses at set-up."""
    model, _ = create_model("resnet_micro_cnn", 10)
    torch.save(model.state_dict(), path)
    return str(path)


def test_distill_with_a_vit_teacher_resumes_and_a_cnn_teacher_is_refused(tmp_path, vit_teacher_run):
    # a DeiT student (distillation token) under a plain ViT teacher: the patch-to-patch path, every block
    args = distill_args("attention", "deit_femto_distilled_patch4_16", "vit_femto_patch4_16",
                        vit_teacher_run / "model.safetensors", "--set", "method.alpha=0.5")
    summary = check_distill_and_resume(tmp_path, args)
    assert summary["method"] == "attention"
    r = run_cli_fast(*distill_args("attention", "vit_femto_patch4_16", "resnet_micro_cnn",
                              random_cnn_teacher(tmp_path / "cnn.pt")), "--out", str(tmp_path / "cnn"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and "needs a ViT teacher" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
