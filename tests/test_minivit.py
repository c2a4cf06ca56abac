"""MiniViT: the weight-distillation loss against its equations written out by hand, the multiplexed
student (parameter count, shared weights, per-block transformations, saving), and the CLI run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import check_distill_and_resume, distill_args, load_run_model_top1, run_cli_fast
from safetensors.torch import load_file, save_file

from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.methods.minivit import MiniViT, hidden_relation_cosine, hidden_relation_kl, multiplex, qkv_relation_kl
from vitdistill.models import create_model
from vitdistill.models.taps import FeatureTaps, LayerInfo, ModelInfo, Tap, describe

# ---------------------------------------------------------------- the equations, by hand


def log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    z = [v / tau for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def kl(t_row: list[float], s_row: list[float], tau: float = 1.0) -> float:
    """KL(softmax(t) || softmax(s)) of two rows of logits."""
    lt, ls = log_softmax(t_row, tau), log_softmax(s_row, tau)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def relation_rows(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """Rows of a b^T / sqrt(d), as logits."""
    d = len(a[0])
    return [[sum(x * y for x, y in zip(ra, rb)) / math.sqrt(d) for rb in b] for ra in a]


def hand_relation_kl(s: list[list[list[float]]], t: list[list[list[float]]], pairs) -> float:
    """Mean over the (i, j) pairs, and over rows, of KL(teacher relation row || student relation row);
    s[i] and t[i] are lists (over batch x heads) of token matrices."""
    total = 0.0
    for i, j in pairs:
        kls = [kl(tr, sr) for sm_i, sm_j, tm_i, tm_j in zip(s[i], s[j], t[i], t[j])
               for sr, tr in zip(relation_rows(sm_i, sm_j), relation_rows(tm_i, tm_j))]
        total += sum(kls) / len(kls)
    return total / len(pairs)


def qkv_lists(x: torch.Tensor) -> list[list[list[list[float]]]]:
    """[3, B, H, N, d] -> for each of q, k, v: the list over (b, h) of N x d matrices."""
    return [[x[i, b, h].tolist() for b in range(x.shape[1]) for h in range(x.shape[2])] for i in range(3)]


def head_lists(x: torch.Tensor, heads: int) -> list[list[list[list[float]]]]:
    """[B, N, D] -> one list over (b, head) of N x D/heads matrices (channel blocks in order)."""
    dh = x.shape[2] // heads
    return [[[row[h * dh:(h + 1) * dh] for row in x[b].tolist()] for b in range(x.shape[0]) for h in range(heads)]]


ALL9 = [(i, j) for i in range(3) for j in range(3)]


def test_qkv_relation_matches_the_equation():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 2, 2, 3, 2, generator=g)  # [3, B, H, N, d_s]
    t = torch.randn(3, 2, 2, 3, 4, generator=g)  # the teacher's heads are wider
    expected = hand_relation_kl(qkv_lists(s), qkv_lists(t), ALL9)
    assert float(qkv_relation_kl(s, t)) == pytest.approx(expected, rel=1e-5)
    assert float(qkv_relation_kl(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_relation_matches_the_equation():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    expected = hand_relation_kl(head_lists(s, 2), head_lists(t, 2), [(0, 0)])
    assert float(hidden_relation_kl(s, t, 2)) == pytest.approx(expected, rel=1e-5)


def test_hidden_relation_cosine_is_mini_swins_code_form():
    """(1 / (B N)) sum_{b,i,j} (cos_S(h_i, h_j) - cos_T(h_i, h_j))^2, written out by hand: on a Swin
    window of 49 tokens this is Mini-Swin's mean-times-49."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)

    def cos(u: list[float], v: list[float]) -> float:
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    total = 0.0
    for b in range(2):
        sb, tb = s[b].tolist(), t[b].tolist()
        total += sum((cos(sb[i], sb[j]) - cos(tb[i], tb[j])) ** 2 for i in range(3) for j in range(3))
    assert float(hidden_relation_cosine(s, t)) == pytest.approx(total / (2 * 3), rel=1e-5)
    assert float(hidden_relation_cosine(s, 3.0 * s)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    window = torch.randn(2, 49, 8, generator=g), torch.randn(2, 49, 8, generator=g)
    sn, tn = (torch.nn.functional.normalize(x, dim=-1) for x in window)
    official = ((sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)) ** 2).mean() * 49
    assert float(hidden_relation_cosine(*window)) == pytest.approx(float(official), rel=1e-5)


def test_the_cosine_form_is_chosen_by_its_knob():
    for form, fn in (("kl", lambda s, t: hidden_relation_kl(s, t, 2)), ("cosine", hidden_relation_cosine)):
        method = MiniViT(beta=0.0, gamma=1.0, ce_weight=0.0, hidden_relation=form)
        method.setup(vit_info("s", 3, 4, 2, 1, 1), [vit_info("t", 3, 6, 2, 1, 1)])
        g = torch.Generator().manual_seed(5)
        s_hid, t_hid = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
        z = torch.randn(2, 3, generator=g)
        out = method({"logits": z, "qkv.0": torch.randn(3, 2, 2, 3, 2, generator=g), "block.0": s_hid},
                     {"logits": z, "qkv.0": torch.randn(3, 2, 2, 3, 3, generator=g), "block.0": t_hid},
                     torch.tensor([0, 1]))
        assert float(out["hddn"]) == pytest.approx(float(fn(s_hid, t_hid)), rel=1e-6)
        assert float(out["loss"]) == pytest.approx(float(out["hddn"]), rel=1e-6)  # pred is 0: same logits


def vit_info(name: str, n_tokens: int, width: int, heads: int, depth: int, prefix: int) -> ModelInfo:
    layers = [LayerInfo(f"blocks.{i}", (n_tokens, width), heads) for i in range(depth)]
    return ModelInfo(name, "vit", layers, num_prefix_tokens=prefix, num_classes=3)


def test_total_loss_matches_the_paper_plus_label_term():
    # a student with class + distillation token (prefix 2), a teacher with a class token only; 2 patches
    method = MiniViT(tau=2.0, beta=0.7, gamma=0.3, ce_weight=0.5)
    method.setup(vit_info("s", 4, 4, 2, 1, 2), [vit_info("t", 3, 6, 2, 2, 1)])
    assert method.student_taps == (Tap("qkv", 0), Tap("block", 0))
    assert method.teacher_taps == (Tap("qkv", 1), Tap("block", 1))
    g = torch.Generator().manual_seed(3)
    z_cls = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]], requires_grad=True)
    z_dist = torch.tensor([[0.2, -0.7, 1.1], [1.4, 0.9, -0.3]], requires_grad=True)
    s_qkv = torch.randn(3, 2, 2, 4, 2, generator=g).requires_grad_()
    s_hid = torch.randn(2, 4, 4, generator=g).requires_grad_()
    z_t = torch.tensor([[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]], requires_grad=True)
    t_qkv = torch.randn(3, 2, 2, 3, 3, generator=g).requires_grad_()
    t_hid = torch.randn(2, 3, 6, generator=g).requires_grad_()
    y = [1, 2]
    out = method({"logits": z_cls, "dist_logits": z_dist, "qkv.0": s_qkv, "block.0": s_hid},
                 {"logits": z_t, "qkv.1": t_qkv, "block.1": t_hid}, torch.tensor(y))

    ce = sum(-log_softmax(r)[c] for r, c in zip(z_cls.tolist(), y)) / 2
    pred = 4.0 * sum(kl(tr, sr, 2.0) for tr, sr in zip(z_t.tolist(), z_dist.tolist())) / 2
    keep = [0, 2, 3]  # the student's distillation token (index 1) has no teacher counterpart
    attn = hand_relation_kl(qkv_lists(s_qkv[:, :, :, keep]), qkv_lists(t_qkv), ALL9)
    hddn = hand_relation_kl(head_lists(s_hid[:, keep], 2), head_lists(t_hid, 2), [(0, 0)])
    for part, value in (("ce", ce), ("pred", pred), ("attn", attn), ("hddn", hddn)):
        assert float(out[part]) == pytest.approx(value, rel=1e-5), part
    assert float(out["loss"].detach()) == pytest.approx(0.5 * ce + pred + 0.7 * attn + 0.3 * hddn, rel=1e-5)

    out["loss"].backward()
    for s in (z_cls, z_dist, s_qkv, s_hid):
        assert s.grad is not None and s.grad.abs().sum() > 0
    for t in (z_t, t_qkv, t_hid):
        assert t.grad is None


def test_relation_heads_regroup_unequal_heads_like_minilm():
    # student 2 heads x width 2, teacher 3 heads x width 2: compared as one relation head of each side's
    # concatenated heads (the official scripts' Ar = 1); the hidden states split into the same one head
    method = MiniViT(ce_weight=0.0, relation_heads=1)
    method.setup(vit_info("s", 3, 4, 2, 1, 1), [vit_info("t", 3, 6, 3, 1, 1)])
    g = torch.Generator().manual_seed(4)
    s_qkv, t_qkv = torch.randn(3, 2, 2, 3, 2, generator=g), torch.randn(3, 2, 3, 3, 2, generator=g)
    s_hid, t_hid = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    z = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]])
    out = method({"logits": z, "qkv.0": s_qkv, "block.0": s_hid}, {"logits": z, "qkv.0": t_qkv, "block.0": t_hid},
                 torch.tensor([1, 2]))

    def joined(x: torch.Tensor) -> list:  # [3, B, H, N, d] -> per q/k/v, per sample: N x (H*d), heads end to end
        return [[[sum((x[i, b, h, n].tolist() for h in range(x.shape[2])), []) for n in range(x.shape[3])]
                 for b in range(x.shape[1])] for i in range(3)]

    assert float(out["attn"]) == pytest.approx(hand_relation_kl(joined(s_qkv), joined(t_qkv), ALL9), rel=1e-5)
    assert float(out["hddn"]) == pytest.approx(
        hand_relation_kl(head_lists(s_hid, 1), head_lists(t_hid, 1), [(0, 0)]), rel=1e-5)
    with pytest.raises(UserError, match="relation heads"):
        MiniViT(relation_heads=3).setup(vit_info("s", 3, 4, 2, 1, 1), [vit_info("t", 3, 6, 3, 1, 1)])


def test_setup_serves_only_vit_pairs_of_equal_heads():
    student = vit_info("s", 17, 64, 2, 4, 1)
    with pytest.raises(UserError, match="2 heads, teacher layer 3 has 3.*method.relation_heads=N"):
        MiniViT().setup(student, [vit_info("t", 17, 96, 3, 4, 1)])
    with pytest.raises(UserError, match="patch tokens"):
        MiniViT().setup(student, [vit_info("t", 65, 64, 2, 4, 1)])
    with pytest.raises(UserError, match="teacher cache"):
        MiniViT().setup(student, [])
    cnn = create_model("resnet_micro_cnn", 10, 16)[0]
    with pytest.raises(UserError, match="ViT teacher"):
        MiniViT().setup(student, [describe(cnn, "resnet_micro_cnn", (3, 16, 16), 10)])


@pytest.mark.parametrize("knob,value", [("share", 0), ("share", 1.5), ("kernel_size", 4), ("tau", 0.0),
                                        ("gamma", -1.0), ("relation_heads", 0), ("hidden_relation", "mse")])
def test_bad_knobs_are_user_errors(knob, value):
    with pytest.raises(UserError, match=knob):
        build_method({"name": "minivit", knob: value})


# ---------------------------------------------------------------- the multiplexed student

# vit_femto: width 64, 2 heads, MLP 256, depth 4, qkv bias. Per block, the four shared Linears hold
# qkv 64*192+192, proj 64*64+64, fc1 64*256+256, fc2 256*64+64 parameters.
SHARED_PER_BLOCK = (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)


def transforms(kernel: int) -> int:
    """The per-block additions: two 2x2 head mixings and a depth-wise conv (weights and bias)."""
    return 2 * 2 * 2 + 64 * kernel * kernel + 64


def femto(name: str = "vit_femto_patch4_16", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, 10, 16)[0]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("share,kernel,groups", [(2, 7, 2), (2, 3, 2), (4, 3, 1), (3, 3, 2), (1, 3, 4)])
def test_parameter_count_by_hand(share, kernel, groups):
    plain = femto()
    before = count(plain)
    model = multiplex(plain, share, kernel)
    assert count(model) == before - (4 - groups) * SHARED_PER_BLOCK + 4 * transforms(kernel)
    assert len(model.minivit_groups) == groups  # share 3 of depth 4: groups of 3 and 1
    # every parameter has exactly one state-dict key, so safetensors can save the state dict as it is
    assert sum(v.numel() for v in model.state_dict().values()) == count(model)


def test_blocks_of_a_group_share_weights_and_differ_by_their_transformations():
    model = multiplex(femto(), 2, 3).eval()
    b0, b1, b2 = model.blocks[0], model.blocks[1], model.blocks[2]
    for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        w0, w1, w2 = (b.get_submodule(part).weight for b in (b0, b1, b2))
        assert w0 is w1 and w0 is not w2 and isinstance(b0.get_submodule(part), torch.nn.Linear)
    assert b0.norm1 is not b1.norm1 and b0.norm2 is not b1.norm2
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(b0(x), b1(x))  # fresh norms and identity transformations: the same block
        g = torch.Generator().manual_seed(0)
        b1.attn.mix_logits.copy_(torch.eye(2) + 0.3 * torch.randn(2, 2, generator=g))
        b1.attn.mix_probs.copy_(torch.eye(2) + 0.3 * torch.randn(2, 2, generator=g))
        b1.mlp.dwconv.weight.normal_(0, 0.1, generator=g)
        assert (b0(x) - b1(x)).abs().max() > 1e-3


def hand_attention(x: torch.Tensor, qkv: torch.nn.Linear, proj: torch.nn.Linear, f1: torch.Tensor,
                   f2: torch.Tensor, heads: int) -> torch.Tensor:
    """The paper's multiplexed attention, head by head: A'_h = sum_g F1[h, g] Q_g K_g^T / sqrt(d),
    P_h = sum_g F2[h, g] softmax(A'_g), O_h = P_h V_h, then the shared projection of [O_1 .. O_H]."""
    b, n, c = x.shape
    d = c // heads
    y = qkv(x)  # [B, N, 3C]: q, k, v, each its heads in order
    q = [y[..., h * d:(h + 1) * d] for h in range(heads)]
    k = [y[..., c + h * d:c + (h + 1) * d] for h in range(heads)]
    v = [y[..., 2 * c + h * d:2 * c + (h + 1) * d] for h in range(heads)]
    raw = [q[g] @ k[g].transpose(1, 2) / math.sqrt(d) for g in range(heads)]
    mixed = [sum(float(f1[h, g]) * raw[g] for g in range(heads)) for h in range(heads)]
    soft = [m.softmax(dim=-1) for m in mixed]
    probs = [sum(float(f2[h, g]) * soft[g] for g in range(heads)) for h in range(heads)]
    return proj(torch.cat([probs[h] @ v[h] for h in range(heads)], dim=-1))


def hand_mlp(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, kernel: torch.Tensor,
             bias: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """MLP(Y + C(Y)): C a depth-wise k x k convolution (zero padding) of the patch tokens on their grid,
    written as a sum of shifted copies; prefix tokens skip it."""
    b, n, c = x.shape
    ks = kernel.shape[-1]
    pad = ks // 2
    img = torch.zeros(b, grid + 2 * pad, grid + 2 * pad, c)
    img[:, pad:pad + grid, pad:pad + grid] = x[:, prefix:].reshape(b, grid, grid, c)
    conv = bias.expand(b, grid, grid, c).clone()
    for dy in range(ks):
        for dx in range(ks):
            conv = conv + img[:, dy:dy + grid, dx:dx + grid] * kernel[:, 0, dy, dx]
    y = torch.cat((x[:, :prefix], x[:, prefix:] + conv.reshape(b, grid * grid, c)), dim=1)
    return fc2(torch.nn.functional.gelu(fc1(y)))


def test_the_second_block_of_a_group_computes_the_papers_transformations_on_the_first_blocks_weights():
    # asymmetric F1, F2 (a transposed mixing gives another result) and a non-zero kernel; block 1
    # must use block 0's qkv/proj/fc1/fc2 and its own transformations
    model = multiplex(femto(seed=3), 2, 3).eval()
    b0, b1 = model.blocks[0], model.blocks[1]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        b1.attn.mix_logits.copy_(torch.tensor([[1.2, -0.7], [0.4, 0.9]]))
        b1.attn.mix_probs.copy_(torch.tensor([[0.8, 0.5], [-0.3, 1.1]]))
        b1.mlp.dwconv.weight.copy_(0.2 * torch.randn(64, 1, 3, 3, generator=g))
        b1.mlp.dwconv.bias.copy_(0.1 * torch.randn(64, generator=g))
        x = torch.randn(2, 17, 64, generator=g)
        shared = model.minivit_groups[0]
        attn = hand_attention(x, shared.qkv, shared.proj, b1.attn.mix_logits, b1.attn.mix_probs, heads=2)
        torch.testing.assert_close(b1.attn(x), attn, rtol=1e-4, atol=1e-5)
        mlp = hand_mlp(x, shared.fc1, shared.fc2, b1.mlp.dwconv.weight, b1.mlp.dwconv.bias, grid=4, prefix=1)
        torch.testing.assert_close(b1.mlp(x), mlp, rtol=1e-4, atol=1e-5)
        transposed = hand_attention(x, shared.qkv, shared.proj, b1.attn.mix_logits.T, b1.attn.mix_probs.T, 2)
        assert (transposed - attn).abs().max() > 1e-2  # the test can tell F from F^T
        # the whole block: pre-norm residuals around the two transformed branches, with block 1's own norms
        h = x + attn_of(b1, x)
        torch.testing.assert_close(b1(x), h + b1.mlp(b1.norm2(h)), rtol=1e-4, atol=1e-5)
        assert (b0(x) - b1(x)).abs().max() > 1e-3


def attn_of(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    shared = block.attn
    return hand_attention(block.norm1(x), shared.qkv, shared.proj, shared.mix_logits, shared.mix_probs, heads=2)


def test_identity_transformations_keep_the_students_function():
    plain = femto().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(multiplex(plain, 1, 3)(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,tokens", [("vit_femto_patch4_16", 17), ("deit_femto_distilled_patch4_16", 18)])
def test_forward_taps_and_gradients(name, tokens):
    model = multiplex(femto(name), 2, 3).train()
    taps = FeatureTaps(model, [Tap("qkv", 0), Tap("qkv", 1), Tap("block", 3)])
    with taps.capture():
        out = model(torch.randn(4, 3, 16, 16))
    feats = taps.pop()
    logits = out[0] + out[1] if isinstance(out, tuple) else out
    assert logits.shape == (4, 10)
    assert feats["qkv.0"].shape == (3, 4, 2, tokens, 32) and feats["block.3"].shape == (4, tokens, 64)
    assert not torch.allclose(feats["qkv.0"], feats["qkv.1"])  # one shared qkv, each block's own capture
    # the last block's patch tokens never reach the class token, so its output joins the loss
    (logits.square().mean() + feats["block.3"].square().mean()).backward()
    for group in model.minivit_groups:
        for lin in (group.qkv, group.proj, group.fc1, group.fc2):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    for blk in model.blocks:
        for p in (blk.attn.mix_logits, blk.attn.mix_probs, blk.mlp.dwconv.weight, blk.norm1.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_state_dict_saves_and_reloads(tmp_path: Path):
    model = multiplex(femto(seed=1), 2, 3).eval()
    with torch.no_grad():
        model.blocks[1].attn.mix_probs.add_(0.1)
    save_file(model.state_dict(), str(tmp_path / "s.safetensors"))
    again = multiplex(femto(seed=2), 2, 3).eval()
    again.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_non_vit_student_is_a_user_error():
    with pytest.raises(UserError, match="ViT"):
        MiniViT().adapt_student(create_model("resnet_micro_cnn", 10, 16)[0], "resnet_micro_cnn")


# ---------------------------------------------------------------- the CLI


def test_distill_resume_eval_and_profile(tmp_path: Path, vit_teacher_run: Path):
    student = "deit_femto_distilled_patch4_16"
    args = distill_args("minivit", student, "vit_femto_patch4_16", vit_teacher_run, "--set", "method.kernel_size=3")
    summary = check_distill_and_resume(tmp_path, args)
    run = tmp_path / "straight"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_pred", "loss_attn", "loss_hddn"} <= rows[0].keys()

    r = run_cli_fast("eval", "--student", str(run), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["top1"] == summary["student_top1"]
    # the Python way back (docs/usage.md): the multiplexed student from the run directory alone
    assert load_run_model_top1(run) == pytest.approx(summary["student_top1"], abs=1e-6)

    r = run_cli_fast("profile", "--model", str(run), "--batch", "4")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout.strip().splitlines()[-1])
    plain = count(femto(student))
    assert prof["params"] == summary["params"] == plain - 2 * SHARED_PER_BLOCK + 4 * transforms(3) < plain


def test_cli_error_for_a_cnn_student(tmp_path: Path, vit_teacher_run: Path):
    r = run_cli_fast(*distill_args("minivit", "resnet_micro_cnn", "vit_femto_patch4_16", vit_teacher_run),
                "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
