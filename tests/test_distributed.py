"""torchrun with 2 CPU processes on gloo: the same run as 1 process, files from rank 0 only, resume,
the teacher cache, and the one-line error for a batch that does not split over the processes."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import distill_args, run_cli_fast, run_cli_here

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N --master_port P -m vitdistill ARGS`` (one thread per process)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "vitdistill", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict], rel: float = 1e-4) -> None:
    """Equal epochs; test accuracies and counts exactly, losses and calibration within ``rel``; timings
    are free."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key in ("img_s", "epoch_s"):
                continue
            if key.startswith(("loss", "train_loss")) or key in ("test_ece", "test_nll"):  # sums of floats
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-7), key
            else:
                assert rb[key] == ra[key], (key, ra[key], rb[key])


def _deit(teacher_run: Path) -> list[str]:
    return distill_args("deit-hard", "deit_femto_distilled_patch4_16", "resnet_micro_cnn", teacher_run)


@pytest.fixture(scope="module")
def single(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the 2-epoch deit-hard run in one process."""
    out = tmp_path_factory.mktemp("ddp") / "single"
    assert run_cli_here(*_deit(teacher_run), "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def pair(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same command on 2 processes."""
    out = tmp_path_factory.mktemp("ddp") / "pair"
    r = torchrun(*_deit(teacher_run), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_two_processes_train_like_one(single: Path, pair: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, r = pair
    assert_same_metrics(_rows(single), _rows(out))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (single, out))
    assert b["student_top1"] == a["student_top1"] and b["agreement"] == a["agreement"]
    assert b["teacher_top1"] == a["teacher_top1"]  # the sharded teacher evaluation, gathered
    # rank 0 alone speaks: one line per epoch and one summary, no second process's copy
    assert len(re.findall(r"^epoch \d", r.stdout, flags=re.M)) == 2
    assert r.stdout.count('"method": "deit-hard"') == 1


def test_only_rank_zero_writes(single: Path, pair: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = pair
    assert sorted(os.listdir(out)) == sorted(os.listdir(single))  # hidden temp files included
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state["student"])  # the unwrapped student


def test_resume_on_two_processes(teacher_run: Path, pair: tuple[Path, subprocess.CompletedProcess],
                                 tmp_path: Path) -> None:
    straight, _ = pair
    out = tmp_path / "resumed"
    r = torchrun(*_deit(teacher_run), "--out", str(out), "--set", "train.stop_after=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(_rows(out)) == 1 and not (out / "summary.json").exists()
    r = torchrun(*_deit(teacher_run), "--out", str(out), "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_metrics(_rows(straight), _rows(out), rel=0.0)
    with safe_open(str(straight / "student.safetensors"), "pt") as fa, safe_open(str(out / "student.safetensors"),
                                                                                  "pt") as fb:
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def _tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_cache_teacher_shards_match_one_process(teacher_run: Path, tmp_path: Path) -> None:
    # 100 samples in batches of 16: 7 batches, dealt 4 + 3, so the split is uneven
    args = ["cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), "--epochs", "2",
            "--set", "data.train_limit=100", "--set", "data.test_limit=40", "--set", "train.eval_batch_size=16",
            "--set", "cache.value_dtype=float32", "--threads", "1", "--no-progress"]
    assert run_cli_here(*args, "--cache", str(tmp_path / "one")) == 0
    r = torchrun(*args, "--cache", str(tmp_path / "two"))
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(os.listdir(tmp_path / "one"))
    assert sorted(os.listdir(tmp_path / "two")) == names
    assert names == ["epoch_0000.safetensors", "epoch_0001.safetensors", "header.json", "test.safetensors"]
    assert (tmp_path / "one" / "header.json").read_text() == (tmp_path / "two" / "header.json").read_text()
    for name in names[:2] + names[3:]:
        (ta, ma), (tb, mb) = _tensors(tmp_path / "one" / name), _tensors(tmp_path / "two" / name)
        assert ma == mb  # epoch, header digest and the sha256 of the arrays
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_batch_not_divisible_is_one_line(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = [*_deit(teacher_run), "--batch-size", "63", "--out", str(tmp_path / "bad")]
    r = torchrun(*bad)
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    # each worker reports once (torchrun may stop one before it prints, so at least one line)
    assert 1 <= len(errors) <= 2 and all("not divisible by the 2 processes" in e for e in errors), r.stdout + r.stderr
    assert re.search(r"exitcode\s*:\s*2\b", r.stderr)  # torchrun's report names the worker's exit code 2
    # the worker itself, as torchrun starts it: exit 2 before it waits for any other process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    r = run_cli_fast(*bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not divisible" in r.stderr
    assert not (tmp_path / "bad").exists()
    r = run_cli_fast("eval", "--student", str(tmp_path / "bad"))  # one-process commands say so
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "without torchrun" in r.stderr


def test_method_with_parameters_on_two_processes(teacher_run: Path, tmp_path: Path) -> None:
    """hidden with a CNN teacher: the method's projectors train inside the same DDP as the student."""
    args = distill_args("hidden", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run)
    assert run_cli_here(*args, "--out", str(tmp_path / "one")) == 0
    r = torchrun(*args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_metrics(_rows(tmp_path / "one"), _rows(tmp_path / "two"))  # a mean of per-sample terms
    state = torch.load(tmp_path / "two" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("projectors.") for k in state["method"]), list(state["method"])


def test_batch_size_rule_in_one_process_is_silent() -> None:
    """Without torchrun nothing changes: any batch size, no process group."""
    from vitdistill.engine import distributed as dist

    dist.check_batch_size(63)
    assert dist.world_size() == 1 and dist.local_slice(torch.arange(5)).tolist() == list(range(5))
    assert dist.batch_ranges(100, 16, world=2) == [[(0, 16), (16, 32), (32, 48), (48, 64)],
                                                   [(64, 80), (80, 96), (96, 100)]]
    assert [t.tolist() for t in (dist.local_slice(torch.arange(6), r, 2) for r in (0, 1))] == [[0, 1, 2], [3, 4, 5]]

