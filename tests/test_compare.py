"""`vitdistill compare`: a tiny grid end to end (interrupted, resumed, rerun), the leaderboard's
figures against the runs' summaries, the HTML rendered by headless Chromium, and bad input."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli_fast
from vitdistill.cli import main
from vitdistill.compare import parse_spec
from vitdistill.errors import UserError
from vitdistill.report.leaderboard import CSV_COLUMNS, build_rows, write_leaderboard
from vitdistill.report.plots import pareto_front

CONFIG = """
data: {source: digits, train_limit: 256, test_limit: 128}
train: {epochs: 2, batch_size: 64, threads: 1, progress: false, warmup_epochs: 0.5}
compare:
  seeds: [0, 1]
  teacher: {model: resnet_micro_cnn, epochs: 2, lr: 0.003}
  teacher_cache: true
  cells:
    - {method: none, student: vit_femto_patch4_16}
    - {method: deit-hard, student: deit_femto_distilled_patch4_16}
    - {method: logit-kd, student: vit_femto_patch4_16, knobs: {tau: 2.0}, label: logit-kd-t2}
"""
CELLS = ["none", "deit-hard", "logit-kd-t2"]
TIMING = ("img_s", "epoch_s")
PNGS = ["accuracy_vs_latency.png", "accuracy_vs_params.png", "learning_curves.png"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The grid run twice: first stopped after one epoch per run, then finished by resuming."""
    root = tmp_path_factory.mktemp("compare")
    (root / "grid.yaml").write_text(CONFIG)
    out = root / "out"
    args = ["compare", "--config", str(root / "grid.yaml"), "--out", str(out)]
    r = run_cli_fast(*args, "--set", "train.stop_after=1")
    assert r.returncode == 0, r.stderr
    first = out / "cells" / "none" / "seed0"
    assert (first / "checkpoint.pt").exists() and not (first / "summary.json").exists()
    assert (out / "teacher" / "checkpoint.pt").exists() and not (out / "teacher" / "summary.json").exists()
    epoch1 = (first / "metrics.jsonl").read_text().splitlines()
    assert len(epoch1) == 1 and "wait deit-hard seed 0" in r.stdout

    r = run_cli_fast(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("(resume)") == 3  # the teacher and the two no-KD runs
    lines = (first / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == epoch1[0]  # continued, not restarted
    return out


def _summaries(out: Path, label: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells" / label).glob("seed*/summary.json"))]


def test_leaderboard_matches_the_runs(grid: Path) -> None:
    for name in ["leaderboard.csv", "leaderboard.md", "leaderboard.html", *PNGS]:
        assert (grid / name).stat().st_size > 0, name
    for name in PNGS:
        assert (grid / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(grid / "leaderboard.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = {r["label"]: r for r in reader}
    assert set(rows) == {*CELLS, "teacher"} and rows["teacher"]["role"] == "teacher"
    teacher_top1 = json.loads((grid / "teacher" / "summary.json").read_text())["student_top1"]
    teacher_ece = json.loads((grid / "teacher" / "summary.json").read_text())["student_ece"]
    assert float(rows["teacher"]["top1_mean"]) == pytest.approx(teacher_top1)
    assert float(rows["teacher"]["ece"]) == pytest.approx(teacher_ece)  # the teacher trained here: its own
    base = statistics.fmean(s["student_top1"] for s in _summaries(grid, "none"))
    for label in CELLS:
        runs = _summaries(grid, label)
        top1 = [s["student_top1"] for s in runs]
        row = rows[label]
        assert int(row["n_seeds"]) == 2
        assert float(row["top1_mean"]) == pytest.approx(statistics.fmean(top1), abs=1e-8)
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(top1), abs=1e-8)
        assert float(row["gain_pts"]) == pytest.approx(100 * (statistics.fmean(top1) - base), abs=1e-6)
        assert float(row["kept"]) == pytest.approx(statistics.fmean(top1) / teacher_top1, abs=1e-6)
        assert int(row["params"]) == runs[0]["params"]
        assert float(row["wall_s"]) == pytest.approx(statistics.fmean(s["wall_s"] for s in runs), abs=1e-6)
        assert float(row["ece"]) == pytest.approx(statistics.fmean(s["student_ece"] for s in runs), abs=1e-8)
    assert rows["none"]["agreement"] == "" and 0 <= float(rows["deit-hard"]["agreement"]) <= 1
    # both logit-only cells replayed the one cache of their seed
    caches = {json.loads((grid / "cells" / c / "seed0" / "summary.json").read_text())["teacher_cache"]
              for c in ("deit-hard", "logit-kd-t2")}
    assert len(caches) == 1 and len(list((grid / "caches").glob("*/seed*"))) == 2
    assert [int(r["rank"]) for r in sorted(rows.values(), key=lambda r: -float(r["top1_mean"]))] == [1, 2, 3, 4]
    assert "★" in (grid / "leaderboard.md").read_text()


def test_rerun_trains_nothing_and_report_only_rebuilds(grid: Path, capsys: pytest.CaptureFixture) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in grid.glob("**/summary.json")}
    assert len(stamps) == 7
    assert main(["compare", "--config", str(grid.parent / "grid.yaml"), "--out", str(grid)]) == 0
    text = capsys.readouterr().out
    assert text.count("skip") == 7 and "start" not in text and "note:" not in text
    assert {p: p.stat().st_mtime_ns for p in grid.glob("**/summary.json")} == stamps
    (grid / "leaderboard.csv").unlink()
    assert main(["compare", "--out", str(grid), "--report-only"]) == 0
    assert (grid / "leaderboard.csv").exists()
    assert main(["compare", "--config", str(grid.parent / "grid.yaml"), "--out", str(grid), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("[done]") == 7
    # a finished teacher under another config is said, dry or not: every distilled run learnt from it
    for extra in (["--dry-run"], []):
        assert main(["compare", "--config", str(grid.parent / "grid.yaml"), "--out", str(grid),
                     "--set", "compare.teacher.epochs=3", *extra]) == 0
        said = capsys.readouterr().out
        assert said.count("note:") == 1 and "note: the teacher" in said and "train.epochs" in said, said
    assert {p: p.stat().st_mtime_ns for p in grid.glob("**/summary.json")} == stamps


def test_leaderboard_holds_only_the_grids_cells_and_seeds(grid: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Folders of a cell or seed since dropped from the grid stay on disk but out of the board,
    and the report says which; damaged files of a run are one-line errors."""
    out = tmp_path / "g"
    shutil.copytree(grid, out)
    _fake_run(out, "dropped", 0, student_top1=0.99, method="none", student="x")
    _fake_run(out, "none", 7, student_top1=0.99, method="none", student="vit_femto_patch4_16")
    assert main(["compare", "--out", str(out), "--report-only"]) == 0
    said = capsys.readouterr().out
    assert "left out, not in the grid of" in said and "cells/dropped, cells/none/seed7" in said
    with open(out / "leaderboard.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == {*CELLS, "teacher"} and rows["none"]["n_seeds"] == "2"
    assert float(rows["none"]["top1_mean"]) < 0.99
    # the grid continued in the copy (nothing left to train) keeps knowing where its runs were made
    assert main(["compare", "--config", str(grid.parent / "grid.yaml"), "--out", str(out)]) == 0
    assert json.loads((out / "compare.json").read_text())["was"] == [str(grid.resolve())]
    with open(out / "leaderboard.csv") as f:
        assert {r["label"] for r in csv.DictReader(f)} == {*CELLS, "teacher"}
    capsys.readouterr()
    for path, text, says in [("cells/none/seed0/summary.json", '{"student_top1": ', "(not JSON)"),
                             ("cells/none/seed0/summary.json", '{"method": "none"}', "(no student_top1)"),
                             ("cells/none/seed1/metrics.jsonl", '{"epoch": 1}\n{"epo', "(line 2 is not an epoch"),
                             ("compare.json", "[]", "compare.json' is damaged; delete it and rerun")]:
        good = (out / path).read_text()
        (out / path).write_text(text)
        for args in (["--out", str(out), "--report-only"],
                     ["--config", str(grid.parent / "grid.yaml"), "--out", str(out)]):
            r = run_cli_fast("compare", *args)
            if path == "compare.json" and "--config" in args:
                assert r.returncode == 0  # a rerun writes it again
                continue
            assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
        (out / path).write_text(good)


def test_a_half_done_grid_copied_elsewhere_resumes_there(tmp_path: Path) -> None:
    """A grid stopped mid-way, then copied: its distilling run resumes in the copy (its config named
    the old teacher and cache paths), the caches are reused under their first names, nothing notes
    a changed config, and the finished run equals one that never moved."""
    (tmp_path / "grid.yaml").write_text(
        "data: {source: digits, train_limit: 192, test_limit: 96}\n"
        "train: {epochs: 2, batch_size: 64, threads: 1, progress: false, warmup_epochs: 0.5}\n"
        "compare:\n  seeds: [0]\n  teacher: {model: resnet_micro_cnn, epochs: 1}\n  teacher_cache: true\n"
        "  cells: [{method: logit-kd, student: vit_femto_patch4_16}]\n")
    first, copy = tmp_path / "first", tmp_path / "elsewhere" / "copy"
    args = ["compare", "--config", str(tmp_path / "grid.yaml")]
    r = run_cli_fast(*args, "--out", str(first), "--set", "train.stop_after=1")
    assert r.returncode == 0, r.stderr
    run = Path("cells/logit-kd/seed0")
    assert (first / run / "checkpoint.pt").exists() and not (first / run / "summary.json").exists()
    caches = sorted(p.relative_to(first) for p in (first / "caches").glob("*/seed0"))
    shutil.copytree(first, copy)
    r = run_cli_fast(*args, "--out", str(copy))
    assert r.returncode == 0, r.stderr
    assert "start logit-kd seed 0: distill vit_femto_patch4_16 (resume)" in r.stdout, r.stdout
    assert "cache: skip" in r.stdout and "note:" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert sorted(p.relative_to(copy) for p in (copy / "caches").glob("*/seed0")) == caches  # none written anew
    saved = (copy / run / "config.yaml").read_text()
    assert str(copy.resolve() / "teacher") in saved and str(first.resolve()) not in saved
    # the same grid finished where it began: the same metrics, epoch for epoch
    r = run_cli_fast(*args, "--out", str(first))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (first / run / "metrics.jsonl").read_text().splitlines()]
    moved = [json.loads(line) for line in (copy / run / "metrics.jsonl").read_text().splitlines()]
    drop = ("epoch_s", "img_s", "wall_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in moved] == \
        [{k: v for k, v in m.items() if k not in drop} for m in lines] and len(lines) == 2
    # and the copy, run again, is done and says nothing changed
    r = run_cli_fast(*args, "--out", str(copy), "--dry-run")
    assert r.returncode == 0 and r.stdout.count("[done]") == 2 and "note:" not in r.stdout, r.stdout


def test_html_renders_in_headless_chromium(grid: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("VITDISTILL_SKIP_BROWSER") == "1":
            pytest.skip("VITDISTILL_SKIP_BROWSER=1")
        pytest.fail("chromium is not installed; run `make test`, which installs it (or set VITDISTILL_SKIP_BROWSER=1)")
    html = (grid / "leaderboard.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                        (grid / "leaderboard.html").resolve().as_uri()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '<table id="leaderboard">' in r.stdout and "logit-kd-t2" in r.stdout
    assert 'data-images-loaded="3"' in r.stdout


def _fake_run(out: Path, label: str, seed: int, **summary: object) -> None:
    d = out / "cells" / label / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": summary["student_top1"]}) + "\n")


def test_gain_kept_and_bands_by_hand(tmp_path: Path) -> None:
    t = {"teacher": "big", "teacher_top1": 0.8}
    _fake_run(tmp_path, "none", 0, method="none", student="s", student_top1=0.5, latency_ms_b1=1.5)
    _fake_run(tmp_path, "none", 1, method="none", student="s", student_top1=0.7, latency_ms_b1=1.5)
    _fake_run(tmp_path, "kd", 0, method="logit-kd", student="s", student_top1=0.64, latency_ms_b1=1.9, **t)
    _fake_run(tmp_path, "kd-big", 0, method="logit-kd", student="b", student_top1=0.72, latency_ms_b1=3.0, **t)
    rows = {r["label"]: r for r in build_rows(tmp_path)[0]}
    assert rows["none"]["top1_mean"] == pytest.approx(0.6) and rows["none"]["top1_std"] == pytest.approx(0.1414213562)
    # the gain is paired by seed: kd finished seed 0 only, so it is 64 - 50, not 64 - mean(50, 70)
    assert rows["kd"]["gain_pts"] == pytest.approx(14.0) and rows["kd"]["kept"] == pytest.approx(0.8)
    assert rows["kd"]["gain_seeds"] == 1 and rows["none"]["gain_seeds"] == 2
    assert rows["kd-big"]["gain_pts"] == pytest.approx(22.0)  # no baseline of its student: the first one
    assert rows["none"]["kept"] == pytest.approx(0.75)  # the main teacher for a no-KD cell
    assert rows["teacher"]["top1_mean"] == pytest.approx(0.8) and rows["teacher"]["role"] == "teacher"
    assert [rows[x]["latency_band"] for x in ("none", "kd", "kd-big")] == ["[1,2)", "[1,2)", "[2,4)"]
    assert rows["kd"]["best_in_band"] and not rows["none"]["best_in_band"] and rows["kd-big"]["best_in_band"]
    assert [r["label"] for r in build_rows(tmp_path)[0]] == ["teacher", "kd-big", "kd", "none"]


def test_gain_confidence_interval_is_paired_by_seed(tmp_path: Path) -> None:
    # no-KD 50/70/60 %, KD 54/73/66 %: per-seed gains 4, 3, 6 points; mean 4.333, s = sqrt(7/3);
    # t(0.975, 2 df) = 4.302652729911275 from a t table; half-width t * s / sqrt(3)
    for seed, (base, kd) in enumerate([(0.50, 0.54), (0.70, 0.73), (0.60, 0.66)]):
        _fake_run(tmp_path, "none", seed, method="none", student="s", student_top1=base)
        _fake_run(tmp_path, "kd", seed, method="logit-kd", student="s", student_top1=kd, teacher="t", teacher_top1=0.8)
    _fake_run(tmp_path, "kd", 7, method="logit-kd", student="s", student_top1=0.99, teacher="t")  # no pair: unused
    _fake_run(tmp_path, "one", 0, method="dist", student="s", student_top1=0.55, teacher="t")
    rows = {r["label"]: r for r in build_rows(tmp_path)[0]}
    half = 4.302652729911275 * math.sqrt(7 / 3) / math.sqrt(3)
    assert rows["kd"]["gain_ci95_lo"] == pytest.approx(13 / 3 - half, abs=1e-4)
    assert rows["kd"]["gain_ci95_hi"] == pytest.approx(13 / 3 + half, abs=1e-4)
    # a seed the no-KD cell lacks moves neither the gain nor its interval: both are on the paired seeds
    assert rows["kd"]["gain_pts"] == pytest.approx(13 / 3) and rows["kd"]["gain_seeds"] == 3
    assert rows["kd"]["top1_mean"] == pytest.approx((0.54 + 0.73 + 0.66 + 0.99) / 4)
    assert rows["one"]["gain_ci95_lo"] is None  # one paired seed: no interval
    assert rows["none"]["gain_ci95_lo"] is None and rows["teacher"]["gain_ci95_hi"] is None
    write_leaderboard(tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    assert f"[{13 / 3 - half:+.2f}, {13 / 3 + half:+.2f}]" in md and "gain 95% CI (pts)" in md
    assert "+4.33 (3 paired)" in md
    assert re.search(r"\| none +\| none .*\| \+0\.00 +\|", md)  # the no-KD cell: all its seeds, no note


def test_a_row_per_teacher_of_a_multi_teacher_cell(tmp_path: Path) -> None:
    """Co-advise's two teachers each get their own row; the CNN one is the same teacher as the
    logit cell's (same name and weights), so its row counts both runs."""
    cnn, inv = str(tmp_path / "cnn"), str(tmp_path / "inv")
    _fake_run(tmp_path, "kd", 0, method="logit-kd", student="s", student_top1=0.6, teacher="cnn", teacher_top1=0.8)
    (tmp_path / "cells" / "kd" / "seed0" / "config.yaml").write_text(
        f"model: {{teacher: cnn, teacher_weights: {cnn}}}\n")
    _fake_run(tmp_path, "co", 0, method="co-advise", student="s", student_top1=0.65, teacher="cnn,inv",
              teacher_top1=0.7, teachers=[{"model": "cnn", "weights": cnn, "top1": 0.7, "params": 10},
                                          {"model": "inv", "weights": inv, "top1": 0.5, "params": 20}])
    rows = build_rows(tmp_path)[0]
    teachers = {r["student"]: r for r in rows if r["role"] == "teacher"}
    assert set(teachers) == {"cnn", "inv"}
    assert teachers["cnn"]["top1_mean"] == pytest.approx(0.75) and teachers["inv"]["top1_mean"] == pytest.approx(0.5)
    assert teachers["inv"]["params"] == 20


def test_pareto_front() -> None:
    # (cost, accuracy): b beats a (cheaper, as good); d is dominated by c; ties on cost keep the best
    pts = [(2.0, 0.5), (1.0, 0.5), (3.0, 0.9), (4.0, 0.8), (3.0, 0.7)]
    assert pareto_front(pts) == [1, 2]


def test_spec_validation() -> None:
    cells = [{"method": "none"}, {"method": "logit-kd", "student": "a"}, {"method": "logit-kd", "student": "b"}]
    spec = parse_spec({"seeds": 3, "cells": cells, "teacher": "resnet_micro_cnn"}, "vit_femto_patch4_16")
    assert spec.seeds == [3] and spec.teacher["model"] == "resnet_micro_cnn"
    assert [c.label for c in spec.cells] == ["none", "logit-kd-a", "logit-kd-b"]
    spec = parse_spec({"cells": [{"method": "none", "set": {"train.lr": 0.01, "data.mix_prob": 0.5}}]}, "s")
    assert spec.cells[0].overrides == {"train": {"lr": 0.01}, "data": {"mix_prob": 0.5}}
    for bad, says in [({"cells": [{"method": "none", "lable": "x"}]}, "did you mean 'label'"),
                      ({"cells": [{"method": "none"}, {"method": "none"}]}, "share the label"),
                      ({"seeds": [], "cells": [{"method": "none"}]}, "compare.seeds"),
                      ({"cells": [{"method": "none", "label": "a/b"}]}, "names a folder"),
                      (None, "no 'compare:' section")]:
        with pytest.raises(UserError, match=says):
            parse_spec(bad, "s")


@pytest.mark.parametrize("cells, says", [
    ("[]", "'compare.cells' is empty"),
    ("[{method: logit-kdd}]", "unknown method 'logit-kdd' (did you mean 'logit-kd'?)"),
    ("[{method: none, student: vit_femtoo_patch4_16}]", "unknown model 'vit_femtoo_patch4_16'"),
    ("[{method: logit-kd, knobs: {taux: 1}}]", "has no knob 'taux'"),
])
def test_bad_grid_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, cells: str, says: str) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    code = main(["compare", "--config", str(tmp_path / "c.yaml"), "--set", f"compare.cells={cells}", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and says in err and err.count("\n") == 1


@pytest.mark.parametrize("sets, says", [
    (["compare.cells=[{method: none}, {method: logit-kd, teacher: resnet_micro_cnnn, teacher_weights: x}]"],
     "cell 'logit-kd': unknown model 'resnet_micro_cnnn' (did you mean 'resnet_micro_cnn'?)"),
    (["compare.cells=[{method: none}, {method: deit-hard, student: vit_femto_patch4_16}]"],
     "cell 'deit-hard': method 'deit-hard' needs a student with a distillation token"),
    (["compare.cells=[{method: none}, {method: co-advise}]"],
     "cell 'co-advise': method 'co-advise' needs 2 teachers and got 1 teacher;"),
    (["compare.teacher.model=resnet_micro_cnnx"], "the compare teacher: unknown model 'resnet_micro_cnnx'"),
    (["compare.teacher.weights=nope.safetensors"], "the compare teacher: weights file 'nope.safetensors' does not"),
    (["data.source=imagefolder:nope"], "the compare teacher: data path 'nope' does not exist"),
    (["compare.cells=[{method: none}, {method: manifold, knobs: {student_layers: [9], teacher_layers: [0]}}]"], "cell 'manifold': layer 9 does not exist in 'vit_femto_patch4_16'"),
])
def test_a_cell_that_cannot_run_stops_the_grid_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              sets: list[str], says: str) -> None:
    """What the run would refuse at its start is refused for every cell before the first run trains,
    in a dry run as in a real one, and the real one leaves no folder behind."""
    (tmp_path / "c.yaml").write_text(CONFIG)
    out = tmp_path / "out"
    args = ["compare", "--config", str(tmp_path / "c.yaml"), "--out", str(out)]
    for extra in ([], ["--dry-run"]):
        code = main([*args, *(x for s in sets for x in ("--set", s)), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1, err
        assert not out.exists()


def test_missing_config_through_the_cli(tmp_path: Path) -> None:
    r = run_cli_fast("compare", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read config") and "Traceback" not in r.stderr


def test_a_cell_may_name_the_grids_own_teacher_among_its_teachers(tmp_path: Path, teacher_run: Path) -> None:
    """co-advise taught by the teacher the grid trains (OUT/teacher, not there yet) and another one:
    planned to wait for the teacher run instead of refused as a missing weights file."""
    out = tmp_path / "out"
    cell = (f'[{{method: co-advise, student: vit_femto_patch4_16, teacher: "resnet_micro_cnn,resnet_micro_cnn", '
            f'teacher_weights: "{out / "teacher"},{teacher_run}"}}]')
    (tmp_path / "c.yaml").write_text(CONFIG)
    code = main(["compare", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--set", f"compare.cells={cell}",
                 "--dry-run"])
    assert code == 0
    bad = cell.replace(str(teacher_run), str(tmp_path / "missing"))
    r = run_cli_fast("compare", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--set",
                     f"compare.cells={bad}", "--dry-run")
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.startswith("error: cell 'co-advise':")
    (tmp_path / "unfinished").mkdir()  # a teacher run still training: no weights file yet
    bad = cell.replace(str(teacher_run), str(tmp_path / "unfinished"))
    r = run_cli_fast("compare", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--set",
                     f"compare.cells={bad}", "--dry-run")
    assert r.returncode == 2 and "is its run unfinished?" in r.stderr and r.stderr.count("\n") == 1


def test_a_multi_teacher_cell_replays_one_cache_per_teacher(tmp_path: Path, teacher_run: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """With teacher_cache on, co-advise replays a cache per teacher; the one of the grid's own
    teacher is the cache the logit cells of that seed replay too."""
    out = tmp_path / "out"
    cells = (f'[{{method: logit-kd, student: vit_femto_patch4_16}}, {{method: co-advise, student: vit_femto_patch4_16, '
             f'teacher: "resnet_micro_cnn,resnet_micro_cnn", teacher_weights: "{out / "teacher"},{teacher_run}"}}]')
    (tmp_path / "c.yaml").write_text(CONFIG)
    args = ["compare", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--set", f"compare.cells={cells}"]
    assert main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    caches = [ln.split(" -> ")[1].split(" [")[0] for ln in plan if ln.startswith("cache ")]
    assert len(caches) == 4 and len({Path(c).parent for c in caches}) == 2  # 2 teachers x 2 seeds
    runs = {ln.split(":")[0].split("  ", 1)[1]: ln for ln in plan if ln.startswith("run ")}
    own = Path(next(c for c in caches if c.endswith("seed0"))).parent.name
    assert f"via cache {own}" in runs["logit-kd seed 0"]
    assert f"via cache {own}, " in runs["co-advise seed 0"]
    # the grid itself, one seed: co-advise replays the logit cell's cache of the grid teacher and its own
    r = run_cli_fast(*args, "--set", "compare.seeds=[0]", "--set", "compare.teacher.epochs=1")
    assert r.returncode == 0, r.stderr
    used = {label: json.loads((out / "cells" / label / "seed0" / "summary.json").read_text())["teacher_cache"]
            for label in ("logit-kd", "co-advise")}
    assert used["co-advise"].split(",")[0] == used["logit-kd"] and len(set(used["co-advise"].split(","))) == 2
    assert r.stdout.count("cache: write") == 2 and len(list((out / "caches").glob("*/seed0"))) == 2
    # two shards: shard 1 runs logit-kd, so it writes the grid teacher's caches; shard 2 runs co-advise
    # and writes only the other teacher's, waiting for the grid teacher's
    assert main([*args, "--dry-run", "--shard", "2/2"]) == 0
    second = [ln.split(" -> ")[1].split(" [")[0] for ln in capsys.readouterr().out.splitlines()
              if ln.startswith("cache ")]
    assert sorted(Path(c).name for c in second) == ["seed0", "seed1"]
    assert all(Path(c).parent.name != own for c in second)


def test_two_shards_share_one_grid_and_match_the_unsharded_runs(grid: Path, tmp_path: Path) -> None:
    """`--shard 2/2` started first waits for the teacher that `--shard 1/2` trains; then both run
    side by side on one --out, each waiting for the teacher cache the other writes when it needs it
    first. Every run trains exactly once, and each run's metrics equal the unsharded grid's."""
    import sys

    import vitdistill.compare as compare

    (tmp_path / "grid.yaml").write_text(CONFIG)
    out = tmp_path / "out"
    args = ["compare", "--config", str(tmp_path / "grid.yaml"), "--out", str(out), "--no-progress"]
    code = ("import sys, vitdistill.compare as c; c.POLL_S = 0.2; from vitdistill.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    second = subprocess.Popen([sys.executable, "-c", code, *args, "--shard", "2/2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert second.stdout is not None
    head = []
    while not head or "waiting for the teacher run" not in head[-1]:
        head.append(second.stdout.readline())
        assert head[-1], "shard 2 ended without waiting for the teacher: " + "".join(head) + second.stderr.read()
    old, compare.POLL_S = compare.POLL_S, 0.2
    try:
        first = run_cli_fast(*args, "--shard", "1/2")
    finally:
        compare.POLL_S = old
    rest, stderr2 = second.communicate(timeout=600)
    stdout2 = "".join(head) + rest
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, stderr2
    assert "teacher: train resnet_micro_cnn" in first.stdout and "teacher: train" not in stdout2

    def started(text: str) -> list[str]:
        return [line.split("start ")[1].split(":")[0] for line in text.splitlines() if "] start " in line]

    assert sorted(started(first.stdout) + started(stdout2)) == sorted(f"{c} seed {s}" for c in CELLS for s in (0, 1))
    assert started(first.stdout) == ["none seed 0", "logit-kd-t2 seed 0", "deit-hard seed 1"]
    for label in CELLS:
        for seed in (0, 1):
            mine, ref = (_figures(root / "cells" / label / f"seed{seed}") for root in (out, grid))
            assert mine == ref and len(mine) == 2, (label, seed)
    assert {r["label"] for r in csv.DictReader(open(out / "leaderboard.csv"))} == {*CELLS, "teacher"}


def test_take_shard_gives_each_cache_one_writer(tmp_path: Path) -> None:
    from vitdistill.compare import Job, take_shard

    cfg = None  # take_shard reads only the run order and the caches
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    uses = [(), (a,), (a,), (b,), (a,), (b, c)]  # c5 replays two caches (one per teacher, as co-advise does)
    runs = [Job(f"c{i}", 0, tmp_path / f"r{i}", cfg, caches=u) for i, u in enumerate(uses)]
    one = take_shard([dataclasses.replace(j) for j in runs], (1, 2))
    two = take_shard([dataclasses.replace(j) for j in runs], (2, 2))
    assert [j.label for j in one] == ["c0", "c2", "c4"] and [j.label for j in two] == ["c1", "c3", "c5"]
    # cache a is first replayed by c1 (shard 2), b by c3 (shard 2 as well), c by c5 (shard 2)
    assert [j.waits_for for j in one] == [frozenset(), {a}, {a}] and not any(j.waits_for for j in two)
    three = take_shard([dataclasses.replace(j) for j in runs], (1, 3))  # c0, c3: b is c3's own to write
    assert [(j.label, j.waits_for) for j in three] == [("c0", frozenset()), ("c3", frozenset())]
    last = take_shard([dataclasses.replace(j) for j in runs], (3, 3))  # c2, c5: a is c1's, b is c3's, c is c5's
    assert [(j.label, j.waits_for) for j in last] == [("c2", {a}), ("c5", {b})]
    assert take_shard(runs, None) is runs


def _figures(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing columns."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_shard_argument_errors(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        r = run_cli_fast("compare", "--config", str(tmp_path / "c.yaml"), "--shard", bad, "--dry-run")
        assert r.returncode == 2 and "--shard takes K/N" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli_fast("compare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--shard", "2/2",
                     "--dry-run")
    assert r.returncode == 0 and "shard 2/2 takes 3 of them" in r.stdout and "teacher  train" not in r.stdout
    assert r.stdout.count("\nrun ") == 3 and "cache    resnet_micro_cnn, 2 epochs, seed 0" in r.stdout


def test_shipped_digits_grid_plans_all_its_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "digits-grid.yaml"
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "g"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "run 36/36" in plan and plan.count("via cache") == 30  # five distilling cells, six seeds
    assert not (tmp_path / "g").exists()  # a dry run writes nothing
