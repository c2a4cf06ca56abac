"""Bad input found by an audit of every command: each ends in one line, exit code 2, no traceback
and nothing left behind (tests/test_cli.py and each feature's tests hold the earlier cases)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli, run_cli_fast, run_cli_here
from vitdistill.errors import UserError


def _fails(*args: str, says: str) -> None:
    r = run_cli_fast(*args)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "vit_femto_patch4_16", "--epochs", "1", *TINY, "--out", str(out), *extra]


@pytest.mark.parametrize("setting, says", [
    ("train.epochs=0", "'train.epochs' must be a number >= 1, got 0"),
    ("train.batch_size=-4", "'train.batch_size' must be a number >= 1"),
    ("train.lr=-1", "'train.lr' must be a number > 0"),
    ("train.lr=.nan", "'train.lr' must be a number > 0"),
    ("train.lr=1e39", "'train.lr' must be a number > 0 and below 3.4e38"),
    ("train.min_lr=-1e-5", "'train.min_lr' must be a number >= 0"),
    ("train.weight_decay=-0.1", "'train.weight_decay' must be a number >= 0"),
    ("train.warmup_epochs=-1", "'train.warmup_epochs' must be a number >= 0"),
    ("train.clip_grad=0", "'train.clip_grad' must be a number > 0"),
    ("train.label_smoothing=2", "'train.label_smoothing' must be a number in [0, 1)"),
    ("train.eval_batch_size=0", "'train.eval_batch_size' must be a number >= 1"),
    ("train.threads=-3", "'train.threads' must be a number from 1 to 1024"),
    ("train.stop_after=-1", "'train.stop_after' must be a number >= 1"),
    ("train.seed=-2", "'train.seed' must be a whole number from 0 to 2**63 - 1"),
    ("train.seed=99999999999999999999", "'train.seed' must be a whole number from 0 to 2**63 - 1"),
    ("data.pad=-3", "'data.pad' must be a number >= 0"),
    ("data.test_limit=-5", "'data.test_limit' must be a number >= 1"),
    ("data.train_limit=0", "'data.train_limit' must be a number >= 1"),
    ("train.min_lr=1", "train.min_lr 1 is above train.lr 0.001; the schedule decays from lr down to min_lr"),
    ("train.amp=fp16", "train.amp must be one of auto, bf16, off, not 'fp16' (did you mean 'bf16'?)"),
    # counts torch cannot hold: a C-int overflow, or the thread pool's mmap failure, in a traceback
    ("train.threads=100000", "'train.threads' must be a number from 1 to 1024"),
    ("train.batch_size=99999999999999999999", "'train.batch_size' must be below 2**31"),
    ("train.epochs=3000000000", "'train.epochs' must be below 2**31"),
    # model overrides timm takes and training fails on: a head of 5 in the first loss, a
    # drop_path_rate of 5 in the first forward
    ("model.student_kwargs.num_classes=5", "num_classes=5 in model.*_kwargs but the data has 10 classes"),
    ("model.student_kwargs.drop_path_rate=5", "drop_path_rate=5 in model.*_kwargs; a drop rate is a number in [0, 1]"),
    ("model.student_kwargs.attn_drop_rate=-0.1", "attn_drop_rate=-0.1 in model.*_kwargs"),
    # timm drops None kwargs, so a misspelt key set to null trained the default model with exit 0
    ("model.student_kwargs={nosuch: null}", "nosuch=null in model.*_kwargs, which timm ignores"),
    # a bare path is not an unknown source name (it was lowercased and listed beside the names)
    ("data.source=/tmp/No/Such", "data source '/tmp/No/Such' is a path without its kind; write "
                                 "imagefolder:/tmp/No/Such"),
])
def test_out_of_range_settings_are_refused_before_a_run_folder_exists(tmp_path: Path, setting: str, says: str) -> None:
    _fails(*_train(tmp_path / "run", "--set", setting), says=says)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, says", [
    (["--device", "meta"], "device 'meta' is not supported; use auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--set", "data.img_size=3"], "'vit_femto_patch4_16' cuts 4-px patches but the images are 3 px"),
])
def test_runs_the_machine_or_model_cannot_do_are_refused_before_a_run_folder(tmp_path: Path, extra: list[str],
                                                                            says: str) -> None:
    _fails(*_train(tmp_path / "run", *extra), says=says)
    assert not (tmp_path / "run").exists()


def test_an_out_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    _fails(*_train(Path("/proc/vitdistill-test")), says="cannot write into --out '/proc/vitdistill-test'")
    _fails("profile", "--model", "vit_femto_patch4_16", "--img-size", "2", says="--img-size")


def test_argparse_errors_are_one_line() -> None:
    for args, says in ((["train", "--epochs", "abc"], "argument --epochs: invalid int value: 'abc'; see `vitdistill train --help`"),
                       (["methods", "extra"], "unrecognized arguments: extra"),
                       (["export"], "the following arguments are required: --student, --out")):
        r = run_cli(*args)  # argparse exits the process: a subprocess shows what a shell sees
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {says}" if says.startswith("argument")
                                                                       else r.stderr.strip()], r.stderr
        assert says in r.stderr


def test_config_files_that_are_not_named_text(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("train: {3: 4}\n")
    _fails(*_train(tmp_path / "a", "--config", str(numbers)), says="config key 'train.3' is not a name")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _fails(*_train(tmp_path / "a", "--config", str(binary)), says="is not UTF-8 text")


def test_an_out_below_a_file_is_named(teacher_run: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    _fails(*_train(afile), says=f"--out '{afile}': '{afile}' is a file, not a folder")
    _fails(*_train(afile / "sub"), says=f"'{afile}' is a file, not a folder")
    _fails("demo", "--out", str(afile / "d"), says="is a file, not a folder")
    _fails("demo", "--out", str(tmp_path / "d"), "--scale", "nan", says="--scale nan: give a positive number")
    _fails("demo", "--out", str(tmp_path / "d"), "--scale", "1e12", says="--scale 1e+12: give a smaller one")
    _fails("demo", "--out", str(tmp_path / "d"), "--seed", "-1", says="--seed -1: give a whole number from 0")
    _fails("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), *TINY,
           "--cache", str(afile / "c"), says=f"--cache '{afile / 'c'}': '{afile}' is a file, not a folder")


def test_damaged_checkpoints_stop_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = _train(out, "--set", "train.epochs=2")
    assert run_cli_here(*args, "--set", "train.stop_after=1") == 0
    good = (out / "checkpoint.pt").read_bytes()
    for damage in (os.urandom(5000), good[: len(good) // 2]):
        (out / "checkpoint.pt").write_bytes(damage)
        _fails(*args, "--resume", says="is damaged or not a vitdistill checkpoint")
    torch.save({"student": {}}, out / "checkpoint.pt")  # a torch file, but not ours
    _fails(*args, "--resume", says="is damaged or not a vitdistill checkpoint")

    # a good checkpoint this user may not read is not "damaged" (the suite runs as root, where chmod
    # does not stop a read, so the permission check itself is what is made to refuse)
    (out / "checkpoint.pt").write_bytes(good)
    from vitdistill.engine import run as run_module

    real_access = os.access
    monkeypatch.setattr(run_module.os, "access", lambda p, mode: False if Path(p).name == "checkpoint.pt"
                        else real_access(p, mode))
    with pytest.raises(UserError, match=r"checkpoint\.pt' is not readable \(permission denied\)"):
        run_module._read_checkpoint(out / "checkpoint.pt")
    monkeypatch.undo()
    assert run_module._read_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_a_teacher_without_weights_is_refused(teacher_run: Path, tmp_path: Path) -> None:
    _fails("distill", "--teacher", "resnet_micro_cnn", "--student", "vit_femto_patch4_16", "--method", "logit-kd",
           *TINY, "--out", str(tmp_path / "d"), says="a random teacher teaches nothing")
    assert not (tmp_path / "d").exists()
    _fails("distill", "--teacher", "resnet_micro_cnn", "--teacher-weights", f"{teacher_run},{teacher_run}",
           "--student", "vit_femto_patch4_16", "--method", "logit-kd", *TINY, "--out", str(tmp_path / "d"),
           says="1 teacher but 2 weights files")
    for method in ("logit-kd", "dkd"):  # the second teacher would run on every batch and never be read
        _fails("distill", "--teacher", "resnet_micro_cnn,resnet_micro_cnn", "--teacher-weights",
               f"{teacher_run},{teacher_run}", "--student", "vit_femto_patch4_16", "--method", method, *TINY,
               "--out", str(tmp_path / "d"), says=f"method '{method}' learns from 1 teacher and got 2 teachers")
    assert not (tmp_path / "d").exists()
    _fails("eval", "--student", str(teacher_run), "--teacher", "resnet_micro_cnn", says="needs its weights")


def test_a_corrupt_cache_header_is_named(teacher_run: Path, tmp_path: Path) -> None:
    for text in ('{"x": ', "[1, 2]"):
        cache = tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        (cache / "header.json").write_text(text)
        _fails("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), *TINY,
               "--cache", str(cache), says="is corrupt; remove the folder")
        _fails("distill", "--teacher-cache", str(cache), "--student", "vit_femto_patch4_16", "--method", "logit-kd",
               *TINY, "--out", str(tmp_path / "d"), says="is corrupt; remove the folder")


def test_a_finished_run_without_its_checkpoint_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli_here(*_train(out)) == 0
    (out / "checkpoint.pt").unlink()  # what one does to save space once a run is done
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--resume"]):
        _fails(*_train(out, *extra), says="holds a finished run (summary.json) without its checkpoint.pt")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_teacher_weights_without_a_teacher_are_refused(teacher_run: Path, tmp_path: Path) -> None:
    """Weights with no architecture to load them into were silently dropped."""
    cache = tmp_path / "cache"
    for extra in ([], ["--teacher-cache", str(cache)]):
        _fails("distill", "--teacher-weights", str(teacher_run), *extra, "--student", "vit_femto_patch4_16",
               "--method", "logit-kd", *TINY, "--out", str(tmp_path / "d"), says="with no teacher model; name the")
    _fails("cache-teacher", "--teacher-weights", str(teacher_run), *TINY, "--cache", str(cache),
           says="with no teacher model")
    _fails("eval", "--student", str(teacher_run), "--teacher-weights", str(teacher_run), says="with no --teacher")
    assert not (tmp_path / "d").exists() and not cache.exists()


def test_eval_of_a_run_with_other_weights_scores_those(teacher_run: Path, tmp_path: Path) -> None:
    """`--student RUN --weights W` is the run's model with W's weights (before: W was ignored)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(teacher_run / "model.safetensors"))
    head = next(k for k in reversed(list(state)) if k.endswith("weight") and state[k].ndim == 2)
    state[head] = torch.zeros_like(state[head])  # every image gets the bias's class
    state[head.replace("weight", "bias")] = torch.arange(state[head].shape[0], dtype=torch.float32)
    save_file(state, str(tmp_path / "other.safetensors"))
    own = json.loads(run_cli_fast("eval", "--student", str(teacher_run)).stdout)
    other = json.loads(run_cli_fast("eval", "--student", str(teacher_run), "--weights",
                                    str(tmp_path / "other.safetensors")).stdout)
    from vitdistill.config import build_config, load_yaml
    from vitdistill.engine.setup import load_run_data

    labels = load_run_data(build_config([load_yaml(teacher_run / "config.yaml")])).test.labels
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert own["n"] == other["n"] == len(labels) == summary["test_images"]
    assert own["top1"] == pytest.approx(summary["student_top1"])
    top = state[head].shape[0] - 1  # the largest bias wins on every image
    assert other["top1"] == pytest.approx(float((labels == top).float().mean())) != own["top1"]
    # --data names a data set to score on: its whole test split, not the run's subset of its own
    assert json.loads(run_cli_fast("eval", "--student", str(teacher_run), "--data", "digits").stdout)["n"] > len(labels)


def test_eval_and_profile_sizes_and_paths(teacher_run: Path, tmp_path: Path) -> None:
    _fails("eval", "--student", str(teacher_run), "--batch-size", "0", says="--batch-size 0: give at least 1")
    _fails("eval", "--student", str(tmp_path / "nope"), says="does not exist; give a run directory")
    for flag in ("--img-size", "--num-classes", "--batch"):
        _fails("profile", "--model", "resnet_micro_cnn", flag, "-8", says=f"{flag} -8: give at least 1")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.yaml").write_text((teacher_run / "config.yaml").read_text())
    (damaged / "summary.json").write_text('{"a": 1}')
    _fails("profile", "--model", str(damaged), says="summary.json' is damaged")
    _fails("profile", "--model", str(tmp_path), says="is not a run directory (no config.yaml)")
    # Path("") is '.', which was named as the run directory that is not one
    _fails("profile", "--model", "", says="--model is empty; give a model name")
    _fails("eval", "--student", "", says="--student is empty; give a run directory")
    # a batch no machine holds: one line, not the allocator's traceback
    _fails("profile", "--model", "vit_femto_patch4_16", "--batch", "99999999999",
           says="not enough memory to profile 'vit_femto_patch4_16' at --batch 99999999999")
    # an empty file flag (a script's unset variable) is refused, not read as "not given"
    _fails(*_train(tmp_path / "r", "--weights", ""), says="--weights is empty; give a file or folder")
    assert not (tmp_path / "r").exists()
    _fails("eval", "--student", str(teacher_run), "--weights", " ", says="--weights is empty")
    _fails("distill", "--student", "vit_femto_patch4_16", "--teacher", "resnet_micro_cnn", "--teacher-weights", "",
           says="--teacher-weights is empty")


def test_imagefolder_classes_that_cannot_train(tmp_path: Path) -> None:
    from PIL import Image

    def folder(name: str, layout: dict[str, int]) -> Path:
        root = tmp_path / name
        for rel, count in layout.items():
            (root / rel).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / rel / f"{i}.png")
        return root

    empty = folder("empty", {"a": 3, "b": 0, "c": 3})
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{empty}"), says=f"class folder 'b' in {empty} holds no images")
    one = folder("one", {"a": 4})
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{one}"), says="only one class ('a')")
    test_only = folder("testonly", {"train/a": 2, "train/b": 2, "test/a": 1, "test/c": 1})
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{test_only}"),
           says="class 'c' has test images but no training images")
    not_tar = tmp_path / "nottar.tar"
    not_tar.write_bytes(os.urandom(3000))
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{not_tar}"),
           says=f"cannot read archive {not_tar}: not a tar or tar.gz archive; re-create or re-download it")
    import tarfile

    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:
        tf.add(empty / "a", arcname="a")
        tf.add(empty / "c", arcname="c")
    cut = tmp_path / "cut.tar"
    with tarfile.open(whole) as tf:
        at = tf.getmembers()[-2].offset  # the archive cut between two members reads as a shorter one
    cut.write_bytes(whole.read_bytes()[:at])
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{cut}"), says="is truncated")
    cut.write_bytes(whole.read_bytes()[:at + 700])  # cut inside a member: tarfile's own error, in one line
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{cut}"), says="cannot read archive")
    assert not (tmp_path / "r").exists()
    assert run_cli_here(*_train(tmp_path / "r", "--data", f"imagefolder:{whole}")) == 0  # the same tar, whole


def test_imagefolder_classes_a_listing_could_drop(tmp_path: Path) -> None:
    """Class folders that hold no usable image, in a tar too, and links: none may vanish silently."""
    import tarfile

    from PIL import Image

    from vitdistill.data import load_data

    def images(folder: Path, count: int, prefix: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{prefix}{i}.png")

    # a class whose only files are hidden (an AppleDouble fork, a thumbnail folder) holds no image
    for case, hide in (("fork", lambda d: images(d, 2, "._")), ("thumbs", lambda d: images(d / ".thumbs", 2))):
        root = tmp_path / case
        images(root / "a", 3), images(root / "c", 3)
        hide(root / "b")
        _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{root}"), says=f"class folder 'b' in {root} holds no")
    # the same in archives: an empty class folder, in a pool and in a split layout
    pool = tmp_path / "pool"
    images(pool / "a", 3), images(pool / "c", 3)
    (pool / "b").mkdir()
    split = tmp_path / "split"
    for part in ("train/a", "train/b", "test/a", "test/b"):
        images(split / part, 2)
    (split / "test" / "z").mkdir()
    for root, says in ((pool, "class folder 'pool/b'"), (split, "class folder 'split/test/z'")):
        archive = tmp_path / f"{root.name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(root, arcname=root.name)
        _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{archive}"), says=says)
    # a linked class folder is followed, as torchvision's ImageFolder does; a loop ends
    linked = tmp_path / "linked"
    images(linked / "a", 3), images(tmp_path / "elsewhere" / "b", 3)
    (linked / "b").symlink_to(tmp_path / "elsewhere" / "b", target_is_directory=True)
    (linked / "a" / "loop").symlink_to(linked, target_is_directory=True)
    ds = load_data(f"imagefolder:{linked}", cache_dir=tmp_path / "cache")
    assert ds.classes == ["a", "b"] and len(ds.train) + len(ds.test) == 6
    # a broken link where an image should be is named
    (linked / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{linked}"), says="cannot read image 'b/gone.png'")
    assert not (tmp_path / "r").exists()


def test_export_checks_its_options_and_leaves_nothing(teacher_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    for extra, says in ((["--batch-size", "0"], "--batch-size 0: give at least 1"),
                        (["--opset", "3"], "--opset 3: give an opset from 18 to"),
                        (["--opset", "99"], "--opset 99: give an opset from 18 to"),
                        (["--opset", "26"], "--opset 26: give an opset from 18 to 25"),
                        (["--threads", "0"], "--threads 0: give a number from 1 to 1024"),
                        (["--threads", "3000"], "--threads 3000: give a number from 1 to 1024")):
        _fails("export", "--student", str(teacher_run), "--out", str(tmp_path / "x.onnx"), *extra, says=says)
    afile = tmp_path / "afile"
    afile.write_text("")
    _fails("export", "--student", str(teacher_run), "--out", str(afile / "x.onnx"), says="is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_failed_export_takes_away_the_folders_it_made(teacher_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")

    def refuse(*args, **kwargs):  # the exporter failing on a model it cannot trace
        raise RuntimeError("cannot trace this\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    _fails("export", "--student", str(teacher_run), "--out", str(tmp_path / "new" / "deeper" / "x.onnx"),
           says="could not export 'resnet_micro_cnn' to ONNX: cannot trace this")
    assert list(tmp_path.iterdir()) == []


def test_run_files_are_readable_like_any_file_the_user_writes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli_here(*_train(out)) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "summary.json", "model.safetensors", "checkpoint.pt", "metrics.jsonl", "report.md", "report.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name  # not mkstemp's 0600
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_model_overrides_timm_refuses_are_one_line(tmp_path: Path) -> None:
    _fails(*_train(tmp_path / "run", "--set", "model.student_kwargs.depth=-1"),
           says="cannot build 'vit_femto_patch4_16' with {'depth': -1}: ")
    assert not (tmp_path / "run").exists()


def test_a_student_at_its_own_img_size_trains_profiles_and_scores(tmp_path: Path) -> None:
    # the images are resized to the student's 8 px; the probe and the profile at the end used the
    # data's 16 px and crashed after the whole training
    out = tmp_path / "run"
    assert run_cli_here(*_train(out, "--set", "model.student_kwargs.img_size=8")) == 0
    summary = json.loads((out / "summary.json").read_text())
    r = run_cli_fast("profile", "--model", str(out))
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["flops"] == summary["flops"]
    r = run_cli_fast("eval", "--student", str(out))
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["top1"] == summary["student_top1"]


def test_a_broken_cache_shard_is_named_before_the_first_step(teacher_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert run_cli_here("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run),
                        "--epochs", "2", *TINY, "--cache", str(cache)) == 0
    (cache / "epoch_0001.safetensors").write_bytes(os.urandom(2000))
    out = tmp_path / "d"
    _fails("distill", "--teacher-cache", str(cache), "--student", "vit_femto_patch4_16", "--method", "logit-kd",
           "--epochs", "2", *TINY, "--out", str(out), says="epoch_0001.safetensors' is corrupt")
    assert not out.exists()  # before: a run folder with epoch 1's checkpoint, then the error
    (cache / "epoch_0001.safetensors").unlink()
    _fails("distill", "--teacher-cache", str(cache), "--student", "vit_femto_patch4_16", "--method", "logit-kd",
           "--epochs", "2", *TINY, "--out", str(out), says="epoch_0001.safetensors' is missing")


def test_models_pattern_that_matches_nothing_says_so() -> None:
    _fails("models", "--timm", "vit_femtoo", says="no model matches 'vit_femtoo' (did you mean 'vit_femto_patch4_16'?)")
    _fails("models", "--timm", "zz*", says="no model matches 'zz*'; patterns take wildcards")
    r = run_cli_fast("models", "--timm", "*femto*")
    assert r.returncode == 0 and "vit_femto_patch4_16  (registered tiny config)" in r.stdout
    assert "convnext_femto\n" in r.stdout


def test_did_you_mean_prefers_the_names_own_family() -> None:
    from vitdistill.errors import did_you_mean

    names = ["convnext_femto", "vit_femto_patch4_16", "resnet18", "resnet18d"]
    assert did_you_mean("vit_femtoo", names) == " (did you mean 'vit_femto_patch4_16'?)"
    assert did_you_mean("resnet18x", names) == " (did you mean 'resnet18'?)"  # no family: the closest
    assert did_you_mean("zzzz", names) == ""


def test_a_teacher_trained_on_other_classes_is_noted(teacher_run: Path, tmp_path: Path) -> None:
    """Same class count, other classes: it loads without complaint, so the run says what it saw."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = teacher_run / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)] and meta["data"] == "digits"
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    save_file(load_file(str(weights)), str(tmp_path / "other.safetensors"),
              {**meta, "classes": json.dumps(cifar), "data": "cifar10:x"})
    for teacher, noted in ((teacher_run, False), (tmp_path / "other.safetensors", True)):
        r = run_cli_fast("distill", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher), "--student",
                         "vit_femto_patch4_16", "--method", "logit-kd", "--epochs", "1", *TINY,
                         "--out", str(tmp_path / f"d{noted}"))
        assert r.returncode == 0, r.stderr
        assert ("note: teacher 'resnet_micro_cnn'" in r.stderr) == noted, r.stderr
    assert "trained on cifar10:x with classes [airplane, automobile, bird, cat, ...], this data's are [0, 1, 2, 3, " \
           "...]" in r.stderr


def test_several_teachers_without_weights_are_each_named(tmp_path: Path) -> None:
    _fails("distill", "--method", "co-advise", "--teacher", "resnet_micro_cnn,rednet_micro_inv", "--student",
           "vit_femto_patch4_16", *TINY, "--out", str(tmp_path / "d"),
           says="teacher 'resnet_micro_cnn' has no weights, and a random teacher teaches nothing")


def test_cache_teacher_takes_no_training_flags() -> None:
    """It trains nothing: --lr is refused, and --batch-size is the teacher's batch."""
    from vitdistill.cli import _CACHE, _COMMON, build_parser, resolve_config

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["cache-teacher", "--lr", "0.1", "--cache", "c"])
    assert stop.value.code == 2
    args = build_parser().parse_args(["cache-teacher", "--batch-size", "32", "--cache", "c"])
    cfg = resolve_config(args, {**_COMMON, **_CACHE})
    assert cfg.train.eval_batch_size == 32


def test_a_diverged_run_stops_with_one_line(tmp_path: Path) -> None:
    """A loss that became NaN (here: lr 1e30, no clipping) stops the run instead of training and
    saving a NaN student with exit code 0; the epoch's checkpoint is not written."""
    out = tmp_path / "run"
    _fails(*_train(out, "--lr", "1e30", "--set", "train.clip_grad=null"), says="the training loss became nan in epoch 1")
    assert not (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("method, knob, says", [
    ("logit-kd", "tau=.nan", "method.tau of 'logit-kd' must be a finite number, got nan"),
    ("logit-kd", "tau=.inf", "method.tau of 'logit-kd' must be a finite number, got inf"),
    ("dkd", "beta=.nan", "method.beta of 'dkd' must be a finite number"),
    ("dearkd", "kd_alpha=2", "kd_alpha must lie in [0, 1], not 2"),
    ("manifold", "kd_alpha=-1", "kd_alpha must lie in [0, 1], not -1"),
])
def test_method_knobs_out_of_range_are_one_line(teacher_run: Path, tmp_path: Path, method: str, knob: str,
                                                 says: str) -> None:
    student = "deit_femto_distilled_patch4_16" if method in ("dearkd", "manifold") else "vit_femto_patch4_16"
    _fails("distill", "--method", method, "--student", student, "--teacher", "resnet_micro_cnn", "--teacher-weights",
           str(teacher_run), "--epochs", "1", *TINY, "--out", str(tmp_path / "r"), "--set", f"method.{knob}", says=says)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("method", ["dearkd", "manifold", "tat", "vitkd", "hidden", "attention", "minivit"])
def test_an_empty_layer_list_is_one_line(teacher_run: Path, vit_teacher_run: Path, tmp_path: Path,
                                         method: str) -> None:
    vit = method in ("attention", "minivit")
    _fails("distill", "--method", method, "--student", "vit_femto_patch4_16", "--teacher",
           "vit_femto_patch4_16" if vit else "resnet_micro_cnn", "--teacher-weights",
           str(vit_teacher_run if vit else teacher_run), "--epochs", "1", *TINY, "--out", str(tmp_path / "r"),
           "--set", "method.student_layers=[]", says=f"bad knob for method '{method}': student_layers must be a non-empty "
           "list of layer indices, not []")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_that_refuses_files_is_one_line(tmp_path: Path) -> None:
    # /proc/self exists and is a folder, but takes no new file (as a read-only folder would, for a
    # user other than root): the run says so before training, not with a traceback at the first write
    _fails(*_train(Path("/proc/self")), says="cannot write into --out '/proc/self': it takes no new file (a special "
           "file system such as /proc or /sys)")
    _fails("synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights", "x.safetensors",
           "--out", "/proc/self/x", says="cannot write into --out '/proc/self/x'")


def test_an_empty_out_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fails("train", "--model", "vit_femto_patch4_16", "--epochs", "1", *TINY, "--out", "", says="--out is empty")
    _fails("demo", "--out", " ", "--scale", "0.03", says="--out is empty")
    (tmp_path / "grid.yaml").write_text("compare: {cells: [{method: none}]}\n")
    _fails("compare", "--config", str(tmp_path / "grid.yaml"), "--out", "", says="--out is empty")
    assert not any(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == ["grid.yaml"]


def test_resume_of_a_finished_run_leaves_it_alone(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli_here(*_train(out)) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run_cli_fast(*_train(out, "--resume"))
    assert r.returncode == 0 and "is finished (summary.json); nothing to resume" in r.stdout
    printed, saved = json.loads(r.stdout.strip().splitlines()[-1]), json.loads((out / "summary.json").read_text())
    assert printed["student_top1"] == saved["student_top1"] and printed["wall_s"] == saved["wall_s"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_method_none_says_the_teacher_is_not_used(teacher_run: Path, tmp_path: Path) -> None:
    r = run_cli_fast("distill", "--method", "none", "--student", "vit_femto_patch4_16", "--teacher", "resnet_micro_cnn",
                     "--teacher-weights", str(teacher_run), "--epochs", "1", *TINY, "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "note: method 'none' learns from the labels only; the teacher given is not used" in r.stderr


def test_a_model_too_large_for_memory_names_the_image_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # the real case (profile --img-size 100000) asks the allocator for 160 GB; a machine that
    # overcommits might grant it, so the allocator's refusal is played here
    from vitdistill.errors import UserError
    from vitdistill.models import factory

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 160000000256 bytes.")

    monkeypatch.setattr(factory, "_timm_create", refuse)
    with pytest.raises(UserError, match=r"not enough memory to build 'vit_femto_patch4_16' for 100000-px images"):
        factory.create_model("vit_femto_patch4_16", 10, 100000)


def test_other_commands_do_not_write_into_a_training_run(teacher_run: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in teacher_run.iterdir())
    _fails("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run),
           "--cache", str(teacher_run), *TINY, says="holds a training run; pass --cache to a new folder")
    _fails("demo", "--out", str(teacher_run), "--scale", "0.01", says="holds a training run; pass --out")
    assert sorted(p.name for p in teacher_run.iterdir()) == before


def test_no_command_writes_into_another_commands_folder(teacher_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = run_cli_fast("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run),
                     "--epochs", "1", "--cache", str(cache), *TINY)
    assert r.returncode == 0, r.stderr
    marked = {}  # the other kinds by the file that marks each (their own tests make real ones)
    for name, marker in (("synth", "synth.json"), ("grid", "compare.json"), ("demo", "demo.json")):
        marked[name] = tmp_path / name
        marked[name].mkdir()
        (marked[name] / marker).write_text("{}")
    says = {cache: "a teacher cache", marked["synth"]: "a synthetic data set", marked["grid"]: "a compare grid",
            marked["demo"]: "a demo", teacher_run: "a training run"}
    before = {f: sorted(p.name for p in f.iterdir()) for f in says}
    grid_cfg = tmp_path / "grid.yaml"
    grid_cfg.write_text("data: {source: digits}\ncompare:\n  seeds: [0]\n"
                        "  cells: [{method: none, student: vit_femto_patch4_16}]\n")
    synth = ["synthesize", "--data", "digits", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run),
             "--images", "10", "--iters", "2", "--batch-size", "10"]
    cache_teacher = ["cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run),
                     "--epochs", "1", *TINY]
    for folder, name in says.items():
        if folder != teacher_run:
            _fails(*_train(folder), says=f"--out '{folder}' holds {name}")
        if folder != cache:
            _fails(*cache_teacher, "--cache", str(folder), says=f"--cache '{folder}' holds {name}")
        if folder != marked["synth"]:
            _fails(*synth, "--out", str(folder), says=f"--out '{folder}' holds {name}")
        if folder != marked["demo"]:
            _fails("demo", "--out", str(folder), "--scale", "0.01", says=f"--out '{folder}' holds {name}")
        if folder != marked["grid"]:
            _fails("compare", "--config", str(grid_cfg), "--out", str(folder), says=f"--out '{folder}' holds {name}")
    assert {f: sorted(p.name for p in f.iterdir()) for f in says} == before


def test_an_unreadable_weights_file_says_permission_denied(teacher_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdistill.models import factory

    monkeypatch.setattr(factory.os, "access", lambda path, mode: False)  # root reads any file, so pretend
    with pytest.raises(UserError, match="permission denied; check the file's permissions"):
        factory.read_state_dict(str(teacher_run / "model.safetensors"))


def test_compare_takes_dry_run_or_report_only_not_both(tmp_path: Path) -> None:
    r = run_cli("compare", "--dry-run", "--report-only", "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and "not allowed with argument" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "g").exists()
