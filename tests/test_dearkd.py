"""``dearkd`` (DearKD): the stage-1 loss against explicit loops over hand-made tensors, the stage switch
and its checkpointed buffer, real CNN and ViT teachers through the taps, and the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import check_distill_and_resume, distill_args, run_cli_fast
from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.models import Teacher, create_model, prepare_student, student_outputs
from vitdistill.models.taps import FeatureTaps, LayerInfo, ModelInfo, describe

# A student ViT of 2 blocks: 1 class token + a 2x2 patch grid, width 3. A CNN teacher of 2 stages:
# stage 0 gives 2 channels on a 4x4 map. Two samples, three classes.
STUDENT = ModelInfo("s", "vit", [LayerInfo("blocks.0", (5, 3), 1), LayerInfo("blocks.1", (5, 3), 1)],
                    num_prefix_tokens=1, num_classes=3)
CNN = ModelInfo("t", "cnn", [LayerInfo("layer1", (2, 4, 4)), LayerInfo("layer2", (4, 2, 2))], num_classes=3)
S = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]
D = [[0.2, -0.7, 1.1], [1.4, 0.9, -0.3]]
T = [[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]]  # teacher argmax [0, 1], labels [1, 2]
Y = [1, 2]
W = [[0.5, -1.0, 0.25], [1.5, 0.0, -0.5]]  # the aligner, student width 3 -> teacher width 2
BIAS = [0.1, -0.2]


def log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def ce(rows: list[list[float]], y: list[int]) -> float:
    return sum(-log_softmax(r)[k] for r, k in zip(rows, y)) / len(rows)


def hand_feature_loss(tokens: torch.Tensor, fmap: torch.Tensor) -> float:
    """MSE between the aligned student patch tokens and the teacher map averaged over 2x2 windows."""
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for gy in range(2):
            for gx in range(2):
                tok = tokens[b, 1 + gy * 2 + gx].tolist()  # skip the class token; row-major grid
                for c in range(2):
                    aligned = sum(W[c][k] * tok[k] for k in range(3)) + BIAS[c]
                    pooled = sum(fmap[b, c, 2 * gy + i, 2 * gx + j].item() for i in range(2) for j in range(2)) / 4
                    total += (aligned - pooled) ** 2
                    count += 1
    return total / count


def made_method(**knobs) -> torch.nn.Module:
    method = build_method({"name": "dearkd", **knobs})
    method.setup(STUDENT, [CNN])
    with torch.no_grad():
        method.aligners[0].weight.copy_(torch.tensor(W))
        method.aligners[0].bias.copy_(torch.tensor(BIAS))
    return method


def inputs(requires_grad: bool = False) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    student = {"logits": torch.tensor(S, requires_grad=requires_grad),
               "dist_logits": torch.tensor(D, requires_grad=requires_grad),
               "block.0": torch.randn(2, 5, 3, generator=g).requires_grad_(requires_grad)}
    teacher = {"logits": torch.tensor(T), "block.0": torch.randn(2, 2, 4, 4, generator=g)}
    return student, teacher


def test_default_layers_pair_the_early_half_with_the_early_stages():
    method = made_method()
    assert method.pairs == [(0, 0)]
    assert [t.key for t in method.student_taps] == ["block.0"] and [t.key for t in method.teacher_taps] == ["block.0"]
    deep = ModelInfo("s", "vit", [LayerInfo(f"blocks.{i}", (5, 3), 1) for i in range(12)], num_prefix_tokens=1)
    cnn4 = ModelInfo("t", "cnn", [LayerInfo(f"layer{i}", (2, 4, 4)) for i in range(4)])
    method = build_method({"name": "dearkd"})
    method.setup(deep, [cnn4])
    assert method.pairs == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]  # blocks 0-5 onto stages 0-1
    method = build_method({"name": "dearkd", "student_layers": [1], "teacher_layers": [-1]})
    method.setup(STUDENT, [CNN])
    assert method.pairs == [(1, 1)] and method.aligners[0].out_features == 4


@pytest.mark.parametrize("kd_alpha, lambda_feat", [(0.5, 1.0), (0.2, 3.0)])
def test_stage_one_loss_matches_the_paper(kd_alpha, lambda_feat):
    method = made_method(kd_alpha=kd_alpha, lambda_feat=lambda_feat, stage1_epochs=3)
    method.on_epoch_start(2)
    student, teacher = inputs()
    out = method(student, teacher, torch.tensor(Y))
    teacher_argmax = [0, 1]
    feat = hand_feature_loss(student["block.0"], teacher["block.0"])
    assert float(out["ce"]) == pytest.approx(ce(S, Y), rel=1e-5)
    assert float(out["kd"]) == pytest.approx(ce(D, teacher_argmax), rel=1e-5)  # hard KD on the dist head
    assert float(out["feat"]) == pytest.approx(feat, rel=1e-5)
    expected = (1 - kd_alpha) * ce(S, Y) + kd_alpha * ce(D, teacher_argmax) + lambda_feat * feat
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)


def test_soft_distillation_and_a_student_without_dist_token():
    method = made_method(distillation="soft", tau=2.0)
    student, teacher = inputs()
    del student["dist_logits"]
    out = method(student, teacher, torch.tensor(Y))
    kl = 0.0
    for s_row, t_row in zip(S, T):
        ls, lt = log_softmax([v / 2 for v in s_row]), log_softmax([v / 2 for v in t_row])
        kl += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    assert float(out["kd"]) == pytest.approx(4 * kl / 2, rel=1e-5)  # tau^2 * batch-mean KL on the class head


def test_stage_two_is_labels_only_and_the_stage_is_checkpointed():
    method = made_method(stage1_epochs=1)
    method.on_epoch_start(0)
    assert int(method.stage) == 1
    method.on_epoch_start(1)
    assert int(method.stage) == 2
    student, teacher = inputs()
    out = method(student, None, torch.tensor(Y))  # the teacher is not even read
    assert float(out["loss"]) == pytest.approx((ce(S, Y) + ce(D, Y)) / 2, rel=1e-5)  # both heads learn the label
    assert float(out["kd"]) == 0.0 and float(out["feat"]) == 0.0
    resumed = made_method(stage1_epochs=1)
    assert resumed._stage == 1
    resumed.load_state_dict(method.state_dict())
    assert "stage" in method.state_dict() and resumed._stage == 2  # restored without on_epoch_start
    assert float(resumed(student, None, torch.tensor(Y))["loss"]) == pytest.approx(float(out["loss"]))
    assert int(build_method({"name": "dearkd", "stage1_epochs": 0}).stage) == 2
    assert build_method({"name": "dearkd"}).stage1_epochs == 250


def test_gradients_reach_student_and_aligners_and_never_the_teacher():
    method = made_method()
    student, teacher = inputs(requires_grad=True)
    teacher = {k: v.clone().requires_grad_(True) for k, v in teacher.items()}  # leaves that would collect grads
    method(student, teacher, torch.tensor(Y))["loss"].backward()
    for key in ("logits", "dist_logits", "block.0"):
        assert student[key].grad.abs().sum() > 0, key
    assert student["block.0"].grad[:, 0].abs().sum() == 0  # the class token is not distilled
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.aligners.parameters())
    assert all(v.grad is None for v in teacher.values())


@pytest.mark.parametrize("teacher_name", ["resnet_micro_cnn", "vit_femto_patch4_16"])
def test_real_models_through_the_taps(teacher_name):
    torch.manual_seed(0)
    student, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    prepare_student(student)
    t_model, _ = create_model(teacher_name, 10, 16)
    method = build_method({"name": "dearkd"})
    method.setup(describe(student, "s", (3, 16, 16), 10), [describe(t_model, teacher_name, (3, 16, 16), 10)])
    assert method.pairs == [(0, 0), (1, 1)]
    teacher = Teacher(t_model)
    teacher.tap(method.teacher_taps)
    x = torch.randn(4, 3, 16, 16)
    s_out = student_outputs(student, x, FeatureTaps(student, method.student_taps))
    out = method(s_out, teacher(x), torch.arange(4))
    out["loss"].backward()
    assert float(out["feat"]) > 0
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.aligners.parameters())
    assert all(p.grad is None for p in t_model.parameters())


@pytest.mark.parametrize("options", [{"stage1_epochs": -1}, {"stage1_epochs": 1.5}, {"lambda_feat": -1.0},
                                     {"distillation": "medium"}, {"kd_alpha": 1.5}, {"tau": 0.0}])
def test_bad_knobs_are_user_errors(options):
    with pytest.raises(UserError, match="bad knob for method 'dearkd'"):
        build_method({"name": "dearkd", **options})


def test_a_cnn_student_or_a_teacher_cache_is_refused():
    method = build_method({"name": "dearkd"})
    with pytest.raises(UserError, match="needs a ViT student"):
        method.setup(CNN, [CNN])
    with pytest.raises(UserError, match="live teacher"):
        method.setup(STUDENT, [])  # what a teacher cache gives a feature method


def test_cli_distill_and_resume_across_the_stage_switch(teacher_run: Path, tmp_path: Path):
    args = distill_args("dearkd", "deit_femto_distilled_patch4_16", "resnet_micro_cnn", teacher_run, "--set",
                        "method.stage1_epochs=1")
    check_distill_and_resume(tmp_path, args)  # the resumed leg starts in stage 2
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss_feat"] > 0 and rows[0]["loss_kd"] > 0
    assert rows[1]["loss_feat"] == 0 and rows[1]["loss_kd"] == 0


def test_cli_cnn_student_is_a_one_line_error(teacher_run: Path, tmp_path: Path):
    r = run_cli_fast(*distill_args("dearkd", "resnet_micro_cnn", "resnet_micro_cnn", teacher_run), "--out",
                str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "needs a ViT student" in r.stderr
