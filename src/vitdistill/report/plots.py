"""The leaderboard's pictures: accuracy against a cost with its Pareto front, and learning curves.

Each function returns PNG bytes from an explicit Agg canvas (no display, no global pyplot state);
the caller writes them atomically and embeds them in the HTML.
"""
from __future__ import annotations

import io
import math


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower-or-equal cost and higher-or-equal accuracy,
    one of them strictly. Returned by increasing cost (so accuracy increases along them)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _short(v: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def _png(fig: object) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # type: ignore[attr-defined]
    return buf.getvalue()


def _figure(size: tuple[float, float]) -> tuple[object, object]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def accuracy_vs_cost(rows: list[dict], cost_key: str, cost_label: str, title: str) -> bytes:
    """Each row's mean top-1 (%) against ``row[cost_key]`` on a log axis, error bars = the spread over
    seeds, the Pareto front as a step line and the teacher (``role == "teacher"``) as a star."""
    fig, ax = _figure((7, 4.5))
    pts = [r for r in rows if r.get(cost_key) and r.get("top1_mean") is not None]
    xs = [float(r[cost_key]) for r in pts]
    ys = [100 * float(r["top1_mean"]) for r in pts]
    first_teacher = next((i for i, r in enumerate(pts) if r.get("role") == "teacher"), None)
    for i, (r, x, y) in enumerate(zip(pts, xs, ys)):
        teacher = r.get("role") == "teacher"
        # one legend entry however many teachers the grid has (their labels name them on the plot)
        ax.errorbar([x], [y], yerr=[100 * float(r.get("top1_std") or 0)], fmt="*" if teacher else "o",
                    markersize=14 if teacher else 7, capsize=3, color="tab:red" if teacher else "tab:blue",
                    label="teacher" if i == first_teacher else None)
    front = pareto_front(list(zip(xs, ys)))
    if front:
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="tab:green", alpha=0.7, linewidth=1.5, label="Pareto front")
    if xs:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: _short(v))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    ax.set(title=title, xlabel=cost_label, ylabel="top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    _label_points(ax, xs, ys, [str(r["label"]) for r in pts])
    return _png(fig)


def label_rows(ys: list[float], gap: float) -> list[float]:
    """Heights for labels of points at heights ``ys`` (same order), at least ``gap`` apart and in the
    points' order. Labels that would collide form a block centred on its points' mean height; a
    label with room stays on its point."""
    order = sorted(range(len(ys)), key=lambda i: -ys[i])
    blocks: list[list[float]] = []  # desired heights of each block, highest first

    def top(block: list[float]) -> float:
        return sum(block) / len(block) + (len(block) - 1) * gap / 2

    for i in order:
        blocks.append([ys[i]])
        # merge while this block's top would come within a gap of the bottom of the block above
        while len(blocks) > 1 and top(blocks[-2]) - (len(blocks[-2]) - 1) * gap - top(blocks[-1]) < gap:
            last = blocks.pop()
            blocks[-1].extend(last)
    out = [0.0] * len(ys)
    k = 0
    for block in blocks:
        for j in range(len(block)):
            out[order[k]] = top(block) - j * gap
            k += 1
    return out


def _label_points(ax: object, xs: list[float], ys: list[float], labels: list[str], fontsize: int = 8) -> None:
    """Label every point; points that sit in one column (the cells of one student share a parameter
    count) get their labels stacked beside the column with leader lines, so no two labels overlap."""
    if not xs:
        return
    to_px = ax.transData.transform  # type: ignore[attr-defined]
    px = [tuple(to_px((x, y))) for x, y in zip(xs, ys)]
    right_edge = ax.get_window_extent().x1  # type: ignore[attr-defined]
    gap = fontsize * 1.5  # pixels at the figure's 100 dpi: one line of text (11.7 px at 8 pt) and air
    columns: list[list[int]] = []
    for i in sorted(range(len(px)), key=lambda i: px[i][0]):
        if columns and px[i][0] - px[columns[-1][-1]][0] < 3:  # the same cost, to a few pixels
            columns[-1].append(i)
        else:
            columns.append([i])
    for col in columns:
        left = right_edge - max(px[i][0] for i in col) < 80  # no room on the right: labels go left
        tx = (min(px[i][0] for i in col) - 8) if left else (max(px[i][0] for i in col) + 8)
        for i, ty in zip(col, label_rows([px[i][1] for i in col], gap)):
            moved = abs(ty - px[i][1]) > 2
            ax.annotate(labels[i], (xs[i], ys[i]), xytext=(tx, ty), textcoords="figure pixels",  # type: ignore[attr-defined]
                        fontsize=fontsize, va="center", ha="right" if left else "left",
                        arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if moved else None)


def curve_style(i: int) -> dict:
    """Colour, line style and marker of the i-th curve: ten colours, then the next line style and
    marker, so that a grid of more than ten cells still tells every curve apart (up to 30)."""
    return {"color": f"C{i % 10}", "linestyle": ("-", ":", "-.")[i // 10 % 3], "marker": "osD"[i // 10 % 3]}


def learning_curves(curves: dict[str, tuple[list[int], list[float]]], teacher: tuple[list[int], list[float]] | None
                    ) -> bytes:
    """Test top-1 (%) per epoch of every cell (already averaged over seeds) on one chart."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure((8.5, 4.5))
    for i, (label, (epochs, top1)) in enumerate(curves.items()):
        ax.plot(epochs, [100 * v for v in top1], markersize=3, label=label, **curve_style(i))
    if teacher and teacher[0]:
        ax.plot(teacher[0], [100 * v for v in teacher[1]], linestyle="--", color="black", label="teacher")
    ax.set(title="Test top-1 per epoch (mean over seeds)", xlabel="epoch", ylabel="top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: a 15-cell legend would hide the curves
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _png(fig)
