"""Tests of the model layer: tiny registered models, DeiT's two heads, the frozen teacher and its
input preparation, weights loading and its errors, and student files that timm alone can rebuild."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitdistill.engine.io import write_safetensors
from vitdistill.errors import UserError
from vitdistill.models import (
    TINY_MODELS, InputPrep, Teacher, create_model, has_dist_token, model_spec, prepare_student,
    read_state_dict, student_outputs,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Rows of weights for a 1-D linear resize, half-pixel centres (align_corners=False), edges clamped."""
    r = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w = src - i0
        r[i, i0] += 1 - w
        r[i, i1] += w
    return r


def resize_by_hand(x: torch.Tensor, size: int) -> torch.Tensor:
    rh = bilinear_matrix(x.shape[-2], size)
    rw = bilinear_matrix(x.shape[-1], size)
    return torch.einsum("oi,bcij,pj->bcop", rh, x.double(), rw).float()


# ---------------------------------------------------------------- create_model

TINY_SIZES = {
    "vit_femto_patch4_16": 16,
    "deit_femto_distilled_patch4_16": 16,
    "vit_pico_patch4_32": 32,
    "deit_pico_distilled_patch4_32": 32,
    "resnet_micro_cnn": 16,
    "resnet_small_cnn": 32,
}


def test_the_tiny_models_are_the_ones_documented():
    assert set(TINY_MODELS) == set(TINY_SIZES)


@pytest.mark.parametrize("name", sorted(TINY_SIZES))
def test_tiny_model_builds_and_runs(name):
    size = TINY_SIZES[name]
    torch.manual_seed(0)
    model, spec = create_model(name, 7, size)
    model.eval()
    with torch.no_grad():
        out = model(InputPrep.for_model(model)(images(2, size)))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert spec["registered"] == name
    assert spec["kwargs"]["num_classes"] == 7
    assert has_dist_token(model) == ("distilled" in name)
    if name.startswith(("vit", "deit")):
        assert tuple(model.patch_embed.img_size) == (size, size)
        assert spec["kwargs"]["img_size"] == size
    else:
        assert spec["small_stem"] is True
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, torch.nn.Identity)


def test_cnn_accepts_another_input_size():
    model, _ = create_model("resnet_micro_cnn", 4, 32)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 8, 8)).shape == (1, 4)


def test_overrides_reach_timm_and_the_spec():
    model, spec = create_model("vit_femto_patch4_16", 3, 16, {"depth": 2, "embed_dim": 32})
    assert len(model.blocks) == 2 and model.embed_dim == 32
    assert spec["kwargs"]["depth"] == 2 and spec["name"] == "vit_tiny_patch16_224"
    assert model_spec("vit_femto_patch4_16")["kwargs"]["depth"] == 4  # the registry is not mutated


def test_an_explicit_img_size_override_wins_over_the_data_size():
    model, spec = create_model("vit_femto_patch4_16", 3, 32, {"img_size": 16})
    assert tuple(model.patch_embed.img_size) == (16, 16) and spec["kwargs"]["img_size"] == 16


def test_bad_override_is_a_user_error():
    with pytest.raises(UserError, match="overrides"):
        create_model("vit_femto_patch4_16", 3, 16, {"no_such_kwarg": 1})


def test_unknown_model_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown model 'vit_femto_patch4_61'.*did you mean 'vit_femto_patch4_16'"):
        create_model("vit_femto_patch4_61", 10, 16)


# ---------------------------------------------------------------- DeiT's two heads


def test_deit_returns_two_heads_in_training_and_their_mean_at_evaluation():
    torch.manual_seed(0)
    model, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    prepare_student(model)
    x = InputPrep.for_model(model)(images(3, 16))

    model.train()
    out = student_outputs(model, x)
    assert set(out) == {"logits", "dist_logits"}
    assert out["logits"].shape == out["dist_logits"].shape == (3, 10)
    assert not torch.allclose(out["logits"], out["dist_logits"])

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        cls_logits = model.head(feats[:, 0])
        dist_logits = model.head_dist(feats[:, 1])
        evaluated = model(x)
        named = student_outputs(model, x)
    torch.testing.assert_close(evaluated, (cls_logits + dist_logits) / 2)
    assert set(named) == {"logits"}
    torch.testing.assert_close(named["logits"], evaluated)
    # drop rates are 0, so the training-mode heads are the same functions of the same weights
    torch.testing.assert_close(out["logits"].detach(), cls_logits)
    torch.testing.assert_close(out["dist_logits"].detach(), dist_logits)


def test_prepare_student_is_needed_for_two_heads_and_harmless_on_a_plain_vit():
    deit, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    x = torch.zeros(1, 3, 16, 16)
    assert set(student_outputs(deit.train(), x)) == {"logits"}  # timm averages unless asked
    prepare_student(deit)
    assert set(student_outputs(deit, x)) == {"logits", "dist_logits"}
    vit, _ = create_model("vit_femto_patch4_16", 10, 16)
    prepare_student(vit)
    assert set(student_outputs(vit.train(), x)) == {"logits"}


@pytest.mark.parametrize("plain,twin", [("vit_femto_patch4_16", "deit_femto_distilled_patch4_16"),
                                        ("vit_pico_patch4_32", "deit_pico_distilled_patch4_32")])
def test_a_distillation_token_twin_sees_the_input_its_plain_vit_sees(plain, twin):
    # a no-KD vs deit-* comparison must differ by the token alone, not by the input's scaling
    # (timm's DeiT configs default to ImageNet's mean and std, its ViT configs to 0.5 / 0.5)
    vit, _ = create_model(plain, 10)
    deit, spec = create_model(twin, 10)
    x = images(2, vit.patch_embed.img_size[0])
    torch.testing.assert_close(InputPrep.for_model(deit)(x), InputPrep.for_model(vit)(x), rtol=0, atol=0)
    rebuilt = timm.create_model(spec["name"], **json.loads(json.dumps(spec["kwargs"])))
    assert timm.data.resolve_data_config({}, model=rebuilt)["std"] == [0.5, 0.5, 0.5]  # timm alone knows it too


@pytest.mark.parametrize("name,size", [("vit_femto_patch4_16", 16), ("deit_pico_distilled_patch4_32", 32),
                                       ("resnet_micro_cnn", 16), ("rednet_micro_inv", 16)])
def test_timm_alone_resolves_the_resolution_the_model_was_built_for(name, size):
    # timm's configs say 224 px whatever img_size is: its eval transform would resize a 16 px digit to 224
    _, spec = create_model(name, 10, size)
    rebuilt = timm.create_model(spec["name"], **json.loads(json.dumps(spec["kwargs"])))
    cfg = timm.data.resolve_data_config({}, model=rebuilt)
    assert tuple(cfg["input_size"]) == (3, size, size) and cfg["crop_pct"] == 1.0
    img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    x = timm.data.create_transform(**cfg)(img)
    assert x.shape == (3, size, size)
    # the plain full image, as vitdistill scores it (a size-preserving resize, no crop)
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(cfg["mean"]).view(3, 1, 1)) \
        / torch.tensor(cfg["std"]).view(3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


def test_a_resolution_the_caller_sets_in_the_overlay_wins():
    _, spec = create_model("vit_femto_patch4_16", 10, 16, {"pretrained_cfg_overlay": {"crop_pct": 0.5}})
    assert spec["kwargs"]["pretrained_cfg_overlay"]["crop_pct"] == 0.5
    assert spec["kwargs"]["pretrained_cfg_overlay"]["input_size"] == (3, 16, 16)


# ---------------------------------------------------------------- Teacher and InputPrep


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model, _ = create_model("resnet_micro_cnn", 10, 16)
    teacher = Teacher(model)
    assert teacher.train() is teacher
    assert not teacher.training
    assert not any(m.training for m in teacher.modules())
    owner = torch.nn.ModuleDict({"teacher": teacher, "other": torch.nn.Linear(2, 2)})
    owner.train()
    assert owner["other"].training
    assert not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())

    out = teacher(images(2, 16))
    assert set(out) == {"logits"}
    assert out["logits"].shape == (2, 10) and out["logits"].dtype == torch.float32
    assert not out["logits"].requires_grad and out["logits"].grad_fn is None


def test_teacher_renormalises_with_its_own_statistics():
    torch.manual_seed(0)
    model, _ = create_model("resnet_micro_cnn", 10, 16)
    teacher = Teacher(model)
    assert teacher.prep.size is None  # a CNN takes any size, nothing is resized
    x = images(3, 16)
    with torch.no_grad():
        expected = model(normalise(x, IMAGENET_MEAN, IMAGENET_STD))
        wrong = model(normalise(x, (0.5,) * 3, (0.5,) * 3))
    got = teacher(x)["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_vit_teacher_resizes_to_its_own_size():
    torch.manual_seed(0)
    model, _ = create_model("vit_femto_patch4_16", 10, 32)
    teacher = Teacher(model)
    assert teacher.prep.size == 32
    x = images(2, 16)
    by_hand = normalise(resize_by_hand(x.float(), 32), (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(teacher.prep(x), by_hand, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected = model(by_hand)
    torch.testing.assert_close(teacher(x)["logits"], expected, rtol=1e-4, atol=1e-5)


def test_hand_resize_helper_is_exact_on_a_simple_case():
    # 2 -> 4 with half-pixel centres: [a, 0.75a + 0.25b, 0.25a + 0.75b, b]
    r = bilinear_matrix(2, 4)
    torch.testing.assert_close(r @ torch.tensor([0.0, 4.0], dtype=torch.float64),
                               torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64))


def test_distilled_teacher_gives_the_mean_of_its_heads():
    torch.manual_seed(0)
    model, _ = create_model("deit_femto_distilled_patch4_16", 10, 16)
    prepare_student(model)  # even a model set to return two heads is averaged as a teacher
    teacher = Teacher(model)
    x = images(2, 16)
    with torch.no_grad():
        feats = model.forward_features(normalise(x, (0.5,) * 3, (0.5,) * 3))  # its ViT twin's statistics
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(teacher(x)["logits"], expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- weights


def _saved_vit(tmp_path: Path, classes: int = 10) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(1)
    model, _ = create_model("vit_femto_patch4_16", classes, 16)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int = 16) -> None:
    x = InputPrep.for_model(a)(images(2, size, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_safetensors_weights_load(tmp_path):
    model, path = _saved_vit(tmp_path)
    torch.manual_seed(2)  # a different initialisation, so only the file can make them equal
    fresh, _ = create_model("vit_femto_patch4_16", 10, 16)
    assert not torch.equal(fresh.head.weight, model.head.weight)
    loaded, _ = create_model("vit_femto_patch4_16", 10, 16, weights=str(path))
    _same_outputs(model, loaded)


def test_safetensors_under_another_name_load(tmp_path):
    model, path = _saved_vit(tmp_path)
    renamed = path.rename(tmp_path / "student.bin")  # the format is read from the file, not its name
    loaded, _ = create_model("vit_femto_patch4_16", 10, 16, weights=str(renamed))
    _same_outputs(model, loaded)


def test_run_directory_resolves_to_its_weights(tmp_path):
    model, path = _saved_vit(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    path.rename(run / "model.safetensors")
    loaded, _ = create_model("vit_femto_patch4_16", 10, 16, weights=str(run))
    _same_outputs(model, loaded)


def test_run_directory_without_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no student.safetensors or model.safetensors"):
        create_model("vit_femto_patch4_16", 10, 16, weights=str(tmp_path))


@pytest.mark.parametrize("wrap", [None, "student", "state_dict", "model"])
def test_torch_checkpoints_load(tmp_path, wrap):
    model, _ = _saved_vit(tmp_path)
    state = model.state_dict()
    obj = state if wrap is None else {wrap: state, "epoch": 3, "metrics": [{"loss": 1.0}], "config": "{}"}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    loaded, _ = create_model("vit_femto_patch4_16", 10, 16, weights=str(path))
    _same_outputs(model, loaded)


class _Payload:
    """Unpickling this would create a file: what weights_only=True must refuse to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_torch_checkpoint_is_read_with_weights_only(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    with pytest.raises(UserError, match="cannot read weights"):
        read_state_dict(str(path))
    assert not marker.exists()


def test_weights_for_another_class_count_name_the_shape(tmp_path):
    _, path = _saved_vit(tmp_path, classes=10)
    with pytest.raises(UserError) as info:
        create_model("vit_femto_patch4_16", 5, 16, weights=str(path))
    msg = str(info.value).replace(str(path), "FILE")
    assert "FILE" in msg and "head.weight" in msg and "\n" not in msg
    assert re.search(r"\b10\b", msg) and re.search(r"\b5\b", msg), msg  # both class counts are named


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    _, path = _saved_vit(tmp_path)
    with pytest.raises(UserError, match=r"do not fit model 'deit_femto_distilled_patch4_16'.*missing keys"):
        create_model("deit_femto_distilled_patch4_16", 10, 16, weights=str(path))


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        create_model("vit_femto_patch4_16", 10, 16, weights=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_garbage_weights_file_is_a_user_error(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a model \x00\x01\x02" * 10)
    with pytest.raises(UserError, match="cannot read weights"):
        create_model("vit_femto_patch4_16", 10, 16, weights=str(path))


def test_torch_file_without_a_state_dict_is_a_user_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match="no state dict of tensors"):
        read_state_dict(str(path))


# ---------------------------------------------------------------- timm alone


@pytest.mark.parametrize("name", ["vit_femto_patch4_16", "deit_femto_distilled_patch4_16"])
def test_student_file_is_rebuilt_by_timm_alone(tmp_path, name):
    torch.manual_seed(3)
    student, spec = create_model(name, 10, 16, {"depth": 2})
    prepare_student(student)
    path = tmp_path / "student.safetensors"
    # the metadata the engine writes (engine/run.py)
    write_safetensors(path, student.state_dict(), {
        "timm_name": spec["name"], "timm_kwargs": json.dumps(spec["kwargs"]),
        "small_stem": json.dumps(spec["small_stem"]), "vitdistill_model": name,
    })
    assert not list(tmp_path.glob(".*.tmp"))

    # from here on: timm and safetensors only
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    rebuilt = timm.create_model(meta["timm_name"], **json.loads(meta["timm_kwargs"]))
    rebuilt.load_state_dict(load_file(str(path)))

    x = (images(4, 16, seed=9).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), student.eval()(x), rtol=0, atol=0)
    assert rebuilt(x).shape == (4, 10)


def test_patches_that_do_not_divide_the_image_are_noted_once(capsys: pytest.CaptureFixture) -> None:
    from vitdistill.models import factory

    factory._NOTED_CROPS.discard(("vit_femto_patch4_16", 18, 4))
    create_model("vit_femto_patch4_16", 10, 18)
    create_model("vit_femto_patch4_16", 10, 18)
    create_model("vit_femto_patch4_16", 10, 16)
    err = capsys.readouterr().err
    assert err.count("note: 'vit_femto_patch4_16' cuts 18-px images into 4-px patches, so the last 2 px") == 1
    assert err.count("note:") == 1


def test_load_run_model_rebuilds_a_cnn_at_its_training_resolution(teacher_run: Path) -> None:
    """A CNN takes no img_size, so the resolution lives only in the weights' overlay; without it the
    rebuilt teacher said 224 px and a 0.95 crop, and InputPrep resized the digits to 224."""
    from conftest import load_run_model_top1

    from vitdistill.evaluation import load_run_model

    cfg = timm.data.resolve_data_config({}, model=load_run_model(teacher_run))
    assert cfg["input_size"] == (3, 16, 16) and cfg["crop_pct"] == 1.0
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert load_run_model_top1(teacher_run) == pytest.approx(summary["student_top1"], abs=1e-6)
