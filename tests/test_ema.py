"""Model EMA (train.ema_decay): the recursion by hand, shared weights averaged once, the averaged
student is the one scored and saved, and a resumed run ends where a straight one does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, check_distill_and_resume, run_cli_fast, run_cli_here
from vitdistill.config import TrainConfig
from vitdistill.engine.ema import ema_decay_at, make_ema


class _Shared(torch.nn.Module):
    """One linear layer applied twice (MiniViT's weight sharing) and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(3, 3)
        self.second = self.first
        self.norm = torch.nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.second(self.first(x)))


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_recursion_and_averages_a_shared_weight_once(warmup: bool) -> None:
    torch.manual_seed(0)
    model = _Shared()
    ema = make_ema(model, TrainConfig(ema_decay=0.9, ema_warmup=warmup))
    want_w, want_mean = None, None
    for t in range(1, 8):
        with torch.no_grad():
            model.first.weight.add_(torch.randn(3, 3))
        model.train()
        model(torch.randn(16, 3))  # moves the BatchNorm statistics and its batch count
        ema.update_parameters(model)
        d = 0.0 if t == 1 else (min(0.9, 1 - t ** (-2 / 3)) if warmup else 0.9)
        assert ema_decay_at(t, 0.9, warmup) == pytest.approx(d)
        w, mean = model.first.weight.detach(), model.norm.running_mean
        want_w = w.clone() if t == 1 else d * want_w + (1 - d) * w
        want_mean = mean.clone() if t == 1 else d * want_mean + (1 - d) * mean
        assert torch.allclose(ema.module.first.weight, want_w, atol=1e-6)  # lerped once, not once per name
        assert ema.module.second.weight is ema.module.first.weight
        assert torch.allclose(ema.module.norm.running_mean, want_mean, atol=1e-6)
        assert int(ema.module.norm.num_batches_tracked) == t  # integer buffers follow the model
    if warmup:  # seven steps in, the warm-up still holds the decay under 0.9
        assert ema_decay_at(7, 0.9, True) < 0.9 and ema_decay_at(10**6, 0.9, True) == 0.9
    assert make_ema(model, TrainConfig()) is None


def test_the_averaged_student_is_scored_saved_and_resumed(tmp_path: Path) -> None:
    args = ["train", "--model", "vit_femto_patch4_16", "--epochs", "2", "--lr", "2e-3", *TINY,
            "--set", "train.ema_decay=0.99"]
    summary = check_distill_and_resume(tmp_path, args)  # the EMA's state goes through the checkpoint
    out = tmp_path / "straight"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("test_live_top1" in r for r in rows)
    assert summary["student_top1"] == rows[-1]["test_top1"]
    saved = load_file(out / "model.safetensors")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert torch.equal(state["ema"]["n_averaged"], torch.tensor(2 * 4))  # 256 digits in batches of 64, 2 epochs
    live = state["student"]
    assert all(torch.equal(saved[k], state["ema"][f"module.{k}"]) for k in saved)  # the file holds the average
    assert any(not torch.equal(saved[k], live[k]) for k in saved)
    r = run_cli_fast("eval", "--student", str(out))
    assert r.returncode == 0 and json.loads(r.stdout)["top1"] == pytest.approx(rows[-1]["test_top1"])


def test_bad_ema_settings_end_in_one_line(tmp_path: Path) -> None:
    r = run_cli_fast("train", "--model", "vit_femto_patch4_16", "--epochs", "1", *TINY,
                     "--set", "train.ema_decay=1.5", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "train.ema_decay 1.5 is outside (0, 1)" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    plain = tmp_path / "plain"
    args = ["train", "--model", "vit_femto_patch4_16", "--epochs", "2", *TINY, "--out", str(plain)]
    assert run_cli_here(*args, "--set", "train.stop_after=1") == 0
    r = run_cli_fast(*args, "--resume", "--set", "train.ema_decay=0.99")
    assert r.returncode == 2 and "train.ema_decay: None then, 0.99 now" in r.stderr
    # a run begun before the EMA existed has no such key in its saved config: the checkpoint decides
    state = torch.load(plain / "checkpoint.pt", weights_only=True)
    cfg = json.loads(state["config"])
    del cfg["train"]["ema_decay"], cfg["train"]["ema_warmup"]
    state["config"] = json.dumps(cfg)
    torch.save(state, plain / "checkpoint.pt")
    r = run_cli_fast(*args, "--resume", "--set", "train.ema_decay=0.99")
    assert r.returncode == 2 and "holds no averaged weights" in r.stderr and len(r.stderr.splitlines()) == 1
