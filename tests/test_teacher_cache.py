"""Teacher cache: exact augmentation replay, rebuilt targets, resume, integrity checks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli
from vitdistill import teacher_cache as tc
from vitdistill.config import build_config
from vitdistill.engine.setup import augment_for, build_teacher, cache_header, cache_teacher, load_run_data
from vitdistill.errors import UserError
from vitdistill.methods import build_method

LIMIT = 96


def _cfg(teacher_run: Path, **train) -> "object":
    return build_config([{
        "data": {"source": "digits", "train_limit": LIMIT, "test_limit": 64},
        "model": {"teacher": "resnet_micro_cnn", "teacher_weights": str(teacher_run)},
        "train": {"epochs": 2, "eval_batch_size": 40, "progress": False, **train},
        "cache": {"value_dtype": "float32"},
    }])


def test_rebuild_is_tinyvit_rule() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    logp = torch.log_softmax(logits, 1)
    top = logp.topk(2, dim=1)
    rebuilt = tc.rebuild_log_probs(top.values, top.indices, 4).exp()
    p = logp.exp()
    for row in range(2):
        kept = top.indices[row]
        assert torch.allclose(rebuilt[row, kept], p[row, kept])
        rest = [c for c in range(4) if c not in kept.tolist()]
        expected_rest = (1 - p[row, kept].sum()) / 2  # spread evenly over the C - k others
        assert torch.allclose(rebuilt[row, rest], expected_rest.expand(2))
    assert torch.allclose(rebuilt.sum(1), torch.ones(2))
    full = logp.topk(4, dim=1)
    assert torch.equal(tc.rebuild_log_probs(full.values, full.indices, 4), logp)  # k = C: exact


def test_index_dtype_is_smallest() -> None:
    assert tc.index_dtype(10) == torch.uint8 and tc.index_dtype(256) == torch.uint8
    assert tc.index_dtype(1000) == torch.int16 and tc.index_dtype(40000) == torch.int32


@pytest.mark.parametrize("data_change", [{}, {"mix_prob": 1.0},
                                         {"crop_scale": 0.4, "erase_prob": 0.5, "randaugment": "rand-m9-mstd0.5-inc1"}])
def test_replay_and_targets_match_live_teacher(teacher_run: Path, tmp_path: Path, data_change: dict) -> None:
    cfg = _cfg(teacher_run)
    for key, value in data_change.items():  # Mixup / CutMix partners, resized crops and erasing replay too
        setattr(cfg.data, key, value)
    data = load_run_data(cfg)
    teacher, _ = build_teacher(cfg, data, "test")
    seen: dict[tuple[int, int], torch.Tensor] = {}
    live: dict[tuple[int, int], torch.Tensor] = {}

    class Recording(torch.nn.Module):
        """Records every augmented image the teacher is shown while the cache is written."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.start = 0

        def forward(self, images: torch.Tensor) -> dict:
            out = teacher(images)
            for j in range(len(images)):
                seen[(self.epoch, self.start + j)] = images[j].clone()
                live[(self.epoch, self.start + j)] = out["logits"][j]
            self.start += len(images)
            if self.start >= LIMIT:
                self.epoch, self.start = self.epoch + 1, 0
            return out

    header = cache_header(cfg, data, "resnet_micro_cnn", tc.state_hash(teacher.model), teacher.prep.spec)
    tc.write_cache(tmp_path / "c", header, Recording(), data.train, augment_for(cfg, data), 40, torch.device("cpu"),
                   progress=False)
    source = tc.CachedTeacher(tmp_path / "c", header, torch.device("cpu"))
    augment = augment_for(cfg, data)
    for epoch in range(2):
        idx = torch.randperm(LIMIT, generator=torch.Generator().manual_seed(epoch))[:32]  # a training batch
        images = augment.images(data.train.images, idx, epoch)
        for j, i in enumerate(idx.tolist()):
            assert torch.equal(images[j], seen[(epoch, i)])  # the exact image the teacher saw
        rebuilt = source(images, idx, epoch)["logits"]
        want = torch.stack([live[(epoch, i)] for i in idx.tolist()])
        # k = C in float32: the same distribution at every temperature, hence the same loss
        for tau in (1.0, 4.0):
            assert torch.allclose(torch.softmax(rebuilt / tau, 1), torch.softmax(want / tau, 1), atol=1e-6)
        kd = build_method({"name": "logit-kd"})
        s = {"logits": torch.randn(32, 10)}
        y = data.train.labels[idx]
        assert torch.allclose(kd(s, {"logits": rebuilt}, y)["loss"], kd(s, {"logits": want}, y)["loss"], atol=1e-5)


def test_float16_topk_within_rounding(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg(teacher_run)
    cfg.cache.value_dtype, cfg.cache.topk = "float16", 3
    out = cache_teacher(cfg, str(tmp_path / "c16"))
    assert out["bytes_per_sample_epoch"] == 3 * (2 + 1)  # float16 values, uint8 indices
    data = load_run_data(cfg)
    teacher, _ = build_teacher(cfg, data, "test")
    idx = torch.arange(16)
    images = augment_for(cfg, data).images(data.train.images, idx, 1)
    p_live = torch.softmax(teacher(images)["logits"], 1)
    wanted = cache_header(cfg, data, "resnet_micro_cnn", tc.state_hash(teacher.model), teacher.prep.spec)
    source = tc.CachedTeacher(tmp_path / "c16", wanted, torch.device("cpu"))
    p_cache = torch.softmax(source(images, idx, 1)["logits"], 1)
    top = p_live.topk(3, dim=1).indices
    assert torch.allclose(p_cache.gather(1, top), p_live.gather(1, top), rtol=2e-3, atol=1e-4)
    assert torch.allclose(p_cache.sum(1), torch.ones(16), atol=1e-3)
    # replayed at tau > 1, a top-3 cache of 10 classes changes the softened target: a note says so
    from vitdistill.engine.setup import teacher_side

    cfg.cache.dir = str(tmp_path / "c16")
    for tau, noted in ((4.0, True), (1.0, False)):
        teacher_side(cfg, data, build_method({"name": "logit-kd", "tau": tau}), torch.device("cpu"))
        said = capsys.readouterr().err
        assert ("keeps the top 3 of 10 classes" in said and "--topk 10" in said) is noted, said
    # a cache without its test logits: scored live when the teacher is named beside it, else a note says
    # why summary.json has no teacher figures (they were null with nothing said)
    live = teacher_side(cfg, data, build_method({"name": "logit-kd"}), torch.device("cpu")).test_logits
    (tmp_path / "c16" / "test.safetensors").unlink()
    side = teacher_side(cfg, data, build_method({"name": "logit-kd"}), torch.device("cpu"))
    assert side.test_logits is not None and torch.allclose(side.test_logits, live, atol=1e-3)
    assert "no teacher logits" not in capsys.readouterr().err
    cfg.model.teacher = cfg.model.teacher_weights = None
    assert teacher_side(cfg, data, build_method({"name": "logit-kd"}), torch.device("cpu")).test_logits is None
    assert "holds no teacher logits for this test split" in capsys.readouterr().err
    # a --topk past the class count keeps every class, and says so rather than clip unseen
    cfg.model.teacher, cfg.model.teacher_weights, cfg.cache.dir = "resnet_micro_cnn", str(teacher_run), None
    cfg.cache.topk, cfg.train.epochs = 99, 1
    assert cache_teacher(cfg, str(tmp_path / "c99"))["bytes_per_sample_epoch"] == 10 * (2 + 1)
    assert "--topk 99 is more than the 10 classes; the cache keeps all 10" in capsys.readouterr().err


def test_resume_after_interruption(teacher_run: Path, tmp_path: Path) -> None:
    cfg = _cfg(teacher_run, epochs=3)
    data = load_run_data(cfg)
    teacher, _ = build_teacher(cfg, data, "test")
    header = cache_header(cfg, data, "resnet_micro_cnn", tc.state_hash(teacher.model), teacher.prep.spec)
    calls = {"n": 0}

    def dying(images: torch.Tensor) -> dict:
        calls["n"] += 1
        if calls["n"] > 4:  # epoch 0 has 3 batches of 40; die inside epoch 1
            raise KeyboardInterrupt
        return teacher(images)

    cdir = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        tc.write_cache(cdir, header, dying, data.train, augment_for(cfg, data), 40, torch.device("cpu"), progress=False)
    assert tc.shard_path(cdir, 0).exists() and not tc.shard_path(cdir, 1).exists()
    assert not list(cdir.glob(".*tmp"))  # no half-written shard left behind
    first = tc.shard_path(cdir, 0).read_bytes()
    out = tc.write_cache(cdir, header, teacher, data.train, augment_for(cfg, data), 40, torch.device("cpu"),
                         progress=False)
    assert out["written"] == 2 and tc.shard_path(cdir, 0).read_bytes() == first
    fresh = tmp_path / "fresh"
    tc.write_cache(fresh, header, teacher, data.train, augment_for(cfg, data), 40, torch.device("cpu"), progress=False)
    digest = tc.header_digest(header)
    for e in range(3):
        resumed, straight = tc.read_shard(tc.shard_path(cdir, e), digest, e), tc.read_shard(tc.shard_path(fresh, e), digest, e)
        assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


@pytest.mark.parametrize("field, change", [
    ("teacher_hash", {"model": {"teacher_weights": "OTHER"}}),  # the same architecture, other weights
    ("train_limit", {"data": {"train_limit": LIMIT - 1}}),
    ("data", {"data": {"img_size": 12}}),
    ("pad", {"data": {"pad": 1}}),
    ("hflip", {"data": {"hflip": True}}),
    ("mix_prob", {"data": {"mix_prob": 0.5}}),
    ("crop_scale", {"data": {"crop_scale": 0.5}}),
    ("erase_prob", {"data": {"erase_prob": 0.25}}),
    ("randaugment", {"data": {"randaugment": "rand-m9-mstd0.5-inc1"}}),
    ("seed", {"train": {"seed": 5}}),
    ("epochs", {"train": {"epochs": 3}}),
    # the same weights fed other statistics are another teacher (the DeiT twins' fix of 427cf22)
    ("teacher_input", {"model": {"teacher_kwargs": {"pretrained_cfg_overlay": {"mean": [0.4] * 3, "std": [0.3] * 3}}}}),
])
def test_header_mismatch_is_named(teacher_run: Path, tmp_path: Path, field: str, change: dict) -> None:
    base = _cfg(teacher_run)
    cache_teacher(base, str(tmp_path / "c"))
    if change.get("model", {}).get("teacher_weights") == "OTHER":
        from safetensors.torch import save_file

        from vitdistill.models import create_model

        other = tmp_path / "other.safetensors"
        save_file(create_model("resnet_micro_cnn", 10, 16)[0].state_dict(), other)
        change = {"model": {"teacher_weights": str(other)}}
    layers = [json.loads(json.dumps(base.to_dict())), change]
    cfg = build_config(layers)
    data = load_run_data(cfg)
    teacher, _ = build_teacher(cfg, data, "test")
    wanted = cache_header(cfg, data, "resnet_micro_cnn", tc.state_hash(teacher.model), teacher.prep.spec)
    with pytest.raises(UserError, match=field):
        tc.CachedTeacher(tmp_path / "c", wanted, torch.device("cpu"))


def test_a_cache_made_before_the_newer_augmentation_keys_still_fits(teacher_run: Path, tmp_path: Path) -> None:
    cfg = _cfg(teacher_run)
    data = load_run_data(cfg)
    teacher, _ = build_teacher(cfg, data, "test")
    header = cache_header(cfg, data, "resnet_micro_cnn", tc.state_hash(teacher.model), teacher.prep.spec)
    assert not {"crop_scale", "erase_prob", "randaugment"} & set(header)  # off: written as before they existed
    tc.check_header(header, header, tmp_path)
    cfg.data.crop_scale = 0.5
    on = cache_header(cfg, data, "resnet_micro_cnn", tc.state_hash(teacher.model), teacher.prep.spec)
    assert on["crop_scale"] == 0.5 and tc.header_digest(on) != tc.header_digest(header)
    with pytest.raises(UserError, match=r"crop_scale=None, this run has 0\.5"):
        tc.check_header(header, on, tmp_path)


def test_rewriting_with_other_topk_is_refused(teacher_run: Path, tmp_path: Path) -> None:
    cfg = _cfg(teacher_run)
    cache_teacher(cfg, str(tmp_path / "c"))
    cfg.cache.topk = 4
    with pytest.raises(UserError, match="topk"):
        cache_teacher(cfg, str(tmp_path / "c"))


def test_corrupt_shard_is_named(teacher_run: Path, tmp_path: Path) -> None:
    cfg = _cfg(teacher_run)
    cache_teacher(cfg, str(tmp_path / "c"))
    header = tc.read_header(tmp_path / "c")
    source = tc.CachedTeacher(tmp_path / "c", header, torch.device("cpu"))
    shard = tc.shard_path(tmp_path / "c", 1)
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the stored values
    shard.write_bytes(bytes(raw))
    idx = torch.arange(4)
    source(None, idx, 0)  # epoch 0 is intact
    with pytest.raises(UserError, match=r"epoch_0001\.safetensors.*corrupt"):
        source(None, idx, 1)
    # a new run names the bad shard before its first step, not at epoch 1; compare sees it unfinished
    with pytest.raises(UserError, match=r"epoch_0001\.safetensors' is corrupt \(checksum mismatch\)"):
        tc.CachedTeacher(tmp_path / "c", header, torch.device("cpu"))
    from vitdistill.compare import _cache_done

    assert not _cache_done(tmp_path / "c", 2)
    cache_teacher(cfg, str(tmp_path / "c"))  # rewrites the one bad shard
    assert _cache_done(tmp_path / "c", 2) and tc.CachedTeacher(tmp_path / "c", header, torch.device("cpu"))
    shard.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    with pytest.raises(UserError, match=r"epoch_0001\.safetensors.*corrupt"):
        tc.read_shard(shard, tc.header_digest(header), 1)


def test_cli_cached_distill_equals_online(teacher_run: Path, tmp_path: Path) -> None:
    common = ["--student", "deit_femto_distilled_patch4_16", "--method", "deit-hard", "--epochs", "2", *TINY]
    cache = tmp_path / "cache"
    r = run_cli("cache-teacher", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), "--epochs",
                "2", "--cache", str(cache), "--set", "cache.value_dtype=float32", *TINY)
    assert r.returncode == 0, r.stderr
    r = run_cli("distill", "--teacher-cache", str(cache), "--out", str(tmp_path / "cached"), *common)
    assert r.returncode == 0, r.stderr
    r = run_cli("distill", "--teacher", "resnet_micro_cnn", "--teacher-weights", str(teacher_run), "--out",
                str(tmp_path / "online"), *common)
    assert r.returncode == 0, r.stderr

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in ("img_s", "epoch_s")} for x in lines]

    # deit-hard needs only the teacher's argmax, which the stored log-probs preserve: identical runs
    assert rows("cached") == rows("online")
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["teacher_top1"] is not None and summary["teacher_cache"] == str(cache)
    # a run that needs more epochs than the cache holds is refused with exit 2 and one line
    r = run_cli("distill", "--teacher-cache", str(cache), "--out", str(tmp_path / "more"), *common, "--epochs", "3")
    assert r.returncode == 2 and "holds 2 epochs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "more").exists()


def test_a_header_without_the_fields_a_run_reads_is_named(tmp_path: Path) -> None:
    """Parsed JSON that is not a header cache-teacher wrote: one line, not a KeyError in the run."""
    (tmp_path / "c").mkdir()
    good = {"format": 2, "teacher": "t", "teacher_hash": "h", "num_samples": 8, "num_classes": 10, "topk": 10,
            "value_dtype": "float16", "epochs": 2, "seed": 0}
    (tmp_path / "c" / "header.json").write_text(json.dumps(good))
    assert tc.read_header(tmp_path / "c") == good
    for bad, says in [({k: v for k, v in good.items() if k != "epochs"}, "lacks 'epochs'"),
                      ({**good, "epochs": "2"}, "has a wrong str 'epochs'"),
                      ({**good, "num_classes": True}, "has a wrong bool 'num_classes'"),
                      ({**good, "topk": -1}, "has a wrong int 'topk'"),
                      ({**good, "value_dtype": "int8"}, "has a wrong str 'value_dtype'")]:
        (tmp_path / "c" / "header.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=f"is corrupt: it {re.escape(says)}; remove the folder"):
            tc.read_header(tmp_path / "c")


def test_fewer_epochs_on_an_interrupted_cache_write_only_those(teacher_run: Path, tmp_path: Path) -> None:
    """cache-teacher --epochs 1 on a cache planned for 3 of which none was written writes epoch 0
    only; the header keeps the 3, and a 3-epoch run names the missing shard before its first step."""
    cfg = _cfg(teacher_run)
    cfg.train.epochs = 3
    cache_teacher(cfg, str(tmp_path / "c"))
    for e in (0, 1, 2):
        tc.shard_path(tmp_path / "c", e).unlink()
    cfg.train.epochs = 1
    got = cache_teacher(cfg, str(tmp_path / "c"))
    assert got["written"] == 1 and got["epochs"] == 3
    assert [tc.shard_path(tmp_path / "c", e).exists() for e in (0, 1, 2)] == [True, False, False]
    header = tc.read_header(tmp_path / "c")
    with pytest.raises(UserError, match=r"epoch_0001\.safetensors' is missing"):
        tc.CachedTeacher(tmp_path / "c", header, torch.device("cpu"))


def test_a_cache_of_another_config_says_to_use_a_new_folder(teacher_run: Path, tmp_path: Path) -> None:
    cfg = _cfg(teacher_run)
    cache_teacher(cfg, str(tmp_path / "c"))
    cfg.data.pad = 1
    with pytest.raises(UserError, match=r"made for pad=\d+, this run has 1; write this config's cache into a new "
                                        r"--cache folder \(or delete this one\)"):
        cache_teacher(cfg, str(tmp_path / "c"))


def test_damaged_test_logits_are_named_and_rewritten(teacher_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = _cfg(teacher_run)
    cache = tmp_path / "c"
    cache_teacher(cfg, str(cache))
    path = cache / "test.safetensors"
    header = tc.read_header(cache)
    digest = tc.header_digest(header)
    source = tc.CachedTeacher(cache, header, torch.device("cpu"))
    good = source.test_logits()
    assert good is not None and good.shape == (64, 10)
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # inside the stored logits

    damages = [
        (lambda: path.write_bytes(raw[:500]), "is corrupt"),                                   # truncated
        (lambda: save_file({"other": good}, str(path), {"header": digest}), "is corrupt"),      # no 'logits'
        (lambda: save_file({"logits": good[:, 0].contiguous()}, str(path), {"header": digest}), r"of shape \[64\]"),
        (lambda: save_file({"logits": good[:, :3].contiguous()}, str(path), {"header": digest}), r"not float \[N, 10\]"),
        (lambda: save_file({"logits": good}, str(path), {"header": "0" * 64}), "another cache"),
        (lambda: path.write_bytes(bytes(flipped)), "checksum mismatch"),
    ]
    for damage, says in damages:
        damage()
        with pytest.raises(UserError, match=says):
            source.test_logits()
        cache_teacher(cfg, str(cache))  # cache-teacher rewrites what it cannot verify
        assert torch.equal(source.test_logits(), good)

    # from the command line: one line, exit 2, and no run folder left behind
    path.write_bytes(raw[:500])
    out = tmp_path / "run"
    r = run_cli("distill", "--teacher-cache", str(cache), "--student", "vit_femto_patch4_16", "--method", "logit-kd",
                "--epochs", "1", "--set", f"data.train_limit={LIMIT}", "--set", "data.test_limit=64", "--threads", "1",
                "--no-progress", "--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "test.safetensors' is corrupt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
