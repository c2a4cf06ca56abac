"""Data-free distillation (DeepInversion): the objective against its equation, the synthesis, the
``synthetic:`` data source, resuming, and the bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, run_cli_fast
from vitdistill.config import SynthConfig
from vitdistill.data import load_data
from vitdistill.datafree import BatchNormStatistics, deepinversion_loss, synthesize_batch
from vitdistill.models import Teacher, create_model

SMALL = ["--images", "40", "--batch-size", "20", "--iters", "40", "--set", "synth.grey=true", "--threads", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNN teacher that knows the digits (about 93 % top-1 after 4 epochs on all 1,438), so that what
    it recognises in a synthetic image means something."""
    out = tmp_path_factory.mktemp("datafree") / "teacher"
    r = run_cli("train", "--data", "digits", "--model", "resnet_micro_cnn", "--epochs", "4", "--batch-size", "64",
                "--lr", "3e-3", "--set", "train.warmup_epochs=0.5", "--threads", "1", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _tiny_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 3))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return net.eval()


def test_loss_matches_the_papers_equation() -> None:
    """CE + a_tv R_tv + a_l2 R_l2 + a_f (s ||mu_1 - m_1|| + ||var_1 - v_1|| ... + sum over later layers)."""
    net = _tiny_bn_net()
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    s = SynthConfig(bn_weight=0.3, first_bn_scale=4.0, tv_weight=0.02, l2_weight=0.01)
    stats = BatchNormStatistics(net)
    got = deepinversion_loss(net(x), y, x, stats.pop(), s)

    xn = x.numpy().astype(np.float64)
    with torch.no_grad():
        inputs = [net[0](x), net[3](net[2](net[1](net[0](x))))]  # what each BatchNorm layer receives
        logits = net(x).double().numpy()
    terms = []
    for inp, bn in zip(inputs, (net[1], net[4])):
        a = inp.double().numpy()
        mean = a.mean(axis=(0, 2, 3))
        var = ((a - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))  # biased, as BatchNorm normalises
        terms.append(math.sqrt(((mean - bn.running_mean.double().numpy()) ** 2).sum())
                     + math.sqrt(((var - bn.running_var.double().numpy()) ** 2).sum()))
    feature = 4.0 * terms[0] + terms[1]
    ce = float(np.mean([-(logits[i, y[i]] - np.log(np.exp(logits[i]).sum())) for i in range(5)]))
    tv = float(((xn[..., 1:] - xn[..., :-1]) ** 2).mean() + ((xn[..., 1:, :] - xn[..., :-1, :]) ** 2).mean())
    l2 = float(np.mean([math.sqrt((xn[i] ** 2).sum()) for i in range(5)]))
    want = ce + 0.02 * tv + 0.01 * l2 + 0.3 * feature
    for name, value in {"ce": ce, "tv": tv, "l2": l2, "feature": feature, "loss": want}.items():
        assert float(got[name].detach()) == pytest.approx(value, rel=1e-5), name


def test_statistics_term_reaches_zero_at_the_running_statistics() -> None:
    """A batch whose BatchNorm input has exactly the stored mean and variance costs nothing there."""
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    z = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), unbiased=False, keepdim=True)
    x = (z * bn.running_var.double().sqrt().view(1, 3, 1, 1) + bn.running_mean.double().view(1, 3, 1, 1)).float()
    stats = BatchNormStatistics(bn)
    bn(x)
    (term,) = stats.pop()
    assert float(term) < 1e-5
    bn(x + 1.0)  # every channel mean off by one: ||(1, 1, 1)||_2
    assert float(stats.pop()[0]) == pytest.approx(math.sqrt(3), rel=1e-4)
    stats.remove()
    bn(x)
    assert stats.pop() == []


def test_synthesis_makes_images_the_teacher_recognises(digits_teacher: Path) -> None:
    model, _ = create_model("resnet_micro_cnn", 10, 16, None, False, str(digits_teacher))
    teacher = Teacher(model)
    stats = BatchNormStatistics(teacher.model)
    y = torch.arange(30) % 10
    s = SynthConfig(iters=80, grey=True)
    images, last = synthesize_batch(teacher, stats, y, 16, 3, s, hflip=False, seed=0, device=torch.device("cpu"))
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 16, 16)
    assert torch.equal(images[:, 0], images[:, 2])  # grey: one channel shown as RGB
    noise = (0.5 + 0.2 * torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    noise = (noise * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    stats.pop()
    logits = teacher(noise)["logits"]
    noise_feature = deepinversion_loss(logits, y, teacher.prep(noise.float()), stats.pop(), s)
    on_noise = float((logits.argmax(1) == y).float().mean())
    on_synth = float((teacher(images)["logits"].argmax(1) == y).float().mean())
    assert on_noise <= 0.3 < 0.7 <= on_synth
    assert last["feature"] < float(noise_feature["feature"]) / 2


def test_base_size_optimises_a_smooth_image(digits_teacher: Path) -> None:
    """``synth.base_size`` optimises fewer pixels and upsamples them: far smoother images."""
    model, _ = create_model("resnet_micro_cnn", 10, 16, None, False, str(digits_teacher))
    teacher = Teacher(model)
    stats = BatchNormStatistics(teacher.model)
    y = torch.arange(20) % 10

    def roughness(base: int | None) -> float:
        s = SynthConfig(iters=10, grey=True, base_size=base)
        images, _ = synthesize_batch(teacher, stats, y, 16, 3, s, hflip=False, seed=0, device=torch.device("cpu"))
        assert images.shape == (20, 3, 16, 16)
        x = images.float()
        return float((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())

    assert roughness(4) < roughness(None) / 2


def test_cli_synthesize_then_distill_on_real_test_digits(digits_teacher: Path, tmp_path: Path) -> None:
    synth = tmp_path / "synth"
    r = run_cli("synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights",
                str(digits_teacher), "--out", str(synth), *SMALL)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["images"] == 40 and summary["teacher_top1_on_synthetic"] >= 0.5
    assert {p.name for p in synth.iterdir()} == {"images.safetensors", "synth.json", "config.yaml", "preview.png",
                                                 "parts"}
    data = load_data(f"synthetic:{synth}")
    real = load_data("digits")
    assert len(data.train) == 40 and data.classes == real.classes and (data.pad, data.hflip) == (real.pad, real.hflip)
    assert torch.equal(data.test.images, real.test.images) and torch.equal(data.test.labels, real.test.labels)
    assert torch.bincount(data.train.labels).tolist() == [4] * 10
    assert load_data(f"synthetic:{synth}", img_size=24).train.images.shape[-1] == 24

    run = tmp_path / "student"
    r = run_cli_fast("distill", "--data", f"synthetic:{synth}", "--teacher", "resnet_micro_cnn", "--teacher-weights",
                str(digits_teacher), "--student", "vit_femto_patch4_16", "--method", "logit-kd", "--epochs", "1",
                "--batch-size", "20", "--threads", "1", "--no-progress", "--out", str(run))
    assert r.returncode == 0, r.stderr
    done = json.loads((run / "summary.json").read_text())
    assert done["data"] == f"synthetic:{synth}" and done["test_images"] == len(real.test)
    assert (run / "student.safetensors").is_file()


def test_interrupted_synthesis_continues_to_the_same_images(digits_teacher: Path, tmp_path: Path) -> None:
    args = ["synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(digits_teacher),
            *SMALL[:4], "--iters", "5", *SMALL[6:]]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert run_cli_fast(*args, "--out", str(straight)).returncode == 0
    assert run_cli_fast(*args, "--out", str(cut)).returncode == 0
    # as if stopped after the first batch: only its part is left
    (cut / "images.safetensors").unlink()
    (cut / "parts" / "batch-00001.safetensors").unlink()
    kept = (cut / "parts" / "batch-00000.safetensors").stat().st_mtime_ns
    assert run_cli_fast(*args, "--out", str(cut)).returncode == 0
    assert (cut / "parts" / "batch-00000.safetensors").stat().st_mtime_ns == kept
    assert torch.equal(load_data(f"synthetic:{cut}").train.images, load_data(f"synthetic:{straight}").train.images)

    # a part made with other settings is made again, never mixed in
    (cut / "images.safetensors").unlink()
    assert run_cli_fast(*args, "--out", str(cut), "--lr", "0.05").returncode == 0
    assert not torch.equal(load_data(f"synthetic:{cut}").train.images[:20],
                           load_data(f"synthetic:{straight}").train.images[:20])


def test_bad_inputs_end_in_one_line(digits_teacher: Path, tmp_path: Path) -> None:
    base = ["synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights",
            str(digits_teacher), *SMALL]

    def fails(*args: str, says: str) -> None:
        r = run_cli_fast(*args)
        assert r.returncode == 2, r
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    fails(*base, says="needs --out DIR")
    fails(*base, "--out", str(tmp_path / "few"), "--images", "5", says="at least one image per class")
    from safetensors.torch import save_file

    from vitdistill.models import create_model

    vit_weights = tmp_path / "vit.safetensors"  # any ViT's weights: it has no BatchNorm to invert
    save_file(create_model("vit_femto_patch4_16", 10, 16)[0].state_dict(), vit_weights)
    fails("synthesize", "--data", "digits", "--teacher", "vit_femto_patch4_16", "--teacher-weights", str(vit_weights),
          "--out", str(tmp_path / "vit"), *SMALL, says="no BatchNorm2d layer")
    fails("synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--out", str(tmp_path / "vit"),
          *SMALL, says="a random teacher teaches nothing")
    assert not (tmp_path / "vit").exists() and not (tmp_path / "few").exists()
    fails(*base, "--out", str(tmp_path / "x"), "--set", "synth.bn_wieght=1", says="did you mean 'bn_weight'")
    fails(*base, "--out", str(tmp_path / "x"), "--set", "synth.base_size=17", says="synth.base_size must lie")
    # a student path that is not there is named as such, not as a missing --student
    fails(*base, "--out", str(tmp_path / "x"), "--set", "synth.competition_weight=0.2", "--student",
          str(tmp_path / "no-run"), says=f"--student '{tmp_path / 'no-run'}' does not exist; give a run directory or "
          "a model name with --student-weights")
    assert not (tmp_path / "x").exists()

    fails("train", "--data", f"synthetic:{tmp_path / 'nothing'}", "--model", "vit_femto_patch4_16",
          "--out", str(tmp_path / "r"), says="does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails("train", "--data", f"synthetic:{empty}", "--model", "vit_femto_patch4_16", "--out", str(tmp_path / "r"),
          says="make one with `vitdistill synthesize")
    (empty / "images.safetensors").write_bytes(b"\x00" * 64)
    fails("train", "--data", f"synthetic:{empty}", "--model", "vit_femto_patch4_16", "--out", str(tmp_path / "r"),
          says="not a readable synthetic data set")
    assert not (tmp_path / "r").exists()

    made = tmp_path / "made"
    assert run_cli_fast(*base, "--out", str(made), "--iters", "1").returncode == 0
    fails(*base, "--out", str(made), says="already holds a synthetic data set")
    fails(*base, "--out", str(tmp_path / "again"), "--data", f"synthetic:{made}", says="not a synthetic one")
    fails(*base, "--out", str(made / "images.safetensors"), says="is a file")
    fails(*base, "--out", str(tmp_path / "two"), "--teacher", "resnet_micro_cnn,rednet_micro_inv",
          says="inverts one teacher")


def test_settings_a_range_check_missed_and_folders_of_the_other_kind(digits_teacher: Path, tmp_path: Path) -> None:
    """NaN and inf knobs (NaN passed `< 0` and made black images), a jitter as large as the image,
    and a synthetic set and a run folder written into each other are one-line errors."""
    base = ["synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights",
            str(digits_teacher), *SMALL[:4], "--iters", "2", *SMALL[6:]]

    def fails(*args: str, says: str) -> None:
        r = run_cli_fast(*args)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    out = tmp_path / "s"
    for setting, says in (("synth.lr=.nan", "'synth.lr' must be a number > 0 and below 3.4e38"),
                          ("synth.lr=.inf", "'synth.lr' must be a number > 0 and below 3.4e38"),
                          ("synth.lr=1e39", "float32's largest), got 1e+39"),
                          ("synth.bn_weight=.nan", "'synth.bn_weight' must be a number >= 0"),
                          ("synth.jitter=16", "keep it below the image size (16), got 16")):
        fails(*base, "--out", str(out), "--set", setting, says=says)
    assert not out.exists()
    # a finite weight whose loss overflows: before, exit 0 with black images and NaN in synth.json
    fails(*base, "--out", str(out), "--set", "synth.tv_weight=1e308", says="the synthesis loss (loss")
    assert not (out / "synth.json").exists() and not (out / "images.safetensors").exists()
    assert not list(out.glob("parts/*.safetensors"))

    run = tmp_path / "run"
    assert run_cli_fast("train", "--model", "vit_femto_patch4_16", "--epochs", "1", "--set", "data.train_limit=64",
                        "--set", "data.test_limit=32", "--threads", "1", "--no-progress", "--out", str(run)).returncode == 0
    before = (run / "config.yaml").read_bytes()
    fails(*base, "--out", str(run), says="holds a training run")
    assert run_cli_fast(*base, "--out", str(out)).returncode == 0
    fails("train", "--data", f"synthetic:{out}", "--model", "vit_femto_patch4_16", "--threads", "1", "--no-progress",
          "--out", str(out), says="holds a synthetic data set")
    assert (run / "config.yaml").read_bytes() == before and "synth:" in (out / "config.yaml").read_text()

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(out / "images.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    (tmp_path / "bad").mkdir()
    save_file(tensors, str(tmp_path / "bad" / "images.safetensors"), {**meta, "pad": "x"})
    fails("train", "--data", f"synthetic:{tmp_path / 'bad'}", "--model", "vit_femto_patch4_16",
          "--out", str(tmp_path / "r"), says="has damaged metadata (img_size='', pad='x')")


def test_flips_and_the_last_batch_shape_what_is_made(digits_teacher: Path, tmp_path: Path) -> None:
    """Parts made without flips are not reused with them; a last batch of one image joins the one
    before (one image has no batch statistics); wall_s sums the parts, also over a resume."""
    args = ["synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights",
            str(digits_teacher), "--images", "21", "--batch-size", "10", "--iters", "3", *SMALL[6:]]
    out = tmp_path / "s"
    summary = json.loads(run_cli_fast(*args, "--out", str(out)).stdout)
    parts = sorted((out / "parts").iterdir())
    assert len(parts) == 2 and summary["images"] == 21
    from safetensors import safe_open

    with safe_open(str(parts[-1]), framework="pt") as f:
        assert f.get_tensor("labels").shape[0] == 11
        took = float(f.metadata()["seconds"])
    (out / "images.safetensors").unlink()
    stamps = [p.stat().st_mtime_ns for p in parts]
    again = json.loads(run_cli_fast(*args, "--out", str(out)).stdout)
    assert [p.stat().st_mtime_ns for p in parts] == stamps  # reused, and their time still counted
    assert again["wall_s"] == summary["wall_s"] and summary["wall_s"] >= round(took, 1)
    (out / "images.safetensors").unlink()
    assert run_cli_fast(*args, "--out", str(out), "--set", "data.hflip=true").returncode == 0
    assert all(p.stat().st_mtime_ns != s for p, s in zip(parts, stamps))  # made again, with flips


def test_an_interrupted_synthesis_says_to_rerun(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                tmp_path: Path) -> None:
    """synthesize has no --resume: the message says what does continue it."""
    import vitdistill.datafree as datafree
    from vitdistill.cli import main

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(datafree, "synthesize", stop)
    assert main(["synthesize", "--out", str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert "rerun the same command" in err and "--resume" not in err


def test_competition_is_one_minus_jensen_shannon_by_hand() -> None:
    """Adaptive DeepInversion's eq. 8 at temperature tau, against numpy."""
    from vitdistill.datafree import competition

    zt = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    zs = torch.tensor([[0.0, 1.5, 0.2], [0.0, 1.0, 0.0]], dtype=torch.float64)
    tau = 3.0

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z / tau - (z / tau).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(zt.numpy()), softmax(zs.numpy())
    m = (p + q) / 2
    js = 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)
    assert float(competition(zt, zs, tau)) == pytest.approx(1 - js.mean(), abs=1e-6)
    assert float(competition(zt, zt, tau)) == pytest.approx(1.0, abs=1e-6)  # agreement: nothing to gain
    far = torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]])
    assert float(competition(*far, 1.0)) == pytest.approx(1 - math.log(2), abs=1e-4)  # JS's bound, ln 2


def test_adaptive_deepinversion_competes_with_a_trained_student(digits_teacher: Path, tmp_path: Path) -> None:
    """With a trained student the competition term is logged and changes the images; without one
    it is a one-line error."""
    student = tmp_path / "student"
    assert run_cli_fast("train", "--data", "digits", "--model", "vit_femto_patch4_16", "--epochs", "1",
                        "--set", "data.train_limit=256", "--set", "data.test_limit=64", "--threads", "1",
                        "--no-progress", "--out", str(student)).returncode == 0
    args = ["synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights",
            str(digits_teacher), *SMALL[:4], "--iters", "5", *SMALL[6:]]
    plain = json.loads(run_cli_fast(*args, "--out", str(tmp_path / "plain")).stdout)
    r = run_cli_fast(*args, "--out", str(tmp_path / "adi"), "--student", str(student), "--set",
                     "synth.competition_weight=0.2")
    assert r.returncode == 0, r.stderr
    adi = json.loads(r.stdout)
    assert "compete" in adi["last_batch_loss"] and "compete" not in plain["last_batch_loss"]
    assert 1 - math.log(2) <= adi["last_batch_loss"]["compete"] <= 1
    assert 0 <= adi["student_top1_on_synthetic"] <= 1
    assert not torch.equal(load_data(f"synthetic:{tmp_path / 'adi'}").train.images,
                           load_data(f"synthetic:{tmp_path / 'plain'}").train.images)
    r = run_cli_fast(*args, "--out", str(tmp_path / "none"), "--set", "synth.competition_weight=0.2")
    assert r.returncode == 2 and "competes with a trained student" in r.stderr and not (tmp_path / "none").exists()


def test_several_folders_pool_their_images(digits_teacher: Path, tmp_path: Path) -> None:
    """``synthetic:A,B`` trains on both sets' images, in order, tested on the one real split; folders
    made for other data, with the same settings and seed, or named twice are one-line errors."""
    base = ["synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights",
            str(digits_teacher), *SMALL[:4], "--iters", "2", *SMALL[6:]]
    a, b, same, small = (tmp_path / n for n in ("a", "b", "same", "small"))
    assert run_cli_fast(*base, "--out", str(a)).returncode == 0
    assert run_cli_fast(*base, "--out", str(b), "--seed", "1").returncode == 0
    one, two = load_data(f"synthetic:{a}"), load_data(f"synthetic:{b}")
    pooled = load_data(f"synthetic:{a},{b}")
    assert torch.equal(pooled.train.images, torch.cat([one.train.images, two.train.images]))
    assert torch.equal(pooled.train.labels, torch.cat([one.train.labels, two.train.labels]))
    assert torch.equal(pooled.test.images, one.test.images) and pooled.classes == one.classes
    assert len({one.fingerprint, two.fingerprint, pooled.fingerprint, load_data(f"synthetic:{b},{a}").fingerprint}) == 4

    run = tmp_path / "student"
    r = run_cli_fast("train", "--data", f"synthetic:{a}, {b}", "--model", "vit_femto_patch4_16", "--epochs", "1",
                     "--batch-size", "20", "--threads", "1", "--no-progress", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    assert run_cli_fast(*base, "--out", str(same)).returncode == 0
    assert run_cli_fast(*base, "--out", str(small), "--seed", "2", "--set", "data.img_size=12").returncode == 0
    # the digits' own 16 px, given or not, is one size
    native = tmp_path / "native"
    assert run_cli_fast(*base, "--out", str(native), "--seed", "3", "--set", "data.img_size=16").returncode == 0
    assert len(load_data(f"synthetic:{a},{native}").train) == 80
    for spec, says in ((f"{a},{same}", "same settings and seed"), (f"{a},{small}", "pool only sets made at the same size"),
                       (f"{a},{a}", "names a folder twice"), (f"{a},", "empty folder name"),
                       (f"{a},{tmp_path / 'none'}", "does not exist")):
        r = run_cli_fast("train", "--data", f"synthetic:{spec}", "--model", "vit_femto_patch4_16", "--threads", "1",
                         "--no-progress", "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (spec, r.stderr)
    assert not (tmp_path / "bad").exists()
