"""Plugins: a method and a model from outside the package, by ``--plugin``, the config's
``plugins:`` and an installed entry point; the example method's loss against its equation."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY, check_distill_and_resume, distill_args, run_cli, run_cli_fast
from vitdistill import plugins
from vitdistill.methods import METHODS

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugins" / "logit_l2.py"


@pytest.fixture
def registry():
    """What a test's plugins register is taken away after it: other tests see the built-ins only."""
    items, loaded = dict(METHODS._items), dict(plugins._loaded)
    yield
    METHODS._items.clear()
    METHODS._items.update(items)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    for name in [n for n in sys.modules if n.startswith("vitdistill_plugin_")]:
        del sys.modules[name]


def test_the_example_loss_matches_its_equation(registry) -> None:
    plugins.load_plugins([str(EXAMPLE)])
    method = METHODS.get("logit-l2")(alpha=0.3)
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 6, 2, 1])
    s, t = z_s.numpy(), z_t.numpy()
    sc, tc = s - s.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    match = 0.5 * ((sc - tc) ** 2).sum(1).mean()  # 1/(2B) sum_b ||z'_s - z'_t||^2
    logp = s - np.log(np.exp(s).sum(1, keepdims=True))
    ce = -logp[np.arange(5), y.numpy()].mean()
    out = method({"logits": z_s}, {"logits": z_t}, y)
    assert out["match"].item() == pytest.approx(match, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.7 * ce + 0.3 * match, rel=1e-6)
    # blind to a constant per sample on the teacher (a cache hands over log-probabilities)
    shifted = method({"logits": z_s}, {"logits": z_t + torch.arange(5.0, dtype=torch.float64)[:, None]}, y)
    assert shifted["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-9)
    # a distillation-token student: the mean of the two heads' losses
    two = method({"logits": z_s, "dist_logits": z_t}, {"logits": z_t}, y)
    assert two["match"].item() == pytest.approx(match / 2, rel=1e-6)


def test_a_plugin_method_distills_resumes_and_is_listed(registry, tmp_path: Path, teacher_run: Path) -> None:
    args = distill_args("logit-l2", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run, "--plugin", str(EXAMPLE))
    summary = check_distill_and_resume(tmp_path, args)  # once in a new process, once here (stopped, resumed)
    assert summary["method"] == "logit-l2" and 0 < summary["student_top1"] <= 1
    saved = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert saved["plugins"] == [str(EXAMPLE)]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_match"] > 0 and r["loss_ce"] > 0 for r in rows)  # the plugin's parts, logged
    r = run_cli_fast("methods", "--plugin", str(EXAMPLE))
    assert "logit-l2" in r.stdout and f"plugin: {EXAMPLE}" in r.stdout
    # a grid names it in the config's plugins: list, by a path relative to where compare runs
    (tmp_path / "grid.yaml").write_text(
        f"plugins: [{os.path.relpath(EXAMPLE)}]\n"
        f"model: {{teacher: resnet_micro_cnn, teacher_weights: {teacher_run}}}\n"
        "compare: {seeds: [0], cells: [{method: none}, {method: logit-l2, knobs: {alpha: 0.7}}]}\n")
    r = run_cli_fast("compare", "--config", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "g"), "--dry-run")
    assert r.returncode == 0 and "distill logit-l2 (alpha=0.7)" in r.stdout, r.stdout + r.stderr


MODEL_PLUGIN = '''
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer


@register_model
def vit_plugin_tiny(pretrained=False, **kwargs):  # as timm's own entry points are written
    args = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, **kwargs}
    return build_model_with_cfg(VisionTransformer, "vit_plugin_tiny", pretrained, **args)
'''


def test_a_plugin_model_trains_and_a_new_process_finds_it_from_the_run(registry, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodels.py").write_text(MODEL_PLUGIN)
    out = tmp_path / "run"
    # as a module on the path, not a file: the saved config names the module (timm keeps the model
    # registered in this process afterwards, under a name no other test uses)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    r = run_cli_fast("train", "--plugin", "mymodels", "--model", "vit_plugin_tiny", "--epochs", "1", *TINY,
                     "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["plugins"] == ["mymodels"]
    top1 = json.loads((out / "summary.json").read_text())["student_top1"]
    r = run_cli("eval", "--student", str(out), env={"PYTHONPATH": str(tmp_path)})  # no --plugin: the run's
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(top1)
    r = run_cli("eval", "--student", str(out))  # the module is gone from the path: one line
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "plugin 'mymodels' cannot be imported (No module named 'mymodels')" in r.stderr


def test_an_installed_entry_point_is_loaded(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "mykd-0.1.dist-info").mkdir(parents=True)
    (site / "mykd-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mykd\nVersion: 0.1\n")
    (site / "mykd-0.1.dist-info" / "entry_points.txt").write_text("[vitdistill.plugins]\nl2 = mykd_l2\n")
    (site / "mykd_l2.py").write_text(EXAMPLE.read_text())
    r = run_cli("methods", env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    assert "logit-l2" in r.stdout and "plugin: " + str(site / "mykd_l2.py") in r.stdout
    (site / "mykd_l2.py").write_text("raise RuntimeError('broken on purpose')\n")
    r = run_cli("distill", "--help", env={"PYTHONPATH": str(site)})  # --help loads nothing
    assert r.returncode == 0
    r = run_cli("train", "--epochs", "1", "--out", str(tmp_path / "x"), env={"PYTHONPATH": str(site)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert ("the entry point 'l2 = mykd_l2' of group vitdistill.plugins failed on import: RuntimeError: broken on "
            "purpose; fix or uninstall the package that provides l2") in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("plugin, says", [
    ("missing.py", "plugin file '{tmp}/missing.py' does not exist; check the path"),
    ("no_such_module_xyz", "plugin 'no_such_module_xyz' cannot be imported (No module named 'no_such_module_xyz')"),
    ("raises.py", "plugin '{tmp}/raises.py' failed on import: ZeroDivisionError: division by zero; fix the file"),
    ("clash.py", "failed on import: ValueError: method 'logit-kd' is registered twice"),
    ("exits.py", "plugin '{tmp}/exits.py' called sys.exit(0) on import; a plugin must not exit"),
    # a folder: by path it was a file that "does not exist"; by name, a module that cannot be found
    ("kd/", "plugin '{tmp}/kd' is a folder; name the .py file in it"),
    ("kd", "'kd' is a folder here: name the .py file in it"),
])
def test_bad_plugins_are_one_line(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugin: str,
                                  says: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raises.py").write_text("1 / 0\n")
    (tmp_path / "kd").mkdir()
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "clash.py").write_text(EXAMPLE.read_text().replace('register("logit-l2")', 'register("logit-kd")'))
    for args in (["methods", "--plugin", plugin],
                 ["train", "--epochs", "1", "--out", "r", "--set", f"plugins=[{plugin}]"]):
        r = run_cli_fast(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert says.format(tmp=tmp_path.resolve()) in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()
    r = run_cli_fast("train", "--epochs", "1", "--out", "r", "--set", "plugins={a: 1}")
    assert r.returncode == 2 and "config key 'plugins' expects a list of module names or .py files" in r.stderr


def test_a_plugin_method_that_fails_to_start_is_one_line(registry, tmp_path: Path) -> None:
    plugin = tmp_path / "bad_init.py"
    plugin.write_text(EXAMPLE.read_text().replace('register("logit-l2")', 'register("bad-init")').replace(
        'name = "logit-l2"', 'name = "bad-init"').replace("super().__init__(", "raise RuntimeError('no kernel')\n"
                                                          "        super().__init__("))
    r = run_cli_fast("distill", "--plugin", str(plugin), "--student", "vit_femto_patch4_16", "--method", "bad-init",
                     "--epochs", "1", "--out", str(tmp_path / "r"), *TINY)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "method 'bad-init' failed to start: RuntimeError: no kernel (at " in r.stderr
    assert f"{plugin}:" in r.stderr and r.stderr.rstrip().endswith("fix the plugin")
    assert not (tmp_path / "r").exists()
