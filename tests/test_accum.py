"""``train.accum_steps``: a batch split in micro-batches whose gradients add up trains the same
student as the whole batch (up to float rounding), in one process and under torchrun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, distill_args, run_cli_fast, run_cli_here
from test_distributed import _deit, _rows, torchrun


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student.safetensors"))


def _close(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < atol, worst
    # the split must change something: micro-batches sum their gradients in another order
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("steps", ["3", "64"])
def test_micro_batches_train_like_the_whole_batch(teacher_run: Path, tmp_path: Path, steps: str) -> None:
    # logit-kd on mixed samples: soft targets, a live teacher and partners' views in every micro-batch
    args = distill_args("logit-kd", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run,
                        "--epochs", "1", "--set", "data.mix_prob=0.5")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli_here(*args, "--out", str(whole)) == 0
    assert run_cli_here(*args, "--out", str(split), "--set", f"train.accum_steps={steps}") == 0
    _close(whole, split, atol=1e-5)
    a, b = _rows(whole)[0], _rows(split)[0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["train_top1"] == a["train_top1"] and b["test_top1"] == a["test_top1"]
    assert json.loads((split / "config.yaml").read_text().split("accum_steps: ")[1].split("\n")[0]) == int(steps)


def test_micro_batches_under_two_processes(teacher_run: Path, tmp_path: Path) -> None:
    # DDP must reduce once per step (no_sync on the earlier micro-batches) and still average the ranks
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli_here(*_deit(teacher_run), "--out", str(one)) == 0
    r = torchrun(*_deit(teacher_run), "--out", str(two), "--set", "train.accum_steps=2")
    assert r.returncode == 0, r.stdout + r.stderr
    _close(one, two, atol=1e-4)
    assert [row["test_top1"] for row in _rows(one)] == [row["test_top1"] for row in _rows(two)]


@pytest.mark.parametrize("value, says", [
    ("0", "config key 'train.accum_steps' must be a number >= 1, got 0; fix it in the config or --set"),
    ("65", "train.accum_steps 65 splits a batch of 64 images per process into micro-batches of less than one "
           "image; use at most 64"),
])
def test_accum_steps_out_of_range_is_one_line(teacher_run: Path, tmp_path: Path, value: str, says: str) -> None:
    out = tmp_path / "run"
    r = run_cli_fast(*distill_args("logit-kd", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run),
                     "--out", str(out), "--set", f"train.accum_steps={value}")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {says}"
    assert not out.exists()


def test_a_run_resumes_with_more_micro_batches(tmp_path: Path) -> None:
    # the memory knob may change on --resume: a run out of memory continues with a smaller micro-batch
    out = tmp_path / "run"
    args = ["train", "--model", "vit_femto_patch4_16", "--epochs", "2", *TINY, "--out", str(out)]
    assert run_cli_here(*args, "--set", "train.stop_after=1") == 0
    assert run_cli_here(*args, "--resume", "--set", "train.accum_steps=4") == 0
    assert len(_rows(out)) == 2 and (out / "summary.json").exists()
