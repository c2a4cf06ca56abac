"""Tests of the run configuration: defaults, YAML and override layers, types, unknown keys, the
method section, safe YAML loading and the YAML round trip of a resolved config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitdistill.config import Config, build_config, load_yaml, parse_override
from vitdistill.errors import UserError


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults


def test_defaults():
    cfg = build_config([])
    assert cfg.to_dict() == Config().to_dict()
    assert cfg.data.source == "digits" and cfg.data.val_fraction == 0.1 and cfg.data.img_size is None
    assert cfg.model.student == "vit_femto_patch4_16" and cfg.model.teacher is None
    assert cfg.model.student_kwargs == {} and cfg.model.pretrained is False
    assert cfg.method == {"name": "none"}
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (10, 128, 1e-3)
    assert cfg.train.label_smoothing == 0.1 and cfg.train.clip_grad == 1.0 and cfg.train.amp == "auto"
    assert cfg.out is None
    assert set(cfg.to_dict()) == {"plugins", "data", "model", "method", "train", "cache", "synth", "out"}
    assert cfg.plugins == []
    assert (cfg.synth.images, cfg.synth.batch_size, cfg.synth.iters, cfg.synth.grey) == (2560, 256, 300, False)
    assert cfg.cache.dir is None and cfg.data.mix_prob == 0.0


def test_configs_do_not_share_mutable_defaults():
    a = build_config([{"method": {"name": "logit-kd", "alpha": 0.3}, "model": {"student_kwargs": {"depth": 2}}}])
    b = build_config([])
    assert b.method == {"name": "none"} and b.model.student_kwargs == {}
    assert a.method == {"name": "logit-kd", "alpha": 0.3}
    assert Config().method == {"name": "none"}


# ---------------------------------------------------------------- layers


def test_yaml_then_overrides_later_wins(tmp_path):
    path = write(tmp_path, """
data:
  source: digits
  img_size: 16
model:
  student: deit_femto_distilled_patch4_16
  teacher: resnet_micro_cnn
method:
  name: deit-soft
  tau: 2.0
train:
  epochs: 5
  lr: 0.01
out: runs/a
""")
    layers = [load_yaml(path), {"train": {"epochs": 7}}, parse_override("train.epochs=3"),
              parse_override("method.tau=1.5"), parse_override("out=runs/b")]
    cfg = build_config(layers)
    assert cfg.train.epochs == 3  # last layer wins
    assert cfg.train.lr == 0.01  # untouched by later layers
    assert cfg.method == {"name": "deit-soft", "tau": 1.5}
    assert cfg.data.img_size == 16 and cfg.model.teacher == "resnet_micro_cnn"
    assert cfg.out == "runs/b"
    # the same layers in the other order: the YAML wins
    assert build_config([parse_override("train.epochs=3"), load_yaml(path)]).train.epochs == 5


def test_a_layer_only_changes_what_it_names():
    cfg = build_config([{"train": {"batch_size": 16}}, {"train": {"epochs": 2}}])
    assert cfg.train.batch_size == 16 and cfg.train.epochs == 2 and cfg.train.lr == 1e-3


@pytest.mark.parametrize(
    "text,expected",
    [
        ("train.epochs=3", {"train": {"epochs": 3}}),
        ("train.lr=0.002", {"train": {"lr": 0.002}}),
        ("train.progress=false", {"train": {"progress": False}}),
        ("train.progress=true", {"train": {"progress": True}}),
        ("model.teacher=null", {"model": {"teacher": None}}),
        ("model.teacher=", {"model": {"teacher": None}}),
        ("model.student=vit_pico_patch4_32", {"model": {"student": "vit_pico_patch4_32"}}),
        ("data.source=imagefolder:/data/x", {"data": {"source": "imagefolder:/data/x"}}),
        ("out=a=b", {"out": "a=b"}),
        ("model.student_kwargs.depth=3", {"model": {"student_kwargs": {"depth": 3}}}),
        ("method=logit-kd", {"method": "logit-kd"}),
        (" train.seed =7", {"train": {"seed": 7}}),
        ("out=#x", {"out": "#x"}),  # YAML reads a comment here, and the value as null
        ("out=runs/a #2", {"out": "runs/a #2"}),
        ("out=runs/a#2", {"out": "runs/a#2"}),
    ],
)
def test_parse_override_types(text, expected):
    assert parse_override(text) == expected


def test_parse_override_types_survive_build_config():
    cfg = build_config([parse_override(s) for s in (
        "train.epochs=3", "train.lr=0.002", "train.progress=false", "train.clip_grad=null",
        "model.student_kwargs.depth=3", "model.student_kwargs.embed_dim=32", "data.img_size=24",
    )])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.002 and cfg.train.progress is False and cfg.train.clip_grad is None
    assert cfg.model.student_kwargs == {"depth": 3, "embed_dim": 32}  # nested keys merge
    assert cfg.data.img_size == 24


def test_parse_override_without_equals_is_a_user_error():
    with pytest.raises(UserError, match="key.path=value"):
        parse_override("train.epochs")


def test_scientific_notation_is_a_float(tmp_path):
    assert parse_override("train.lr=1e-3") == {"train": {"lr": 0.001}}
    assert build_config([load_yaml(write(tmp_path, "train:\n  min_lr: 5e-6\n"))]).train.min_lr == 5e-6


def test_an_unset_min_lr_follows_a_small_lr_and_a_set_one_is_kept():
    # the default floor (1e-5) sits above --lr 1e-6: it follows lr down instead of failing
    assert build_config([{"train": {"lr": 1e-6}}]).train.min_lr == pytest.approx(1e-8)
    assert build_config([{"train": {"lr": 1e-3}}]).train.min_lr == 1e-5  # the default where it fits
    with pytest.raises(UserError, match="above train.lr"):  # one the user set is theirs: still an error
        build_config([{"train": {"lr": 1e-6}}, {"train": {"min_lr": 1e-5}}])


# ---------------------------------------------------------------- unknown keys and types


def test_unknown_top_level_key_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown config key 'trian'.*did you mean 'train'") as info:
        build_config([{"trian": {"epochs": 1}}])
    assert "top level" in str(info.value)


def test_unknown_section_key_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown config key 'train\.epoch'.*did you mean 'epochs'") as info:
        build_config([{"train": {"epoch": 1}}])
    assert "batch_size" in str(info.value)  # the known keys of the section are listed
    with pytest.raises(UserError, match=r"'model\.studnet'.*did you mean 'student'"):
        build_config([parse_override("model.studnet=x")])


@pytest.mark.parametrize(
    "layer",
    [
        {"train": {"epochs": "three"}},
        {"train": {"epochs": 2.5}},
        {"train": {"epochs": True}},  # a bool is not an int here
        {"train": {"lr": "fast"}},
        {"train": {"lr": False}},
        {"train": {"progress": "yes please"}},
        {"data": {"img_size": 16.0}},
        {"data": {"source": 5}},
        {"out": 3},
        {"model": {"student_kwargs": 3}},
        {"train": 3},
        {"method": ["logit-kd"]},
        {"method": {"name": 5}},
    ],
)
def test_wrong_type_is_a_user_error(layer):
    with pytest.raises(UserError):
        build_config([layer])


def test_wrong_type_message_names_the_key_and_the_type():
    with pytest.raises(UserError, match=r"'train\.epochs' expects int, got 'three'"):
        build_config([{"train": {"epochs": "three"}}])


def test_int_is_accepted_for_a_float_field():
    cfg = build_config([{"train": {"lr": 1, "clip_grad": 2, "warmup_epochs": 0}}])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.clip_grad == 2.0 and isinstance(cfg.train.clip_grad, float)
    assert isinstance(cfg.train.warmup_epochs, float)


def test_optional_fields_take_none():
    cfg = build_config([{"train": {"clip_grad": None, "threads": None}, "data": {"pad": None}}])
    assert cfg.train.clip_grad is None and cfg.train.threads is None and cfg.data.pad is None


# ---------------------------------------------------------------- method section


def test_method_as_a_plain_name():
    assert build_config([{"method": "logit-kd"}]).method == {"name": "logit-kd"}


def test_method_knobs_are_kept_and_merged():
    cfg = build_config([{"method": {"name": "logit-kd", "alpha": 0.3}}, {"method": {"tau": 2.0}},
                        parse_override("method.name=logit-kd")])
    assert cfg.method == {"name": "logit-kd", "alpha": 0.3, "tau": 2.0}


def test_switching_method_drops_the_previous_knobs():
    cfg = build_config([{"method": {"name": "logit-kd", "alpha": 0.3, "tau": 2.0}}, {"method": "deit-hard"}])
    assert cfg.method == {"name": "deit-hard"}
    cfg = build_config([{"method": {"name": "logit-kd", "tau": 2.0}}, parse_override("method.name=deit-soft"),
                        parse_override("method.alpha=0.2")])
    assert cfg.method == {"name": "deit-soft", "alpha": 0.2}


def test_knobs_given_before_any_name_stay_with_the_method_named_later():
    # a file's knobs with no name, then --method on the command line: the knobs are the file's intent
    cfg = build_config([{"method": {"tau": 4.0, "alpha": 0.9}}, {"method": {"name": "logit-kd"}}])
    assert cfg.method == {"name": "logit-kd", "tau": 4.0, "alpha": 0.9}
    cfg = build_config([{"method": {"tau": 4.0}}, {"method": "dkd"}, {"method": {"name": "dist"}}])
    assert cfg.method == {"name": "dist"}  # once named, another name still starts afresh


# ---------------------------------------------------------------- load_yaml


def test_load_yaml_reads_a_mapping_and_an_empty_file(tmp_path):
    assert load_yaml(write(tmp_path, "train:\n  epochs: 2\n")) == {"train": {"epochs": 2}}
    assert load_yaml(write(tmp_path, "", "empty.yaml")) == {}


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read config"):
        load_yaml(tmp_path / "missing.yaml")


def test_load_yaml_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="not valid YAML") as info:
        load_yaml(write(tmp_path, "train: [1, 2\n  epochs: 3\n"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["train:\n  ? [a, b]\n  : 1\n", "? {a: 1}\n: 2\n"])
def test_load_yaml_refuses_a_list_or_mapping_as_a_key(tmp_path, text):
    with pytest.raises(UserError, match="a key must be a name") as info:
        load_yaml(write(tmp_path, text))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_load_yaml_refuses_anything_but_a_mapping(tmp_path, text):
    with pytest.raises(UserError, match="must be a mapping"):
        load_yaml(write(tmp_path, text))


def test_load_yaml_never_executes_python_tags(tmp_path):
    marker = tmp_path / "executed"
    path = write(tmp_path, f'out: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError):
        load_yaml(path)
    assert not marker.exists()
    path = write(tmp_path, 'out: !!python/object/apply:os.system ["echo hi"]\n', "echo.yaml")
    with pytest.raises(UserError):
        load_yaml(path)


# ---------------------------------------------------------------- round trip


def test_to_yaml_round_trips():
    cfg = build_config([
        {"data": {"source": "imagefolder:/tmp/x", "img_size": 24, "hflip": False, "train_limit": 100},
         "model": {"student": "deit_femto_distilled_patch4_16", "teacher": "resnet_micro_cnn",
                   "teacher_weights": "runs/t", "student_kwargs": {"depth": 2, "drop_path_rate": 0.1}},
         "method": {"name": "deit-soft", "alpha": 0.2, "tau": 1.0},
         "train": {"epochs": 2, "lr": 5e-4, "min_lr": 1e-6, "clip_grad": None, "threads": 1},
         "out": "runs/x"},
    ])
    text = cfg.to_yaml()
    again = build_config([yaml.safe_load(text)])
    assert again.to_dict() == cfg.to_dict()
    assert again.train.min_lr == 1e-6 and isinstance(again.train.min_lr, float)
    assert build_config([yaml.safe_load(Config().to_yaml())]).to_dict() == Config().to_dict()


def test_to_yaml_via_a_file(tmp_path):
    cfg = build_config([parse_override("train.epochs=4"), parse_override("method=logit-kd"),
                        parse_override("method.alpha=0.7")])
    path = write(tmp_path, cfg.to_yaml())
    assert build_config([load_yaml(path)]).to_dict() == cfg.to_dict()
