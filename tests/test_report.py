"""Tests for vitdistill.report: cost profile, tables and the run report."""
from __future__ import annotations

import pathlib

import pytest
import timm
import torch

from vitdistill.report import (
    format_count,
    markdown_table,
    profile_model,
    text_table,
    write_run_report,
)

INPUT = (3, 32, 32)


def tiny_vit() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=10,
    )


# ---------------------------------------------------------------- profile


def test_params_is_sum_of_numel() -> None:
    model = tiny_vit()
    assert profile_model(model, INPUT, measure_time=False)["params"] == sum(
        p.numel() for p in model.parameters()
    )


def test_linear_flops_count_multiply_add_as_two() -> None:
    # y = x W^T: 8 outputs, each 16 multiplies and 16 adds; the bias add is not counted.
    result = profile_model(torch.nn.Linear(16, 8), (1, 1, 16), measure_time=False)
    assert result["flops"] == 2 * 16 * 8


def test_flops_are_per_image_whatever_the_batch() -> None:
    model = tiny_vit()
    small = profile_model(model, INPUT, batch=1, measure_time=False)
    large = profile_model(model, INPUT, batch=8, measure_time=False)
    assert small["flops"] > 0
    assert small["flops"] == large["flops"]


def test_cpu_peak_memory_covers_weights_and_grows_with_batch() -> None:
    model = tiny_vit()
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    one = profile_model(model, INPUT, batch=1, measure_time=False)["peak_mem_mb"]
    many = profile_model(model, INPUT, batch=64, measure_time=False)["peak_mem_mb"]
    assert one >= param_mb
    assert many > one


def test_cpu_peak_memory_sees_frees() -> None:
    # Ten 1 MiB activations in sequence: only input + previous + current are ever live at once.
    layers = [torch.nn.Linear(1024, 1024, bias=False) for _ in range(10)]
    model = torch.nn.Sequential(*layers)
    peak = profile_model(model, (1, 1, 1024), batch=256, measure_time=False)["peak_mem_mb"]
    assert peak - 40 == pytest.approx(3.0)


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored(training: bool) -> None:
    model = tiny_vit().train(training)
    profile_model(model, INPUT, batch=2, warmup=0, iters=1)
    assert all(m.training == training for m in model.modules())


def test_mixed_modes_are_restored_and_model_still_trains() -> None:
    model = tiny_vit().train()
    model.patch_embed.eval()  # e.g. a frozen stem
    profile_model(model, INPUT, batch=2, measure_time=False)
    assert model.training and model.blocks.training and not model.patch_embed.training
    model(torch.randn(2, *INPUT)).sum().backward()
    assert model.head.weight.grad is not None


def test_profile_cnn() -> None:
    model = timm.create_model("resnet18", num_classes=10)
    result = profile_model(model, INPUT, batch=2, measure_time=False)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["flops"] > 0
    assert result["peak_mem_mb"] > result["params"] * 4 / 2**20


def test_timings_are_reported_or_none() -> None:
    model = tiny_vit()
    timed = profile_model(model, INPUT, batch=2, warmup=0, iters=1)
    assert timed["latency_ms_b1"] > 0 and timed["throughput_img_s"] > 0
    assert timed["batch"] == 2
    untimed = profile_model(model, INPUT, batch=2, measure_time=False)
    assert untimed["latency_ms_b1"] is None and untimed["throughput_img_s"] is None


def test_profile_distilled_deit() -> None:
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, num_classes=10,
    ).train()
    result = profile_model(model, INPUT, batch=2, warmup=0, iters=1)
    assert result["flops"] > 0 and result["params"] > 0
    assert model.training


@pytest.mark.parametrize(
    ("n", "text"),
    [(512, "512"), (45_600, "45.6K"), (1_234_567, "1.23M"), (999_999, "1.00M"), (2.1e9, "2.10G")],
)
def test_format_count(n: float, text: str) -> None:
    assert format_count(n) == text


# ---------------------------------------------------------------- tables

ROWS = [
    {"method": "deit", "test_top1": 0.93412, "params": 5_717_416, "train_loss": 0.5},
    {"method": "tinyvit", "test_top1": None, "params": 1200, "train_loss": 12.3456},
]
COLUMNS = [("method", "Method"), ("test_top1", "Top-1"), ("params", "Params"),
           ("train_loss", "Loss"), ("wall_s", "Wall")]


def test_markdown_table() -> None:
    expected = (
        "| Method  | Top-1 | Params |   Loss | Wall |\n"
        "| ------- | ----: | -----: | -----: | ---- |\n"
        "| deit    | 93.41 |  5.72M | 0.5000 | -    |\n"
        "| tinyvit |     - |   1200 |  12.35 | -    |"
    )
    assert markdown_table(ROWS, COLUMNS) == expected


def test_text_table() -> None:
    expected = (
        "Method   Top-1  Params    Loss  Wall\n"
        "-------  -----  ------  ------  ----\n"
        "deit     93.41   5.72M  0.5000  -\n"
        "tinyvit      -    1200   12.35  -"
    )
    assert text_table(ROWS, COLUMNS) == expected


# ---------------------------------------------------------------- run report


def _metrics(n: int) -> list[dict]:
    return [
        {"epoch": e, "train_loss": 2.0 / e, "loss_kd": 1.0 / e, "test_top1": 0.3 + 0.1 * e,
         "test_top5": 0.9, "agreement": 0.5, "lr": 5e-4 / e}
        for e in range(1, n + 1)
    ]


@pytest.mark.parametrize("with_teacher_curve", [False, True])
def test_write_run_report(tmp_path: pathlib.Path, with_teacher_curve: bool) -> None:
    summary = {"method": "deit", "student": "vit_tiny", "teacher": "resnet18",
               "student_top1": 0.6, "teacher_top1": 0.7123, "params": 5_717_416, "flops": None}
    teacher = _metrics(3) if with_teacher_curve else None
    run_dir = tmp_path / "run"
    write_run_report(run_dir, _metrics(3), summary, teacher_metrics=teacher)

    assert sorted(p.name for p in run_dir.iterdir()) == ["report.md", "report.png"]
    assert (run_dir / "report.png").read_bytes().startswith(b"\x89PNG")
    md = (run_dir / "report.md").read_text()
    assert "![learning curves](report.png)" in md
    assert "| Teacher top-1 (%)             | 71.23    |" in md
    assert "FLOPs" not in md.split("## Per-epoch")[0]  # None in the summary is left out
    assert "loss_kd" in md and "Top-5 (%)" in md


def test_write_run_report_with_sparse_inputs(tmp_path: pathlib.Path) -> None:
    write_run_report(tmp_path, [{"epoch": 1, "train_loss": 1.0}], {})
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "report.png"]


def test_interrupted_report_keeps_old_files_and_no_temp(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run_report(tmp_path, _metrics(2), {"method": "deit"})
    before = (tmp_path / "report.md").read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("vitdistill.engine.io.os.replace", fail)
    with pytest.raises(OSError):
        write_run_report(tmp_path, _metrics(3), {"method": "dist"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "report.png"]
    assert (tmp_path / "report.md").read_bytes() == before


def test_learning_curves_tell_thirty_cells_apart(tmp_path: pathlib.Path) -> None:
    from vitdistill.report.plots import curve_style, learning_curves

    styles = {tuple(sorted(curve_style(i).items())) for i in range(30)}
    assert len(styles) == 30
    curves = {f"cell{i}": ([1, 2], [0.1 * (i % 7), 0.5]) for i in range(15)}
    png = learning_curves(curves, ([1, 2], [0.6, 0.7]))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "c.png").write_bytes(png)


def test_accuracy_plot_has_one_teacher_legend_entry_for_several_teachers(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitdistill.report import plots

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    rows = [{"label": "teacher", "role": "teacher", "top1_mean": 0.77, "latency_ms_b1": 2.7},
            {"label": "teacher-2", "role": "teacher", "top1_mean": 0.66, "latency_ms_b1": 5.0},
            {"label": "none", "role": "cell", "top1_mean": 0.60, "latency_ms_b1": 5.0},
            {"label": "dist", "role": "cell", "top1_mean": 0.63, "latency_ms_b1": 4.7}]
    plots.accuracy_vs_cost(rows, "latency_ms_b1", "latency (ms)", "t")
    (fig,) = figures
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels.count("teacher") == 1 and "Pareto front" in labels


def test_label_rows_keep_the_gap_the_order_and_the_centre() -> None:
    from vitdistill.report.plots import label_rows

    ys = [100.0, 101.0, 99.5, 150.0, 100.2]
    rows = label_rows(ys, gap=10.0)
    by_height = sorted(range(len(ys)), key=lambda i: -ys[i])
    placed = [rows[i] for i in by_height]
    assert all(a - b >= 10.0 - 1e-9 for a, b in zip(placed, placed[1:]))  # order kept, gap kept
    assert rows[3] == 150.0  # the label with room stays on its point
    cluster = [0, 1, 2, 4]
    assert sum(rows[i] for i in cluster) == pytest.approx(sum(ys[i] for i in cluster))  # centred block
    assert label_rows([5.0, 50.0], gap=10.0) == [5.0, 50.0]
    # a block pushed into the label above merges with it: 100, 95, 90 with gap 10 -> 105, 95, 85
    assert label_rows([100.0, 95.0, 90.0], gap=10.0) == pytest.approx([105.0, 95.0, 85.0])


def test_labels_of_cells_with_one_parameter_count_do_not_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.text import Text

    from vitdistill.report import plots

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    rows = [{"label": f"method-{i}", "role": "cell", "top1_mean": 0.60 + 0.002 * i, "params": 684_000}
            for i in range(10)] + [{"label": "minivit", "role": "cell", "top1_mean": 0.69, "params": 379_000}]
    plots.accuracy_vs_cost(rows, "params", "parameters", "t")
    (fig,) = figures
    fig.canvas.draw()
    boxes = {t.get_text(): Text.get_window_extent(t) for t in fig.axes[0].texts}  # the text, not its leader line
    assert set(boxes) == {r["label"] for r in rows}
    names = sorted(boxes)
    overlaps = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if boxes[a].overlaps(boxes[b])]
    assert overlaps == []


def test_run_report_names_a_training_run_and_the_ema(tmp_path: pathlib.Path) -> None:
    summary = {"mode": "train", "method": "none", "student": "vit_femto_patch4_16", "student_top1": 0.9,
               "ema_decay": 0.998, "live_top1": 0.88, "wall_s": 0.91}
    write_run_report(tmp_path, [{"epoch": 1, "train_loss": 1.0, "test_top1": 0.9, "test_live_top1": 0.88}], summary)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Training report: vit_femto_patch4_16\n")
    assert "the EMA of the weights, decay" in md and "| 0.9980" in md and "| 88.00" in md
    assert "| 0.9 " in md and "0.9100" not in md  # the wall time, to a tenth of a second
    assert "Live top-1 (%)" in md


def test_atomic_write_syncs_the_file_before_its_name(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from vitdistill.engine import io

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                   real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    io.write_json(tmp_path / "summary.json", {"a": 1})
    monkeypatch.undo()
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[1][1] == str(tmp_path / "summary.json")
    assert events[2][1] == str(tmp_path) and (tmp_path / "summary.json").read_text() == '{\n  "a": 1\n}\n'
