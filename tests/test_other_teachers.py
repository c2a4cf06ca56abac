"""Teachers that are neither a plain ViT nor a plain CNN: timm's Swin (hierarchical, NHWC stage
outputs) and CaiT (class token added late, talking-heads attention). Every feature method either
trains through them or refuses them in one line that says what to use instead, and one Swin teacher
goes end to end through the CLI (train, distill, resume)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, check_distill_and_resume, run_cli_fast

from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.models import Teacher, create_model, student_outputs
from vitdistill.models.taps import FeatureTaps, describe
from vitdistill.models.wrappers import InputPrep

SWIN = ("swin_tiny_patch4_window7_224", {"window_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]})
CAIT = ("cait_xxs24_224", {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "depth_token_only": 1})
TEACHERS = {"swin": SWIN, "cait": CAIT}

# method -> the loss term that reads the teacher's layers
FEATURE_TERM = {"hidden": "hidden", "vitkd": "gen", "tat": "tat", "dearkd": "feat", "manifold": "mf_intra"}
# what each refusal must name, so the user knows why and where to go
REFUSED = {
    ("attention", "swin"): "feature maps, not tokens", ("attention", "cait"): "TalkingHeadAttn",
    ("minivit", "swin"): "feature maps, not tokens", ("minivit", "cait"): "TalkingHeadAttn",
}


def one_step(method_name: str, teacher_key: str, **knobs) -> tuple[dict, torch.nn.Module, torch.nn.Module, object]:
    torch.manual_seed(0)
    student, _ = create_model("vit_femto_patch4_16", 10, 16)
    name, kwargs = TEACHERS[teacher_key]
    teacher_model, _ = create_model(name, 10, 16, kwargs)
    method = build_method({"name": method_name, **knobs})
    student = method.adapt_student(student, "s")
    method.setup(describe(student, "s", (3, 16, 16), 10), [describe(teacher_model, "t", (3, 16, 16), 10)])
    teacher = Teacher(teacher_model)
    teacher.tap(method.teacher_taps)
    taps = FeatureTaps(student, method.student_taps)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    student.train()
    method.train()
    out = method(student_outputs(student, InputPrep.for_model(student)(images), taps), teacher(images),
                 torch.arange(8) % 10)
    out["loss"].backward()
    return out, student, teacher_model, method


@pytest.mark.parametrize("teacher_key", sorted(TEACHERS))
@pytest.mark.parametrize("method_name", sorted(FEATURE_TERM))
def test_feature_methods_train_through_swin_and_cait(method_name: str, teacher_key: str) -> None:
    out, student, teacher, method = one_step(method_name, teacher_key)
    assert torch.isfinite(out["loss"]) and float(out[FEATURE_TERM[method_name]]) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.blocks.parameters())
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_a_swin_teacher_is_read_as_nchw_stage_maps() -> None:
    # Swin's last stage is 2x2 at 32 channels here (NHWC inside timm); a method that took it for NCHW
    # would see 2 channels on a 2x32 grid, and tat's projections would map to the wrong width
    name, kwargs = SWIN
    info = describe(create_model(name, 10, 16, kwargs)[0], "t", (3, 16, 16), 10)
    assert info.kind == "cnn" and [layer.shape for layer in info.layers] == [(16, 4, 4), (32, 2, 2)]
    _, _, _, tat = one_step("tat", "swin")
    assert tat.gamma[0].proj.weight.shape == (32, 64)


def test_a_cait_teacher_has_no_prefix_token_in_its_blocks() -> None:
    name, kwargs = CAIT
    info = describe(create_model(name, 10, 16, kwargs)[0], "t", (3, 16, 16), 10)
    assert info.kind == "vit" and info.num_prefix_tokens == 0 and info.layers[0].shape == (16, 32)


@pytest.mark.parametrize("method_name,teacher_key", sorted(REFUSED))
def test_methods_that_need_a_plain_vit_teacher_refuse_in_one_line(method_name: str, teacher_key: str) -> None:
    with pytest.raises(UserError, match=REFUSED[(method_name, teacher_key)]) as info:
        one_step(method_name, teacher_key)
    assert "\n" not in str(info.value)


def test_distill_from_a_swin_teacher_through_the_cli(tmp_path: Path) -> None:
    name, kwargs = SWIN
    teacher = tmp_path / "swin"
    over = json.dumps(kwargs)
    r = run_cli_fast("train", "--model", name, "--set", f"model.student_kwargs={over}", "--epochs", "1",
                     "--out", str(teacher), *TINY)
    assert r.returncode == 0, r.stderr
    args = ["distill", "--method", "tat", "--student", "vit_femto_patch4_16", "--teacher", name,
            "--set", f"model.teacher_kwargs={over}", "--teacher-weights", str(teacher), "--epochs", "2", *TINY]
    summary = check_distill_and_resume(tmp_path, args)
    trained = json.loads((teacher / "summary.json").read_text())
    # the distill run scored the Swin it loaded: the same top-1 as the run that trained it
    assert summary["method"] == "tat" and summary["teacher"] == name
    assert summary["teacher_top1"] == trained["student_top1"]
