"""``co-advise`` and its involution teacher: the involution op and the loss against hand computations,
the multi-token student, gradients, and train -> distill (two teachers) -> resume -> eval from the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from conftest import TINY, check_distill_and_resume, load_run_model_top1, run_cli_fast
from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.methods.coadvise import MultiTokenViT
from vitdistill.models import create_model, student_outputs
from vitdistill.models.involution import Involution
from vitdistill.models.taps import LayerInfo, ModelInfo, describe

# ---------------------------------------------------------------- involution


@pytest.mark.parametrize("grad", [False, True])  # the shifted-window path and the unfold path
@pytest.mark.parametrize("stride", [1, 2])
def test_involution_is_a_per_pixel_kernel_shared_within_a_channel_group(stride: int, grad: bool) -> None:
    # Y[k,i,j] = sum_{u,v} H[g(k), u, v, i, j] * X[k, s*i+u-1, s*j+v-1], H generated from (pooled) X
    torch.manual_seed(0)
    inv = Involution(channels=4, kernel_size=3, stride=stride, group_channels=2).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.set_grad_enabled(grad):
        y = inv(x).detach()
    with torch.no_grad():
        kernel = inv.span(inv.reduce(inv.pool(x)))[0]  # [K*K*G, h, w], the generated kernels
    h, w = kernel.shape[-2:]
    assert y.shape == (1, 4, h, w) and h == math.ceil(5 / stride)
    for k in range(4):
        g = k // 2
        for i in range(h):
            for j in range(w):
                total = 0.0
                for u in range(3):
                    for v in range(3):
                        r, c = stride * i + u - 1, stride * j + v - 1
                        if 0 <= r < 5 and 0 <= c < 5:
                            total += float(kernel[g * 9 + u * 3 + v, i, j]) * float(x[0, k, r, c])
                assert float(y[0, k, i, j]) == pytest.approx(total, rel=1e-4, abs=1e-5)


def test_rednet_forward_is_the_same_with_and_without_autograd() -> None:
    # a teacher's no-grad forward (shifted windows) must give the logits its training (unfold) saw
    torch.manual_seed(0)
    model = timm.create_model("rednet_micro_inv", num_classes=10).eval()
    x = torch.randn(3, 3, 17, 17)  # odd size: the strided windows must end where unfold's do
    with torch.no_grad():
        fast = model(x)
    assert torch.allclose(model(x).detach(), fast, rtol=1e-4, atol=1e-5)


def test_rednet_micro_is_a_registered_timm_model_with_feature_info() -> None:
    model = timm.create_model("rednet_micro_inv", num_classes=10)
    assert "rednet_micro_inv" in timm.list_models("rednet*")
    assert 2e5 < sum(p.numel() for p in model.parameters()) < 4e5
    assert model.num_classes == 10 and model.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert [f["module"] for f in model.feature_info] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert any(isinstance(m, Involution) for m in model.modules())
    for size in (16, 32):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    model, spec = create_model("rednet_micro_inv", 10, 16)  # img_size is dropped, as for timm's CNNs
    assert spec["name"] == "rednet_micro_inv"
    info = describe(model, "inv", (3, 16, 16), 10)
    assert info.kind == "cnn" and [layer.shape[1:] for layer in info.layers] == [(16, 16), (8, 8), (4, 4), (2, 2)]


# ---------------------------------------------------------------- the loss by hand

Z = [[1.0, 2.0, 0.5], [0.3, -1.2, 2.2]]  # class head
D0 = [[0.2, -0.7, 1.1], [1.4, 0.9, -0.3]]  # CNN token's head
D1 = [[-0.5, 0.4, 0.0], [2.0, -1.0, 0.6]]  # involution token's head
T0 = [[2.0, 0.1, -0.4], [0.0, 1.5, 0.7]]
T1 = [[-1.0, 0.3, 1.8], [0.9, 0.2, -0.6]]
Y = [1, 2]


def log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    lse = math.log(sum(math.exp(v / tau) for v in row))
    return [v / tau - lse for v in row]


def hand_ce(z: list, y: list) -> float:
    return sum(-log_softmax(row)[c] for row, c in zip(z, y)) / len(z)


def hand_kl(z: list, zt: list, tau: float) -> float:
    total = 0.0
    for s, t in zip(z, zt):
        ls, lt = log_softmax(s, tau), log_softmax(t, tau)
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return tau * tau * total / len(z)


def t_(rows: list, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, requires_grad=grad)


def heads(grad: bool = False) -> tuple[dict, dict]:
    student = {"logits": t_(Z, grad), "dist_logits": t_(D0, grad), "dist_logits.1": t_(D1, grad)}
    teacher = {"logits": t_(T0, grad), "t0.logits": t_(T0, grad), "t1.logits": t_(T1, grad)}
    return student, teacher


@pytest.mark.parametrize("tau,w", [(1.0, 1.0), (3.0, 0.5)])
def test_soft_loss_is_ce_plus_one_kl_per_teacher_token(tau: float, w: float) -> None:
    method = build_method({"name": "co-advise", "tau": tau, "kd_weight": w})
    out = method(*heads(), torch.tensor(Y))
    kd0, kd1 = hand_kl(D0, T0, tau), hand_kl(D1, T1, tau)  # each token against its own teacher
    assert float(out["kd0"]) == pytest.approx(kd0, rel=1e-5) and float(out["kd1"]) == pytest.approx(kd1, rel=1e-5)
    assert float(out["ce"]) == pytest.approx(hand_ce(Z, Y), rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(hand_ce(Z, Y) + w * (kd0 + kd1), rel=1e-5)


def test_hard_loss_uses_each_teachers_argmax() -> None:
    method = build_method({"name": "co-advise", "kd": "hard"})
    out = method(*heads(), torch.tensor(Y))
    y0 = [max(range(3), key=r.__getitem__) for r in T0]
    y1 = [max(range(3), key=r.__getitem__) for r in T1]
    assert float(out["loss"].detach()) == pytest.approx(hand_ce(Z, Y) + hand_ce(D0, y0) + hand_ce(D1, y1), rel=1e-5)


def test_defaults_follow_the_official_code() -> None:
    method = build_method({"name": "co-advise"})
    knobs = (method.teachers, method.kd, method.tau, method.kd_weight, method.teachers_needed)
    assert knobs == (2, "soft", 1.0, 1.0, 2)
    for knobs in (dict(teachers=1), dict(kd="medium"), dict(tau=0.0)):
        with pytest.raises(UserError):
            build_method({"name": "co-advise", **knobs})


# ---------------------------------------------------------------- the multi-token student


@pytest.mark.parametrize("name", ["vit_femto_patch4_16", "deit_femto_distilled_patch4_16"])
@pytest.mark.parametrize("teachers", [2, 3])
def test_adapted_student_has_a_token_and_head_per_teacher(name: str, teachers: int) -> None:
    torch.manual_seed(0)
    vit, _ = create_model(name, 10, 16)
    student = build_method({"name": "co-advise", "teachers": teachers}).adapt_student(vit, name)
    assert isinstance(student, MultiTokenViT) and student.patch_embed is vit.patch_embed
    assert student.num_prefix_tokens == 1 + teachers and student.pos_embed.shape == (1, 1 + teachers + 16, 64)
    assert {"dist_tokens", "pos_embed", "cls_token"} <= student.no_weight_decay()
    x = torch.randn(3, 3, 16, 16)
    student.train()
    outs = student_outputs(student, x)
    assert list(outs) == ["logits", "dist_logits", *(f"dist_logits.{i}" for i in range(1, teachers))]
    student.eval()
    with torch.no_grad():
        mean = student(x)
    assert torch.allclose(mean, torch.stack(list(outs.values())).mean(0), atol=1e-6)
    info = describe(student, name, (3, 16, 16), 10)
    assert info.kind == "vit" and info.num_prefix_tokens == 1 + teachers


def test_a_cnn_student_is_refused_in_one_line() -> None:
    cnn, _ = create_model("resnet_micro_cnn", 10, 16)
    with pytest.raises(UserError, match="timm ViT"):
        build_method({"name": "co-advise"}).adapt_student(cnn, "resnet_micro_cnn")


def test_gradients_reach_every_token_and_head_never_the_teachers() -> None:
    torch.manual_seed(0)
    method = build_method({"name": "co-advise"})
    student = method.adapt_student(create_model("vit_femto_patch4_16", 3, 16)[0], "vit_femto_patch4_16")
    student.train()
    _, teacher = heads(grad=True)
    out = method(student_outputs(student, torch.randn(2, 3, 16, 16)), teacher, torch.tensor(Y))
    out["loss"].backward()
    for p in (student.dist_tokens, student.cls_token, student.pos_embed, student.heads_dist[0].weight,
              student.heads_dist[1].weight, student.head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(t.grad is None for t in teacher.values())


def test_setup_refuses_a_teacher_count_other_than_the_knob() -> None:
    s = ModelInfo("s", "vit", [LayerInfo("blocks.0", (19, 64), heads=2)], num_prefix_tokens=3)
    t = ModelInfo("t", "cnn", [LayerInfo("layer1", (8, 4, 4))])
    build_method({"name": "co-advise"}).setup(s, [t, t])
    with pytest.raises(UserError, match="method.teachers=3"):
        build_method({"name": "co-advise"}).setup(s, [t, t, t])


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def inv_teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "inv-teacher"
    r = run_cli_fast("train", "--model", "rednet_micro_inv", "--epochs", "1", "--out", str(out), "--lr", "3e-3", *TINY)
    assert r.returncode == 0, r.stderr
    return out


def two_teachers(cnn: Path, inv: Path, *extra: str) -> list[str]:
    return ["distill", "--method", "co-advise", "--student", "vit_femto_patch4_16",
            "--teacher", "resnet_micro_cnn,rednet_micro_inv", "--teacher-weights", f"{cnn},{inv}",
            "--epochs", "2", *TINY, *extra]


def test_cnn_and_involution_teachers_distill_resume_and_eval(teacher_run: Path, inv_teacher_run: Path,
                                                            tmp_path: Path) -> None:
    assert (inv_teacher_run / "model.safetensors").is_file()
    summary = check_distill_and_resume(tmp_path, two_teachers(teacher_run, inv_teacher_run))
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_kd0", "loss_kd1"} <= rows[0].keys()
    # each teacher's own test top-1, the same figure its training run reported
    own = [json.loads((d / "summary.json").read_text()) for d in (teacher_run, inv_teacher_run)]
    assert [(t["model"], t["weights"]) for t in summary["teachers"]] == [
        ("resnet_micro_cnn", str(teacher_run)), ("rednet_micro_inv", str(inv_teacher_run))]
    assert [t["top1"] for t in summary["teachers"]] == pytest.approx([o["student_top1"] for o in own], abs=1e-6)
    assert summary["teacher_top1"] == summary["teachers"][0]["top1"]
    assert [t["params"] for t in summary["teachers"]] == [o["params"] for o in own]
    # eval rebuilds the three-headed student through adapt_student and scores what the run scored
    r = run_cli_fast("eval", "--student", str(tmp_path / "straight"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert (ev["top1"], ev["top5"]) == (summary["student_top1"], rows[-1]["test_top5"])
    assert load_run_model_top1(tmp_path / "straight") == pytest.approx(summary["student_top1"], abs=1e-6)


def test_a_teacher_count_other_than_the_knob_is_one_line(teacher_run: Path, inv_teacher_run: Path,
                                                         tmp_path: Path) -> None:
    r = run_cli_fast(*two_teachers(teacher_run, inv_teacher_run, "--set", "method.teachers=3", "--out",
                              str(tmp_path / "bad")))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "method.teachers" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in ("img_s", "epoch_s")}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_teacher_caches_replay_the_live_run(teacher_run: Path, inv_teacher_run: Path, tmp_path: Path) -> None:
    caches = f"{tmp_path / 'cnn-cache'},{tmp_path / 'inv-cache'}"
    r = run_cli_fast("cache-teacher", "--teacher", "resnet_micro_cnn,rednet_micro_inv", "--teacher-weights",
                     f"{teacher_run},{inv_teacher_run}", "--epochs", "2", "--cache", caches,
                     "--set", "cache.value_dtype=float32", *TINY)
    assert r.returncode == 0, r.stderr
    assert [c["dir"] for c in json.loads(r.stdout.strip().splitlines()[-1])["caches"]] == caches.split(",")
    assert json.loads((tmp_path / "inv-cache" / "header.json").read_text())["teacher"] == "rednet_micro_inv"
    hard = ["--set", "method.kd=hard"]  # the argmax survives the stored log-probs exactly: identical runs
    for name, extra in (("live", []), ("cached", ["--teacher-cache", caches])):
        r = run_cli_fast(*two_teachers(teacher_run, inv_teacher_run, *hard, *extra, "--out", str(tmp_path / name)))
        assert r.returncode == 0, r.stderr
    assert _rows(tmp_path / "cached") == _rows(tmp_path / "live")
    live, cached = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("live", "cached"))
    untimed = [[{k: v for k, v in t.items() if k != "latency_ms_b1"} for t in s["teachers"]] for s in (live, cached)]
    assert cached["teacher_cache"] == caches and untimed[0] == untimed[1]
    # caches alone, no teacher named: the same run, each teacher named by its cache's header
    r = run_cli_fast("distill", "--method", "co-advise", "--student", "vit_femto_patch4_16", "--teacher-cache", caches,
                     "--epochs", "2", *TINY, *hard, "--out", str(tmp_path / "bare"))
    assert r.returncode == 0, r.stderr
    assert _rows(tmp_path / "bare") == _rows(tmp_path / "live")
    bare = json.loads((tmp_path / "bare" / "summary.json").read_text())
    assert [(t["model"], t["top1"]) for t in bare["teachers"]] == [(t["model"], t["top1"]) for t in live["teachers"]]
    assert bare["teacher"] == live["teacher"] == "resnet_micro_cnn,rednet_micro_inv"


@pytest.mark.parametrize("caches, says", [
    ("{cnn}", "2 teachers but 1 teacher cache;"),                                # one cache for two teachers
    ("{inv},{cnn}", "was made for teacher='rednet_micro_inv', this run has 'resnet_micro_cnn'"),  # wrong order
])
def test_teacher_caches_that_do_not_fit_are_one_line(teacher_run: Path, inv_teacher_run: Path, tmp_path: Path,
                                                     caches: str, says: str) -> None:
    for name, model, weights in (("cnn", "resnet_micro_cnn", teacher_run),
                                 ("inv", "rednet_micro_inv", inv_teacher_run)):
        r = run_cli_fast("cache-teacher", "--teacher", model, "--teacher-weights", str(weights), "--epochs", "2",
                         "--cache", str(tmp_path / name), *TINY)
        assert r.returncode == 0, r.stderr
    given = caches.format(cnn=tmp_path / "cnn", inv=tmp_path / "inv")
    r = run_cli_fast(*two_teachers(teacher_run, inv_teacher_run, "--teacher-cache", given, "--out", str(tmp_path / "x")))
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    # one cache alone cannot feed a two-teacher method
    r = run_cli_fast("distill", "--method", "co-advise", "--student", "vit_femto_patch4_16", "--teacher-cache",
                     str(tmp_path / "cnn"), "--epochs", "2", *TINY, "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "needs 2 teachers and got 1 teacher cache" in r.stderr, r.stderr
