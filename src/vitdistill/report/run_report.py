"""The human-readable end of a run: ``report.md`` and ``report.png`` in the run directory.

A distillation run answers two questions, what accuracy was kept and what cost was saved; the report
puts both on one page next to the learning curves, so a run can be judged without opening the
metrics file. Both files are written atomically: an interrupted run leaves the previous report or
none, never half a file.
"""
from __future__ import annotations

import io
import pathlib
from typing import Any

from vitdistill.engine import io as engine_io
from vitdistill.report.tables import format_value, markdown_table

# (summary key, label) in the order a reader wants them: what ran, then what it kept and cost.
_SUMMARY_FIELDS = [
    ("method", "Method"),
    ("data", "Data"),
    ("student", "Student"),
    ("teacher", "Teacher"),
    ("student_top1", "Student top-1 (%)"),
    ("ema_decay", "Scored and saved: the EMA of the weights, decay"),
    ("live_top1", "Live (not averaged) student top-1 (%)"),
    ("student_ece", "Student calibration error, ECE (%)"),
    ("student_nll", "Student test NLL (nats)"),
    ("teacher_top1", "Teacher top-1 (%)"),
    ("top1_gap", "Top-1 gap to teacher (points)"),
    ("params", "Student parameters"),
    ("flops", "Student FLOPs / image"),
    ("latency_ms_b1", "Latency, batch 1 (ms)"),
    ("throughput_img_s", "Throughput (img/s)"),
    ("peak_mem_mb", "Peak memory (MiB)"),
    ("wall_s", "Training loop wall time (s)"),
]

_EPOCH_HEADERS = {
    "epoch": "Epoch",
    "train_loss": "Train loss",
    "test_top1": "Top-1 (%)",
    "test_top5": "Top-5 (%)",
    "agreement": "Agreement (%)",
    "test_agreement": "Agreement (%)",
    "test_live_top1": "Live top-1 (%)",
    "test_ece": "ECE (%)",
    "test_nll": "NLL",
    "train_top1": "Train top-1 (%)",
    "epoch_s": "Epoch (s)",
    "lr": "LR",
    "img_s": "img/s",
}
_EPOCH_FIRST = ["epoch", "train_loss"]
_EPOCH_LAST = ["test_top1", "test_top5", "agreement", "test_ece", "test_nll", "lr", "img_s"]


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` through a temporary file and a rename (engine/io.py), so readers see the old
    file or the new one."""
    engine_io.atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def _series(metrics: list[dict], key: str) -> tuple[list[Any], list[float]]:
    """(epochs, values) for the epochs where ``key`` was logged."""
    pairs = [
        (m.get("epoch", i + 1), float(m[key]))
        for i, m in enumerate(metrics)
        if m.get(key) is not None
    ]
    return [e for e, _ in pairs], [v for _, v in pairs]


def _plot(metrics: list[dict], summary: dict, teacher_metrics: list[dict] | None) -> bytes:
    """PNG bytes of the two panels: training loss, and test top-1 against the teacher."""
    # Imported here so that importing the report package (e.g. for profiling) stays light.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)  # explicit Agg: no display needed, no global pyplot state
    ax_loss, ax_acc = fig.subplots(1, 2)

    ax_loss.plot(*_series(metrics, "train_loss"), marker="o", label="train loss")
    loss_parts = sorted({k for m in metrics for k in m if k.startswith("loss_")})
    for key in loss_parts:
        ax_loss.plot(*_series(metrics, key), linewidth=1, linestyle="--", label=key)
    ax_loss.set(title="Training loss", xlabel="epoch", ylabel="loss")

    epochs, top1 = _series(metrics, "test_top1")
    ax_acc.plot(epochs, [100 * v for v in top1], marker="o", label="student")
    if teacher_metrics:
        t_epochs, t_top1 = _series(teacher_metrics, "test_top1")
        ax_acc.plot(t_epochs, [100 * v for v in t_top1], marker="s", label="teacher")
    elif summary.get("teacher_top1") is not None:
        ax_acc.axhline(100 * float(summary["teacher_top1"]), color="gray", linestyle="--",
                       label="teacher")
    ax_acc.set(title="Test top-1", xlabel="epoch", ylabel="top-1 (%)")

    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _summary_table(summary: dict) -> str:
    values = dict(summary)
    student, teacher = summary.get("student_top1"), summary.get("teacher_top1")
    if student is not None and teacher is not None:
        values["top1_gap"] = f"{100 * (float(student) - float(teacher)):+.2f}"
    # Pre-formatted per field, since one "Value" column mixes names, percentages and counts.
    rows = [
        {"field": label, "value": format_value(key, values.get(key))}
        for key, label in _SUMMARY_FIELDS
        if values.get(key) is not None
    ]
    return markdown_table(rows, [("field", "Quantity"), ("value", "Value")])


def _epoch_columns(metrics: list[dict]) -> list[tuple[str, str]]:
    """Every key logged in any epoch: epoch and loss first, loss parts, others, accuracies last."""
    seen: list[str] = []
    for m in metrics:
        seen += [k for k in m if k not in seen]
    parts = [k for k in seen if k.startswith("loss_")]
    others = [k for k in seen if k not in _EPOCH_FIRST + _EPOCH_LAST + parts]
    ordered = [k for k in _EPOCH_FIRST if k in seen] + parts + others
    ordered += [k for k in _EPOCH_LAST if k in seen]
    return [(k, _EPOCH_HEADERS.get(k, k)) for k in ordered]


def write_run_report(
    run_dir: str | pathlib.Path,
    metrics: list[dict],
    summary: dict,
    teacher_metrics: list[dict] | None = None,
) -> None:
    """Write ``report.png`` and ``report.md`` into ``run_dir`` (created if missing).

    ``metrics`` are the run's per-epoch dicts (accuracies as fractions); ``summary`` holds the run's
    final figures, any of which may be missing or None and is then left out. When the teacher's own
    per-epoch ``teacher_metrics`` are given its curve is drawn; otherwise a known
    ``summary["teacher_top1"]`` is drawn as a horizontal line. The PNG is written first, so the
    Markdown never points at an image that does not exist yet.
    """
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "report.png", _plot(metrics, summary, teacher_metrics))

    title = " / ".join(str(summary[k]) for k in ("method", "student") if summary.get(k))
    kind = "Training" if summary.get("mode") == "train" else "Distillation"
    if summary.get("mode") == "train":  # a model fitted on labels: no method to name
        title = str(summary.get("student") or "")
    lines = [f"# {kind} report: {title or run_dir.name}", ""]
    lines += ["## Summary", "", _summary_table(summary), ""]
    lines += ["## Per-epoch metrics", ""]
    epochs = markdown_table(metrics, _epoch_columns(metrics)) if metrics else "No epochs logged."
    lines += [epochs, ""]
    lines += ["## Learning curves", "", "![learning curves](report.png)", ""]
    _atomic_write(run_dir / "report.md", "\n".join(lines).encode("utf-8"))
