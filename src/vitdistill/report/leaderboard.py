"""The leaderboard of a ``vitdistill compare`` folder: CSV, Markdown, self-contained HTML, three PNGs.

Everything is read back from the run directories (``cells/<label>/seed<k>/summary.json``,
``metrics.jsonl``, ``config.yaml`` and ``teacher/``), so ``--report-only`` rebuilds it from a copied
folder. One row per cell (mean and sample standard deviation over its finished seeds) and one per
teacher. docs/compare.md defines the columns:

    gain_pts   = 100 * (top1_mean - top1_mean of the no-KD cell: same student, else the first one)
    gain_ci95  = d_mean -/+ t_{0.975, n-1} * s_d / sqrt(n), with d_s = 100 * (top1 of the cell - top1 of
                 the no-KD cell) on each of the n >= 2 seeds both finished (paired by seed: one seed gives
                 both runs the same data order and augmentations, so the pairing removes that share of
                 the noise); Student's t interval of the mean gain
    kept       = top1_mean / teacher top-1 (the teacher the cell distilled from; the main one for no-KD)
    band       = [2^b, 2^(b+1)) ms with b = floor(log2(latency_ms_b1)); best_in_band marks its top row
"""
from __future__ import annotations

import base64
import csv
import html
import io as _io
import json
import math
import statistics
from pathlib import Path

import yaml

from vitdistill.engine import io
from vitdistill.errors import UserError
from vitdistill.report import plots
from vitdistill.report.tables import format_value, markdown_table

CSV_COLUMNS = ["rank", "label", "role", "method", "student", "teacher", "n_seeds", "top1_mean", "top1_std",
               "gain_pts", "gain_seeds", "gain_ci95_lo", "gain_ci95_hi", "agreement", "ece", "teacher_top1", "kept", "params", "flops",
               "latency_ms_b1", "throughput_img_s", "peak_mem_mb", "wall_s", "latency_band", "best_in_band"]
PICTURES = [("accuracy_vs_latency.png", "Top-1 against latency at batch 1"),
            ("accuracy_vs_params.png", "Top-1 against parameters"),
            ("learning_curves.png", "Test top-1 per epoch")]
_DISPLAY = [("best", "best"), ("rank", "#"), ("label", "cell"), ("method", "method"), ("student", "model"),
            ("top1_txt", "top-1 (%)"), ("n_seeds", "seeds"), ("gain_txt", "gain (pts)"),
            ("gain_ci_txt", "gain 95% CI (pts)"), ("agreement", "agreement (%)"), ("ece", "ECE (%)"),
            ("kept_txt", "kept (%)"), ("params", "params"), ("flops", "FLOPs"), ("latency_ms_b1", "latency b1 (ms)"),
            ("throughput_img_s", "img/s"), ("peak_mem_mb", "peak mem (MiB)"), ("wall_s", "train (s)"),
            ("latency_band", "latency band (ms)")]
_PREFORMATTED = ("best", "top1_txt", "gain_txt", "gain_ci_txt", "kept_txt")
_COST = ("params", "flops", "latency_ms_b1", "throughput_img_s", "peak_mem_mb")
# the numbers of a summary the leaderboard averages: checked on reading, so a damaged one is named
_TEACHER_NUMBERS = ("top1", "params", "flops", "latency_ms_b1")
_NUMBERS = ("student_top1", "agreement", "student_ece", "teacher_top1", "wall_s", *_COST,
            "teacher_params", "teacher_flops", "teacher_latency_ms_b1")


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"'{path}' is damaged ({why}); delete its run folder to train that run again, or restore the file")


def _read_json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise _damaged(path, f"line {n} is not an epoch's metrics")
            rows.append(row)
    return rows


def read_summary(run_dir: Path) -> dict | None:
    """A finished run's ``summary.json`` (None when there is none); a damaged one is a one-line error."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(errors="replace"))
    except ValueError:
        raise _damaged(path, "not JSON") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("student_top1"), (int, float)):
        raise _damaged(path, "no student_top1")
    teachers = summary.get("teachers") or []
    if not isinstance(teachers, list) or not all(isinstance(t, dict) and isinstance(t.get("model"), str)
                                                 for t in teachers):
        raise _damaged(path, "'teachers' is not a list of teachers")
    for where, record, keys in [("", summary, _NUMBERS), *(("teachers: ", t, _TEACHER_NUMBERS) for t in teachers)]:
        for key in keys:
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _damaged(path, f"{where}{key} is {value!r}, not a number")
    return summary


def _mean(values: list) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _seed_of(run_dir: Path) -> int | None:
    """k of a ``seed<k>`` run folder (None for any other name)."""
    return int(run_dir.name[4:]) if run_dir.name.startswith("seed") and run_dir.name[4:].isdigit() else None


def _run(run_dir: Path) -> dict | None:
    """A finished run's summary with its metrics and teacher identity, or None when unfinished."""
    summary = read_summary(run_dir)
    if summary is None:
        return None
    try:
        model = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("model", {})
    except (OSError, yaml.YAMLError):
        model = {}
    summary["_metrics"] = _read_json_lines(run_dir / "metrics.jsonl")
    summary["_seed"] = _seed_of(run_dir)
    summary["_teacher_key"] = (model.get("teacher") or summary.get("teacher"), model.get("teacher_weights"))
    return summary


def _grid(out: Path) -> tuple[list[str], set[int], list[str]] | None:
    """(cell labels, seeds, the folders it was run in: the last first, then any earlier one it was
    copied from) of the grid last run into ``out``, from its ``compare.json``; None without one."""
    path = out / "compare.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(errors="replace"))
        places = [saved.get("out"), *saved.get("was", [])]
        return ([str(c) for c in saved["cells"]], {int(s) for s in saved["seeds"]},
                [p for p in places if isinstance(p, str)])
    except (ValueError, TypeError, KeyError, AttributeError):
        raise UserError(f"'{path}' is damaged; delete it and rerun `vitdistill compare` with the grid's config, "
                        "which writes it again") from None


def _folders(out: Path) -> list[tuple[str, list[Path]]]:
    found = sorted(p.name for p in (out / "cells").iterdir() if p.is_dir()) if (out / "cells").is_dir() else []
    return [(label, sorted((p for p in (out / "cells" / label).glob("seed*") if _seed_of(p) is not None),
                           key=lambda p: _seed_of(p) or 0)) for label in found]


def left_out(out: Path) -> list[str]:
    """Run folders under ``cells/`` that the grid of ``compare.json`` no longer has (a cell or seed
    since removed from the config); the leaderboard leaves them out."""
    grid = _grid(Path(out))
    if grid is None:
        return []
    labels, seeds, _ = grid
    return [f"cells/{label}" + ("" if label not in labels else f"/{p.name}") for label, runs in _folders(Path(out))
            for p in (runs[:1] if label not in labels else runs) if label not in labels or _seed_of(p) not in seeds]


def collect(out: Path) -> tuple[dict[str, list[dict]], dict | None]:
    """Finished runs per cell label and the teacher run's summary (``None`` when the teacher was
    given, not trained here). With ``compare.json`` only the grid's cells and seeds count, in the
    grid's order; without it (a folder put together by hand) every ``cells/<label>/seed<k>``."""
    grid = _grid(out)
    folders = dict(_folders(out))
    labels = grid[0] if grid else list(folders)
    cells: dict[str, list[dict]] = {}
    for label in labels:
        picked = [p for p in folders.get(label, []) if grid is None or _seed_of(p) in grid[1]]
        runs = [r for r in map(_run, picked) if r is not None]
        if runs:
            cells[label] = runs
    from vitdistill.engine.run import relocate_paths

    moves = {str(Path(p)): str(out.resolve()) for p in (grid[2] if grid else []) if Path(p) != out.resolve()}
    if moves:
        # a copied folder: its runs name the grid's teacher by the path it had where they ran
        for r in (r for runs in cells.values() for r in runs):
            r["_teacher_key"] = (r["_teacher_key"][0], relocate_paths(r["_teacher_key"][1], moves))
            for t in r.get("teachers") or []:
                t["weights"] = relocate_paths(t.get("weights"), moves)
    return cells, _run(out / "teacher")


def _cell_row(label: str, runs: list[dict]) -> dict:
    top1 = [float(r["student_top1"]) for r in runs]
    row = {"label": label, "role": "cell", "method": runs[0].get("method"), "student": runs[0].get("student"),
           "teacher": runs[0].get("teacher"), "n_seeds": len(runs), "top1_mean": statistics.fmean(top1),
           "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
           "agreement": _mean([r.get("agreement") for r in runs]),
           "ece": _mean([r.get("student_ece") for r in runs]),
           "teacher_top1": _mean([r.get("teacher_top1") for r in runs]),
           "wall_s": _mean([r.get("wall_s") for r in runs]), "_key": runs[0]["_teacher_key"]}
    for key in _COST:
        row[key] = _mean([r.get(key) for r in runs])
    for key in ("params", "flops"):
        row[key] = None if row[key] is None else int(round(row[key]))
    return row


def _teacher_rows(cells: dict[str, list[dict]], trained: dict | None, out: Path) -> list[dict]:
    rows = []
    main_key = None
    if trained is not None:
        main_key = (trained.get("student"), str((out / "teacher").resolve()))
        rows.append({"label": "teacher", "role": "teacher", "method": "-", "student": trained.get("student"),
                     "n_seeds": 1, "top1_mean": trained.get("student_top1"), "top1_std": 0.0,
                     "teacher_top1": trained.get("student_top1"), "ece": trained.get("student_ece"),
                     "wall_s": trained.get("wall_s"), "_key": main_key,
                     **{k: trained.get(k) for k in _COST}})
    # (model, weights) -> that teacher's figures in each run it taught; a run with several teachers
    # (Co-advise) lists each in summary["teachers"] and adds to each one's row
    groups: dict[tuple, list[dict]] = {}
    for runs in cells.values():
        for r in runs:
            if r.get("teachers"):
                for t in r["teachers"]:
                    groups.setdefault(_same_teacher(groups, (t["model"], t.get("weights"))), []).append(
                        {"top1": t.get("top1"), "params": t.get("params"), "flops": t.get("flops"),
                         "latency_ms_b1": t.get("latency_ms_b1")})
            elif r.get("teacher") and r.get("teacher_top1") is not None:
                groups.setdefault(_same_teacher(groups, tuple(r["_teacher_key"])), []).append(
                    {"top1": r["teacher_top1"], "params": r.get("teacher_params"), "flops": r.get("teacher_flops"),
                     "latency_ms_b1": r.get("teacher_latency_ms_b1")})
    for key, runs in groups.items():
        if main_key is not None and _same_key(key, main_key):
            continue
        label = "teacher" if not rows else f"teacher-{len(rows) + 1}"
        top1 = _mean([r["top1"] for r in runs])
        rows.append({"label": label, "role": "teacher", "method": "-", "student": key[0], "n_seeds": 1,
                     "top1_mean": top1, "top1_std": 0.0, "teacher_top1": top1, "wall_s": None, "_key": key,
                     **{k: runs[0][k] for k in ("params", "flops", "latency_ms_b1")}})
    return rows


def _paired_diffs(runs: list[dict], baseline: list[dict]) -> list[float]:
    """Per-seed gains (points) over the baseline, on the seeds both finished."""
    base = {r["_seed"]: float(r["student_top1"]) for r in baseline if r.get("_seed") is not None}
    return [100 * (float(r["student_top1"]) - base[r["_seed"]]) for r in runs if r.get("_seed") in base]


def paired_gain_ci(runs: list[dict], baseline: list[dict], level: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval (points) of the mean per-seed gain over the baseline, on the seeds both
    finished; ``None`` with fewer than two such seeds (one seed says nothing about seed noise)."""
    from scipy.stats import t as student_t  # scipy comes with scikit-learn; imported only here

    diffs = _paired_diffs(runs, baseline)
    if len(diffs) < 2:
        return None
    half = float(student_t.ppf(0.5 + level / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.fmean(diffs)
    return mean - half, mean + half


def _same_key(a: tuple, b: tuple) -> bool:
    """One teacher: the same model name and the same weights path (compared resolved)."""
    return a[0] == b[0] and (a[1] == b[1] or bool(a[1] and b[1]) and Path(a[1]).resolve() == Path(b[1]).resolve())


def _same_teacher(groups: dict[tuple, list[dict]], key: tuple) -> tuple:
    return next((k for k in groups if _same_key(k, key)), key)


def build_rows(out: Path) -> tuple[list[dict], dict[str, list[dict]], dict | None]:
    cells, trained = collect(out)
    if not cells:
        raise UserError(f"'{out}' holds no finished compare run (cells/<label>/seed<k>/summary.json); "
                        "run `vitdistill compare` first")
    rows = [_cell_row(label, runs) for label, runs in cells.items()]
    teachers = _teacher_rows(cells, trained, out)
    main_teacher = teachers[0]["top1_mean"] if teachers else None
    baselines = [r for r in rows if r["method"] == "none"]
    for r in rows:
        ref = next((b for b in baselines if b["student"] == r["student"]), baselines[0] if baselines else None)
        # the gain and its interval on the same seeds: those both cells finished (all, once the grid is done);
        # with none in common, the difference of the two means
        diffs = [] if ref is None else _paired_diffs(cells[r["label"]], cells[ref["label"]])
        r["gain_seeds"] = len(diffs) if ref is not None else None
        r["gain_pts"] = None if ref is None else statistics.fmean(diffs) if diffs else \
            100 * (r["top1_mean"] - ref["top1_mean"])
        ci = None if ref is None or ref is r else paired_gain_ci(cells[r["label"]], cells[ref["label"]])
        r["gain_ci95_lo"], r["gain_ci95_hi"] = ci if ci else (None, None)
        t1 = r["teacher_top1"] if r["teacher_top1"] is not None else main_teacher
        r["teacher_top1"] = t1
        r["kept"] = r["top1_mean"] / t1 if t1 else None
    for t in teachers:
        t.update(gain_pts=None, gain_seeds=None, gain_ci95_lo=None, gain_ci95_hi=None, agreement=None,
                 kept=1.0 if t["top1_mean"] else None)
    rows = sorted(rows + teachers, key=lambda r: -(r["top1_mean"] if r["top1_mean"] is not None else -1))
    best: dict[int, dict] = {}
    for i, r in enumerate(rows, 1):
        r["rank"] = i
        lat = r.get("latency_ms_b1")
        band = math.floor(math.log2(lat)) if lat and lat > 0 else None
        r["latency_band"] = f"[{2.0 ** band:g},{2.0 ** (band + 1):g})" if band is not None else None
        r["best_in_band"] = False
        if band is not None and band not in best:
            best[band] = r
            r["best_in_band"] = True
    return rows, cells, trained


def _display(r: dict) -> dict:
    d = dict(r)
    d["best"] = "★" if r["best_in_band"] else ""
    d["top1_txt"] = (f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}" if r["top1_mean"] is not None
                     else "-")
    d["gain_txt"] = f"{r['gain_pts']:+.2f}" if r["gain_pts"] is not None else "-"
    paired = r.get("gain_seeds")
    if r["gain_pts"] is not None and paired is not None and paired < r["n_seeds"]:  # say it when not every seed
        d["gain_txt"] += f" ({paired} paired)" if paired else " (unpaired)"
    lo, hi = r.get("gain_ci95_lo"), r.get("gain_ci95_hi")
    d["gain_ci_txt"] = f"[{lo:+.2f}, {hi:+.2f}]" if lo is not None else "-"
    d["kept_txt"] = f"{100 * r['kept']:.2f}" if r["kept"] is not None else "-"
    return d


def _csv(rows: list[dict]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else round(r[k], 8) if isinstance(r[k], float) else r[k]
                    for k in CSV_COLUMNS})
    return buf.getvalue()


_NOTES = ("top-1: mean ± sample standard deviation over the cell's seeds. gain: mean points over the no-KD cell "
          "with the same student (else the first no-KD cell), per seed, on the seeds both finished (\"2 paired\" when "
          "fewer than the cell's own). gain 95% CI: Student's t interval of the mean gain, paired "
          "by seed (seeds both finished, at least two); an interval that holds 0 means the gain is within seed "
          "noise. kept: top-1 / the teacher's top-1. latency band: powers "
          "of two in ms; ★ marks the best top-1 of each band. Latency, throughput and memory are measured on the "
          "device each run trained on (CPU latency at batch 1 on a CPU run).")

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.teacher td{background:#fff4e5}tr.best td{font-weight:600}td.star{color:#d4a000;text-align:center}
figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-size:13px;color:#555}img{max-width:100%}
p.notes{font-size:13px;color:#444;max-width:1000px}"""

_SCRIPT = """window.addEventListener('load', function () {
  var n = 0, imgs = document.getElementsByTagName('img');
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) n++; }
  document.body.dataset.imagesLoaded = String(n);
});"""


def _html(rows: list[dict], images: dict[str, bytes], title: str) -> str:
    numeric = {"rank", "n_seeds", "top1_txt", "gain_txt", "gain_ci_txt", "agreement", "ece", "kept_txt", "params", "flops",
               "latency_ms_b1", "throughput_img_s", "peak_mem_mb", "wall_s"}
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in _DISPLAY)
    body = []
    for r in map(_display, rows):
        cls = " ".join(c for c in (r["role"] == "teacher" and "teacher", r["best_in_band"] and "best") if c)
        tds = []
        for key, _ in _DISPLAY:
            text = r[key] if key in _PREFORMATTED else format_value(key, r.get(key))
            kind = "star" if key == "best" else "num" if key in numeric else ""
            tds.append(f"<td class=\"{kind}\">{html.escape(str(text))}</td>")
        body.append(f"<tr class=\"{cls}\">{''.join(tds)}</tr>")
    figs = "".join(
        f"<figure><img alt=\"{html.escape(cap)}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(images[name]).decode('ascii')}\"><figcaption>{html.escape(cap)}</figcaption></figure>"
        for name, cap in PICTURES)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"<table id=\"leaderboard\"><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) +
            f"\n</tbody></table>\n<p class=\"notes\">{html.escape(_NOTES)}</p>\n{figs}\n"
            f"<script>{_SCRIPT}</script>\n</body></html>\n")


def _curve(runs_metrics: list[list[dict]]) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for metrics in runs_metrics:
        for m in metrics:
            if m.get("test_top1") is not None:
                by_epoch.setdefault(int(m["epoch"]), []).append(float(m["test_top1"]))
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def write_leaderboard(out: str | Path) -> list[dict]:
    """Write leaderboard.csv/.md/.html and the three PNGs into ``out``; returns the rows, best first."""
    out = Path(out)
    rows, cells, trained = build_rows(out)
    images = {
        "accuracy_vs_latency.png": plots.accuracy_vs_cost(rows, "latency_ms_b1", "latency at batch 1 (ms, log)",
                                                          "Top-1 vs latency"),
        "accuracy_vs_params.png": plots.accuracy_vs_cost(rows, "params", "parameters (log)", "Top-1 vs parameters"),
        "learning_curves.png": plots.learning_curves(
            {label: _curve([r["_metrics"] for r in runs]) for label, runs in cells.items()},
            _curve([trained["_metrics"]]) if trained else None),
    }
    for name, data in images.items():
        io.atomic_write(out / name, lambda tmp, d=data: Path(tmp).write_bytes(d))
    io.write_text(out / "leaderboard.csv", _csv(rows))
    title = f"vitdistill compare: {out.resolve().name}"
    display = [_display(r) for r in rows]
    md = [f"# {title}", "", markdown_table(display, _DISPLAY), "", _NOTES, ""]
    md += [f"![{cap}]({name})" for name, cap in PICTURES] + [""]
    io.write_text(out / "leaderboard.md", "\n".join(md))
    io.write_text(out / "leaderboard.html", _html(rows, images, title))
    return rows
