"""``tat``: the target-aware transformer's loss against the paper's equations computed by hand (plain
Python loops), its variants, gradients, and the CLI with a CNN and a ViT teacher."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import check_distill_and_resume, distill_args, run_cli_fast
from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.models.taps import LayerInfo, ModelInfo

B, H, W, CS, CT = 2, 4, 4, 3, 2
N = H * W
EPS = 1e-5  # BatchNorm's
WG = [[0.5, -0.3, 0.8], [0.2, 0.7, -0.6]]  # gamma's 1x1 map, teacher width x student width
WP = [[-0.4, 0.9, 0.1], [0.6, 0.3, 0.5]]  # phi's
BN_G = ([1.5, 0.7], [0.1, -0.2])  # gamma's batch-norm weight and bias
BN_P = ([0.8, 1.2], [-0.3, 0.4])


def student_tokens(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1 + N, CS, generator=g).tolist()  # a class token first


def teacher_map(seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, CT, H, W, generator=g).tolist()  # a CNN stage, NCHW, on the student's grid


# ---------------------------------------------------------------- the paper's equations, by hand


def embed(x: list, weight: list, bn: tuple) -> list:
    """1x1 map then training-mode batch norm over all B*N positions (biased variance)."""
    y = [[[sum(w * v for w, v in zip(row, tok)) for row in weight] for tok in img] for img in x]
    out = [[[0.0] * len(weight) for _ in img] for img in y]
    for c in range(len(weight)):
        vals = [tok[c] for img in y for tok in img]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)
        for b, img in enumerate(y):
            for i, tok in enumerate(img):
                out[b][i][c] = (tok[c] - mean) / math.sqrt(var + EPS) * bn[0][c] + bn[1][c]
    return out


def match(key: list, value: list, target: list, query: str, temperature: float = 1.0) -> tuple[float, int]:
    """Sum of squared errors and element count of f^s' against f^t, for one set of positions.
    Teacher query: w^i_j = softmax_j <f^t_i, gamma(f^s)_j> / T; student query: softmax_j <gamma(f^s)_i, f^t_j> / T."""
    sse, count = 0.0, 0
    for i in range(len(target)):
        if query == "teacher":
            scores = [sum(a * b for a, b in zip(target[i], key[j])) for j in range(len(key))]
        else:
            scores = [sum(a * b for a, b in zip(key[i], target[j])) for j in range(len(target))]
        scores = [v / temperature for v in scores]
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        w = [v / sum(e) for v in e]
        rec = [sum(w[j] * value[j][c] for j in range(len(value))) for c in range(len(target[i]))]
        sse += sum((r - t) ** 2 for r, t in zip(rec, target[i]))
        count += len(rec)
    return sse, count


def hand_tat(s: list, t: list, variant: str, query: str = "teacher", patch: int = 2, groups: int | None = None,
             anchor: int = 2, anchor_weight: float = 1.0, heads: int = 1, temperature: float = 1.0) -> float:
    s_patch = [img[1:] for img in s]  # the class token is not a position
    t_tok = [[[t[b][c][y][x] for c in range(CT)] for y in range(H) for x in range(W)] for b in range(B)]
    key, value = embed(s_patch, WG, BN_G), embed(s_patch, WP, BN_P)
    # heads: each slice of the teacher's channels is a matching of its own, and the MSE spans them all
    # (equal element counts, so it is the mean over heads)
    d = CT // heads
    sliced = [[[[tok[h * d:(h + 1) * d] for tok in img] for img in x] for x in (key, value, t_tok)]
              for h in range(heads)]
    return sum(variant_loss(*parts, variant, query, patch, groups, anchor, anchor_weight, temperature)
               for parts in sliced) / heads


def variant_loss(key: list, value: list, t_tok: list, variant: str, query: str, patch: int, groups: int | None,
                 anchor: int, anchor_weight: float, temperature: float) -> float:

    def mse(sets: list) -> float:  # sets of (key, value, target) positions, one MSE over all of them
        sse = count = 0
        for k, v, tt in sets:
            a, n = match(k, v, tt, query, temperature)
            sse, count = sse + a, count + n
        return sse / count

    def patch_groups() -> float:
        n_patch = (H // patch) * (W // patch)
        g = groups or n_patch
        per = n_patch // g
        sets = []
        for b in range(B):
            for gi in range(g):
                def tokens(x):  # position (py, px) of the group concatenates that position of its patches
                    out = []
                    for py in range(patch):
                        for px in range(patch):
                            tok = []
                            for r in range(per):
                                k = gi * per + r
                                row, col = divmod(k, W // patch)
                                tok += x[b][(row * patch + py) * W + col * patch + px]
                            out.append(tok)
                    return out
                sets.append((tokens(key), tokens(value), tokens(t_tok)))
        return mse(sets)

    def anchors() -> float:
        k = H // anchor
        def pool(x, b):
            return [[sum(x[b][(ay * k + dy) * W + ax * k + dx][c] for dy in range(k) for dx in range(k)) / (k * k)
                     for c in range(len(x[b][0]))] for ay in range(anchor) for ax in range(anchor)]
        return mse([(pool(key, b), pool(value, b), pool(t_tok, b)) for b in range(B)])

    if variant == "full":
        return mse([(key[b], value[b], t_tok[b]) for b in range(B)])
    if variant == "patch_group":
        return patch_groups()
    if variant == "anchor":
        return anchors()
    return patch_groups() + anchor_weight * anchors()


def hand_ce_kd(z: list, zt: list, y: list, tau: float) -> tuple[float, float]:
    ce = kd = 0.0
    for row, trow, label in zip(z, zt, y):
        ls = [v / tau - math.log(sum(math.exp(u / tau) for u in row)) for v in row]
        lt = [v / tau - math.log(sum(math.exp(u / tau) for u in trow)) for v in trow]
        kd += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
        lp = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
        ce -= lp[label]
    return ce / len(z), tau * tau * kd / len(z)


# ---------------------------------------------------------------- the method on hand-made tensors


def infos() -> tuple[ModelInfo, ModelInfo]:
    s = ModelInfo("s", "vit", [LayerInfo("blocks.0", (1 + N, CS), heads=1)], num_prefix_tokens=1, num_classes=3)
    t = ModelInfo("t", "cnn", [LayerInfo("layer1", (CT, H, W))], num_classes=3)
    return s, t


def make(**knobs):
    method = build_method({"name": "tat", **knobs})
    s, t = infos()
    method.setup(s, [t])
    with torch.no_grad():
        for emb, w, bn in ((method.gamma[0], WG, BN_G), (method.phi[0], WP, BN_P)):
            emb.proj.weight.copy_(torch.tensor(w))
            emb.norm.weight.copy_(torch.tensor(bn[0]))
            emb.norm.bias.copy_(torch.tensor(bn[1]))
    return method


Z = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]
ZT = [[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]]
Y = [1, 2]


def outputs(s: list, t: list, grad: bool = False) -> tuple[dict, dict]:
    student = {"logits": torch.tensor(Z, requires_grad=grad), "block.0": torch.tensor(s, requires_grad=grad)}
    teacher = {"logits": torch.tensor(ZT, requires_grad=grad), "block.0": torch.tensor(t, requires_grad=grad)}
    return student, teacher


@pytest.mark.parametrize("knobs", [
    dict(variant="full"),
    dict(variant="full", query="student"),
    dict(variant="patch_group", patch_size=2),
    dict(variant="patch_group", patch_size=2, groups=2),
    dict(variant="patch_group", patch_size=2, groups=1, query="student"),
    dict(variant="anchor", anchor=2),
    dict(variant="hierarchical", patch_size=2, groups=2, anchor=2, anchor_weight=0.5),
    dict(variant="full", temperature=2.5),
    dict(variant="full", heads=2, query="student"),
    dict(variant="hierarchical", patch_size=2, groups=2, heads=2, temperature=0.5),
])
def test_tat_matches_the_paper_equations_by_hand(knobs):
    method = make(beta=0.3, **knobs)
    s, t = student_tokens(), teacher_map()
    out = method(*outputs(s, t), torch.tensor(Y))
    hand_knobs = {"variant": knobs["variant"], "query": knobs.get("query", "teacher"),
                  "patch": knobs.get("patch_size", 2), "groups": knobs.get("groups"),
                  "anchor": knobs.get("anchor", 2), "anchor_weight": knobs.get("anchor_weight", 1.0),
                  "heads": knobs.get("heads", 1), "temperature": knobs.get("temperature", 1.0)}
    tat = hand_tat(s, t, **hand_knobs)
    ce, kd = hand_ce_kd(Z, ZT, Y, 1.0)
    assert float(out["tat"]) == pytest.approx(tat, rel=1e-5)
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-5) and float(out["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(0.5 * ce + 0.5 * kd + 0.3 * tat, rel=1e-5)


def test_teacher_query_is_one_to_all_so_moving_student_positions_changes_nothing():
    # each teacher position gathers *all* student positions, so permuting the student's positions
    # leaves the loss unchanged, unlike a one-to-one MSE
    method = make()
    s, t = student_tokens(), teacher_map()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3)) + 1
    shuffled = torch.tensor(s)[:, torch.cat([torch.zeros(1, dtype=torch.long), perm])].tolist()
    a = method(*outputs(s, t), torch.tensor(Y))["tat"]
    b = method(*outputs(shuffled, t), torch.tensor(Y))["tat"]
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_defaults_follow_the_official_recipe_and_taps_are_the_last_layers():
    method = build_method({"name": "tat"})
    assert (method.beta, method.alpha, method.tau, method.variant, method.query) == (0.1, 0.5, 1.0, "full", "teacher")
    s = ModelInfo("s", "vit", [LayerInfo(f"blocks.{i}", (17, 8), heads=2) for i in range(4)], num_prefix_tokens=1)
    t = ModelInfo("t", "cnn", [LayerInfo(f"layer{i}", (4 * 2 ** i, 8 // 2 ** i, 8 // 2 ** i)) for i in range(3)])
    method.setup(s, [t])
    assert [tap.key for tap in method.student_taps] == ["block.3"]
    assert [tap.key for tap in method.teacher_taps] == ["block.2"]
    assert method.gamma[0].proj.weight.shape == (16, 8)
    two = build_method({"name": "tat", "student_layers": [1, -1], "teacher_layers": [0, -1]})
    two.setup(s, [t])
    assert two.pairs == [(1, 0), (3, 2)] and len(two.gamma) == 2


def test_gradients_reach_student_and_projectors_never_the_teacher():
    method = make(variant="hierarchical", groups=2)
    student, teacher = outputs(student_tokens(), teacher_map(), grad=True)
    method(student, teacher, torch.tensor(Y))["loss"].backward()
    assert student["block.0"].grad is not None and student["block.0"].grad[:, 1:].abs().sum() > 0
    assert student["logits"].grad is not None
    for p in method.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert teacher["block.0"].grad is None and teacher["logits"].grad is None


def test_bad_knobs_and_grids_are_user_errors():
    for knobs in (dict(variant="window"), dict(query="both"), dict(anchor=0), dict(alpha=2.0), dict(heads=0),
                  dict(temperature=0.0)):
        with pytest.raises(UserError):
            build_method({"name": "tat", **knobs})
    s, t = infos()
    for knobs, needle in ((dict(variant="patch_group", patch_size=3), "patch_size"),
                          (dict(variant="patch_group", groups=3), "groups"),
                          (dict(variant="anchor", anchor=3), "anchor"),
                          (dict(heads=3), "heads")):
        with pytest.raises(UserError, match=needle):
            build_method({"name": "tat", **knobs}).setup(s, [t])
    with pytest.raises(UserError, match="live teacher"):
        build_method({"name": "tat"}).setup(s, [])


# ---------------------------------------------------------------- the CLI


def test_distill_from_a_cnn_teacher_resumes_exactly(teacher_run: Path, tmp_path: Path) -> None:
    args = distill_args("tat", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run)
    summary = check_distill_and_resume(tmp_path, args)
    assert summary["method"] == "tat" and summary["student_top1"] is not None


@pytest.mark.parametrize("teacher_name", ["vit_femto_patch4_16", "resnet_micro_cnn"])
def test_real_vit_and_cnn_teachers_train_through_the_taps(teacher_name: str) -> None:
    # in-process (no CLI): the engine's own set-up, taps and student outputs, one hierarchical step
    from vitdistill.models import Teacher, create_model, student_outputs
    from vitdistill.models.taps import FeatureTaps, describe
    from vitdistill.models.wrappers import InputPrep

    torch.manual_seed(0)
    student, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    teacher = Teacher(create_model(teacher_name, 10, 16)[0])
    method = build_method({"name": "tat", "variant": "hierarchical", "groups": 2})
    method.setup(describe(student, "s", (3, 16, 16), 10), [describe(teacher.model, "t", (3, 16, 16), 10)])
    teacher.tap(method.teacher_taps)
    taps = FeatureTaps(student, method.student_taps)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    student.train()
    method.train()
    out = method(student_outputs(student, InputPrep.for_model(student)(images), taps), teacher(images),
                 torch.arange(8) % 10)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and float(out["tat"]) > 0
    assert student.blocks[-1].mlp.fc2.weight.grad is not None
    assert all(p.grad is not None for p in method.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_a_patch_size_that_does_not_tile_the_grid_is_one_line(teacher_run: Path, tmp_path: Path) -> None:
    r = run_cli_fast(*distill_args("tat", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run,
                              "--set", "method.variant=patch_group", "--set", "method.patch_size=3",
                              "--out", str(tmp_path / "bad")))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "patch_size" in lines[0], r.stderr
