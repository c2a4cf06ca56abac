"""Bad input found by the second audit of every command (2026-12-04): each ends in one line, exit
code 2, no traceback and nothing left behind (tests/test_bad_input.py holds the first audit's)."""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY, run_cli_fast, run_cli_here
from vitdistill.errors import UserError


def _fails(*args: str, says: str) -> None:
    r = run_cli_fast(*args)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "vit_femto_patch4_16", "--epochs", "1", *TINY, "--out", str(out), *extra]


def _png(path: Path, side: int = 8, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (value, value, value)).save(path)


def test_sizes_that_do_not_fit_in_memory_are_named(tmp_path: Path) -> None:
    _fails(*_train(tmp_path / "r", "--set", "data.img_size=100000"), says="give a smaller data.img_size")
    _fails(*_train(tmp_path / "r", "--set", "data.pad=100000"), says="larger than the 16-px images")
    _fails("profile", "--model", "resnet_micro_cnn", "--img-size", "3000000000", says="not enough memory to profile")
    assert not (tmp_path / "r").exists()


def test_a_failure_or_interrupt_in_the_first_epoch_leaves_no_run_folder(teacher_run: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "deep" / "d1"
    _fails("distill", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), "--student",
           "vit_femto_patch4_16", "--method", "logit-kd", "--epochs", "1", *TINY, "--out", str(out),
           "--set", "method.tau=1e308", says="the training loss became nan in epoch 1")
    assert not (tmp_path / "deep").exists()  # the folders it made for the run too

    import vitdistill.engine.run as engine_run

    def interrupted(**_: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_run, "train_epoch", interrupted)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert run_cli_here(*_train(mine)) == 130
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # a folder that was there stays, with its file


def test_odd_values_of_out_and_of_comma_lists(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    _fails(*_train(tmp_path / "r", "--set", "out="), says="leaves the run folder empty")
    _fails("distill", "--teacher-cache", f"{tmp_path / 'c'},", "--student", "vit_femto_patch4_16", "--method",
           "logit-kd", *TINY, "--out", str(tmp_path / "r"), says="has an empty entry")
    _fails("distill", "--teacher", "resnet_micro_cnn,,resnet_micro_cnn", "--student", "vit_femto_patch4_16",
           "--method", "co-advise", *TINY, "--out", str(tmp_path / "r"), says="has an empty entry")
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = run_cli_fast(*_train(tmp_path / "unused", "--set", "out=~/run"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "home" / "run" / "summary.json").exists() and not (tmp_path / "unused").exists()


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    from vitdistill.config import load_yaml

    for text in ("[]", "0", "false"):
        (tmp_path / "c.yaml").write_text(text + "\n")
        with pytest.raises(UserError, match="must be a mapping of sections"):
            load_yaml(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("# nothing set yet\n")
    assert load_yaml(tmp_path / "c.yaml") == {}


def test_compare_out_and_knobs_are_checked(tmp_path: Path) -> None:
    cell = "  cells: [{method: logit-kd, student: vit_femto_patch4_16%s}]\n"
    grid = "compare:\n  seeds: [0]\n  teacher: {model: resnet_micro_cnn, epochs: 1}\n"
    (tmp_path / "out.yaml").write_text("out: 5\n" + grid + cell % "")
    _fails("compare", "--config", str(tmp_path / "out.yaml"), "--dry-run", says="'out' must name the grid's folder")
    (tmp_path / "g.yaml").write_text(grid + cell % "")
    _fails("compare", "--config", str(tmp_path / "g.yaml"), "--dry-run", "--set", "out=[a]",
           says="'out' must name the grid's folder")
    (tmp_path / "k.yaml").write_text(grid + cell % ", knobs: {name: dkd}")
    _fails("compare", "--config", str(tmp_path / "k.yaml"), "--dry-run", says="may not hold 'name'")


def test_a_summary_with_a_damaged_number_is_named(tmp_path: Path) -> None:
    from vitdistill.report.leaderboard import read_summary

    good = {"student_top1": 0.9, "params": 100, "flops": 2.5e6, "teachers": [{"model": "m", "top1": 0.8}]}
    (tmp_path / "summary.json").write_text(json.dumps(good))
    assert read_summary(tmp_path)["params"] == 100
    for damage, says in (({"params": "x"}, "params is 'x', not a number"), ({"wall_s": True}, "wall_s is True"),
                         ({"teachers": [{"model": "m", "top1": "hi"}]}, "teachers: top1 is 'hi'"),
                         ({"teachers": {"model": "m"}}, "'teachers' is not a list")):
        (tmp_path / "summary.json").write_text(json.dumps({**good, **damage}))
        with pytest.raises(UserError, match="is damaged") as err:
            read_summary(tmp_path)
        assert says in str(err.value)


def test_synthetic_sets_with_no_square_images_or_bad_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vitdistill.data.synthetic import FORMAT, IMAGES

    meta = {"format": FORMAT, "test_data": "digits", "img_size": "16"}
    cases = {"empty": (torch.zeros(0, 3, 16, 16, dtype=torch.uint8), meta, "holds no images"),
             "wide": (torch.zeros(4, 3, 16, 8, dtype=torch.uint8), meta, "8x16 images, not square"),  # W x H
             "negpad": (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), {**meta, "pad": "-5"}, "damaged metadata"),
             "hugepad": (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), {**meta, "pad": "100000"}, "crop padding")}
    for name, (images, m, says) in cases.items():
        (tmp_path / name).mkdir()
        save_file({"images": images, "labels": torch.arange(len(images)) % 10}, str(tmp_path / name / IMAGES), m)
        _fails(*_train(tmp_path / "r", "--data", f"synthetic:{tmp_path / name}"), says=says)
    assert not (tmp_path / "r").exists()


def test_image_folders_an_empty_test_split_and_a_path_out_of_the_archive(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for c in ("a", "b"):
        for i in range(2):
            _png(root / "train" / c / f"{i}.png", value=40 * i)
    (root / "test").mkdir()
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{root}"), says="the split folder 'test'")
    (root / "test").rmdir()
    (root / "Val").mkdir()  # below a common root, in any case
    nested = tmp_path / "nested"
    nested.mkdir()
    root.rename(nested / "MySet")
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{nested}"), says="the split folder 'MySet/Val'")
    tar = tmp_path / "trav.tar"
    with tarfile.open(tar, "w") as tf:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        for name in ("../../a/x.png", "../../b/y.png"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    _fails(*_train(tmp_path / "r", "--data", f"imagefolder:{tar}"), says="leaves the archive's root ('..')")
    assert not (tmp_path / "r").exists()


def test_large_images_decode_without_a_warning_and_huge_ones_are_named(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdistill.data.imagefolder import Entry, decode_split

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL warns above this and refuses above twice it
    _png(tmp_path / "a" / "big.png", side=12)
    _png(tmp_path / "a" / "huge.png", side=15)
    big = Entry(("a", "big.png"), tmp_path / "a" / "big.png", "a/big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arrays, _, _ = decode_split([big], {"a": 0}, tmp_path, None, "decoding")
    assert arrays[0].shape == (12, 12, 3)
    huge = Entry(("a", "huge.png"), tmp_path / "a" / "huge.png", "a/huge.png")
    with pytest.raises(UserError, match="'a/huge.png' .* more than 200 pixels"):
        decode_split([huge], {"a": 0}, tmp_path, None, "decoding")


def test_weights_of_another_kind_of_number_do_not_load(teacher_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(teacher_run / "model.safetensors"))
    save_file({k: v.bool() for k, v in state.items()}, str(tmp_path / "bool.safetensors"))
    # every tensor halved, BatchNorm's integer counters too, as a blanket conversion does
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "h.safetensors"))
    _fails("eval", "--student", "resnet_micro_cnn", "--weights", str(tmp_path / "bool.safetensors"), "--data",
           "digits", says="holds bool values where the model has float32")
    r = run_cli_fast("eval", "--student", "resnet_micro_cnn", "--weights", str(tmp_path / "h.safetensors"), "--data",
                     "digits")
    assert r.returncode == 0, r.stderr  # half-precision weights of the same model still load


def test_a_file_given_for_a_folder_is_named(teacher_run: Path, tmp_path: Path) -> None:
    _fails("eval", "--student", str(teacher_run / "config.yaml"), says=f"give its run directory (--student {teacher_run})")
    _fails("profile", "--model", str(teacher_run / "model.safetensors"), says="is a file; give its run directory")
    _fails("distill", "--teacher-cache", str(teacher_run / "config.yaml"), "--student", "vit_femto_patch4_16",
           "--method", "logit-kd", *TINY, "--out", str(tmp_path / "r"), says="is a file; give the teacher cache's folder")
    assert not (tmp_path / "r").exists()


def test_a_cache_of_other_data_names_the_sources(teacher_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = run_cli_fast("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run),
                     "--epochs", "1", "--cache", str(cache), *TINY)
    assert r.returncode == 0, r.stderr
    _fails("distill", "--teacher-cache", str(cache), "--student", "vit_femto_patch4_16", "--method", "logit-kd",
           "--epochs", "1", *TINY, "--data", "mnist5k", "--out", str(tmp_path / "r"),
           says="was made for 'digits' or other data settings (img_size, val_fraction), this run reads 'mnist5k'")
    assert not (tmp_path / "r").exists()


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path: Path) -> None:
    """`kill` (or `timeout`) mid-run: exit 143, the interrupt's line, and no temporary file or
    half-made run folder, whichever epoch the signal meets."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "vitdistill", "train", "--model", "vit_femto_patch4_16",
                             "--epochs", "50", "--threads", "1", "--no-progress", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not (out / "config.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().startswith("interrupted;") and len(err.strip().splitlines()) == 1, err
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left in ([], ["checkpoint.pt", "config.yaml", "metrics.jsonl"]), left
