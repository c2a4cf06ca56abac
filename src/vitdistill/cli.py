"""The ``vitdistill`` command: train, distill, cache-teacher, synthesize, compare, eval, profile, demo, methods,
models.

Every training option is also a config key: ``--config FILE`` then the flags then ``--set a.b=v``,
later layers winning. A user error prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Callable

from vitdistill.config import MAX_THREADS, Config, build_config, load_yaml, parse_override
from vitdistill.errors import UserError, did_you_mean

# flag -> config key, for the options that train and distill share
_COMMON = {
    "data": "data.source", "out": "out", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "lr": "train.lr", "seed": "train.seed", "device": "train.device", "threads": "train.threads",
}
_DISTILL = {
    "teacher": "model.teacher", "teacher_weights": "model.teacher_weights", "student": "model.student",
    "student_weights": "model.student_weights", "method": "method.name", "teacher_cache": "cache.dir",
}
# cache-teacher trains nothing: its --batch-size is the teacher's batch
_CACHE = {"teacher": "model.teacher", "teacher_weights": "model.teacher_weights", "topk": "cache.topk",
          "batch_size": "train.eval_batch_size"}
_TRAIN = {"model": "model.student", "weights": "model.student_weights"}
_SYNTH = {"data": "data.source", "out": "out", "seed": "train.seed", "device": "train.device",
          "threads": "train.threads", "teacher": "model.teacher", "teacher_weights": "model.teacher_weights",
          "images": "synth.images", "iters": "synth.iters", "batch_size": "synth.batch_size", "lr": "synth.lr",
          "student": "model.student", "student_weights": "model.student_weights"}


def _nest(key: str, value: object) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def resolve_config(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    layers = [load_yaml(args.config)] if args.config else []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            layers.append(_nest(key, value))
    if getattr(args, "no_progress", False):
        layers.append({"train": {"progress": False}})
    for text in args.set or []:
        layer = parse_override(text)
        if "out" in layer and (layer["out"] is None or not str(layer["out"]).strip()):
            raise UserError(f"--set {text} leaves the run folder empty; name it (--out DIR or --set out=DIR)")
        layers.append(layer)
    if getattr(args, "plugin", None):
        layers.append({"plugins": args.plugin})  # saved with the run, so --resume and eval import them too
    return build_config(layers)


def _add_common(p: argparse.ArgumentParser, run_dir: bool = True, trains: bool = True) -> None:
    p.add_argument("--config", help="YAML config file (every option below is also a key there)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--data",
                   help="digits | mnist5k | cifar10:DIR | cifar100:DIR | imagefolder:PATH | synthetic:DIR[,DIR]")
    if run_dir:
        p.add_argument("--out", help="run directory (default runs/<mode>-<method>-<model>)")
    p.add_argument("--epochs", type=int)
    if trains:
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
    else:  # cache-teacher trains nothing: its batches are the teacher's
        p.add_argument("--batch-size", type=int, help="images per teacher batch (train.eval_batch_size)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    if run_dir:
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch stays)")


def _check_processes(cfg: Config) -> None:
    """Under torchrun, a global batch that does not split over the processes fails before any of
    them imports the models or waits for the others (run() checks it again for library callers)."""
    from vitdistill.engine.distributed import check_batch_size

    check_batch_size(cfg.train.batch_size)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args, {**_COMMON, **_TRAIN})
    if cfg.method.get("name") != "none":
        raise UserError("`train` fits a model on labels only; use `distill` for a method with a teacher")
    _check_processes(cfg)
    from vitdistill.engine.run import run

    _print_summary(run(cfg, "train", resume=args.resume))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = resolve_config(args, {**_COMMON, **_DISTILL})
    _check_processes(cfg)
    from vitdistill.engine.run import run

    _print_summary(run(cfg, "distill", resume=args.resume))
    return 0


def _print_summary(summary: dict) -> None:
    keys = ["method", "student", "student_top1", "teacher", "teacher_top1", "agreement", "params", "flops",
            "latency_ms_b1", "wall_s", "stopped_after_epoch"]
    print(json.dumps({k: summary.get(k) for k in keys if summary.get(k) is not None}))


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from vitdistill.engine.setup import cache_teacher

    cfg = resolve_config(args, {**_COMMON, **_CACHE})
    cache_dir = args.cache or cfg.cache.dir
    if not cache_dir:
        raise UserError("cache-teacher needs --cache DIR, the folder to write the teacher cache to")
    print(json.dumps(cache_teacher(cfg, cache_dir)))
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from vitdistill.datafree import synthesize

    cfg = resolve_config(args, _SYNTH)
    if not cfg.out:
        raise UserError("synthesize needs --out DIR, the folder to write the synthetic data set to")
    print(json.dumps(synthesize(cfg, cfg.out)))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vitdistill.compare import compare_cli

    return compare_cli(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from vitdistill.evaluation import evaluate_cli

    print(json.dumps(evaluate_cli(args)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vitdistill.export import export_cli

    print(json.dumps(export_cli(args)))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from vitdistill.evaluation import profile_cli

    print(json.dumps(profile_cli(args)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vitdistill.demo import STUDENT_EPOCHS, run_demo

    if not args.scale > 0 or args.scale == float("inf"):
        raise UserError(f"--scale {args.scale}: give a positive number (1 is the demo, tests use 0.1)")
    # said here in the demo's own flags: the config keys they become are not the demo's to set
    if args.scale * STUDENT_EPOCHS >= 2**31:
        raise UserError(f"--scale {args.scale:g}: give a smaller one (the students' {STUDENT_EPOCHS} epochs times "
                        "it must stay below 2**31)")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed {args.seed}: give a whole number from 0 to 2**63 - 1")
    from vitdistill.engine.io import check_folder

    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise UserError(f"--threads {args.threads}: give a number from 1 to {MAX_THREADS}")
    check_folder(args.out)
    run_demo(Path(args.out), seed=args.seed, epochs_scale=args.scale, threads=args.threads)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from vitdistill.methods import METHODS, method_knobs

    for name, cls in METHODS.items():
        knobs = ", ".join(f"{k}={v}" for k, v in method_knobs(cls).items()) or "-"
        origin = "" if cls.__module__.startswith("vitdistill.") else f"\n{'':<12} plugin: {_origin(cls)}"
        print(f"{name:<12} {cls.summary}\n{'':<12} paper: {cls.paper}\n{'':<12} knobs: {knobs}{origin}")
    return 0


def _origin(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    return getattr(module, "__file__", None) or cls.__module__


def cmd_models(args: argparse.Namespace) -> int:
    import timm

    from vitdistill.models import TINY_MODELS

    if args.timm:
        import fnmatch

        tiny = [n for n in [*TINY_MODELS, "rednet_micro_inv"] if fnmatch.fnmatchcase(n, args.timm)]
        names = timm.list_models(args.timm)
        if not names and not tiny:
            hint = did_you_mean(args.timm, [*TINY_MODELS, *timm.list_models()]) if "*" not in args.timm else ""
            raise UserError(f"no model matches '{args.timm}'{hint}; patterns take wildcards, e.g. --timm 'deit*'")
        for name in tiny:
            print(f"{name}  (registered tiny config)")
        for name in names:
            print(name)
        return 0
    print("registered tiny configs (any timm model name works too; `vitdistill models --timm 'deit*'`):")
    for name, tiny in TINY_MODELS.items():
        print(f"  {name:<32} {tiny.summary}  [timm {tiny.arch}]")
    print(f"  {'rednet_micro_inv':<32} involution network (RedNet-style, ~0.3M params), Co-advise's second teacher")
    return 0


# what an interrupted command kept, and how to go on from it
_INTERRUPTED = {
    "train": "interrupted; each finished epoch is saved (none before the first): continue with the same command "
             "and --resume",
    "distill": "interrupted; each finished epoch is saved (none before the first): continue with the same command "
               "and --resume",
    "cache-teacher": "interrupted; the finished epochs are saved, rerun the same command to write the rest",
    "synthesize": "interrupted; the finished batches are saved under OUT/parts, rerun the same command to continue",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: the usage block is what ``--help`` is for."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitdistill", description="Compress Vision Transformers by distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on labels (a teacher, or a no-KD baseline)")
    _add_common(p)
    p.add_argument("--model", help="tiny registered config or timm model name")
    p.add_argument("--weights", help="initial weights (safetensors, torch file or run directory)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distill a teacher into a student with a method")
    _add_common(p)
    p.add_argument("--teacher", help="teacher model name")
    p.add_argument("--teacher-weights", help="teacher weights (safetensors, torch file or run directory)")
    p.add_argument("--student", help="student model name")
    p.add_argument("--student-weights", help="initial student weights")
    p.add_argument("--method", help="distillation method; `vitdistill methods` lists them")
    p.add_argument("--teacher-cache", help="replay a teacher cache written by `vitdistill cache-teacher` "
                   "(several teachers: one cache each, comma-separated, in the teachers' order)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("cache-teacher", help="store the teacher's top-k outputs for every sample and epoch")
    _add_common(p, run_dir=False, trains=False)
    p.add_argument("--teacher", help="teacher model name")
    p.add_argument("--teacher-weights", help="teacher weights (safetensors, torch file or run directory)")
    p.add_argument("--topk", type=int, help="logits kept per sample and epoch (default 10)")
    p.add_argument("--cache", help="folder of the cache (written, or resumed when it exists); several teachers: "
                   "one folder each, comma-separated")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("synthesize", help="data-free: make training images from a teacher (DeepInversion)",
                       description="Optimise images from noise until the teacher's BatchNorm statistics and "
                       "decisions match (Yin et al. 2020), and write them as a data set for --data synthetic:DIR. "
                       "--data names the real set whose classes, size and test split they stand for.")
    p.add_argument("--config", help="YAML config file (its synth: section holds every knob)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="dotted override, e.g. --set synth.bn_weight=0.1 (repeatable)")
    p.add_argument("--data", help="the real data set the images stand for: digits | mnist5k | cifar10:DIR | ...")
    p.add_argument("--out", help="folder of the synthetic data set (an interrupted run continues there)")
    p.add_argument("--teacher", help="teacher model name (a CNN with BatchNorm layers)")
    p.add_argument("--teacher-weights", help="teacher weights (safetensors, torch file or run directory)")
    p.add_argument("--images", type=int, help="how many images to make (default 2560)")
    p.add_argument("--iters", type=int, help="optimisation steps per batch (default 300)")
    p.add_argument("--batch-size", type=int, help="images optimised together (default 256)")
    p.add_argument("--lr", type=float, help="Adam step size on pixels in [0, 1] (default 0.1)")
    p.add_argument("--student", help="Adaptive DeepInversion (with --set synth.competition_weight=0.2): the "
                   "trained student to compete with, a run directory or a model name with --student-weights")
    p.add_argument("--student-weights", help="weights of --student when it is a model name")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("compare", help="run a grid of methods x students over seeds and write a leaderboard",
                       description="Run every cell (method x student) of the config's 'compare:' section for every "
                       "seed, resuming what is unfinished, then write leaderboard.csv/.md/.html and plots into --out.")
    p.add_argument("--config", help="run config with a 'compare:' section of seeds and cells (docs/compare.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="dotted override for every run, e.g. --set train.epochs=3 or compare.seeds=[0] (repeatable)")
    p.add_argument("--out", help="the compare folder (default: the config's out, else runs/compare-<config name>)")
    only = p.add_mutually_exclusive_group()  # a plan that writes nothing, or a report that trains nothing
    only.add_argument("--dry-run", action="store_true", help="print the plan (teacher, caches, runs and their state)")
    only.add_argument("--report-only", action="store_true",
                   help="rebuild the leaderboard from the finished runs in --out; trains nothing")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bar (the k/N lines stay)")
    p.add_argument("--shard", metavar="K/N",
                   help="run only runs K, K+N, K+2N... of the plan, so N processes or machines share one --out; "
                   "shard 1 trains the grid's teacher, the others wait for it")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="top-1/top-5 of a model (and agreement with a teacher)")
    p.add_argument("--student", required=True, help="a run directory, or a model name with --weights")
    p.add_argument("--weights", help="weights file: required with a model name; with a run directory, other weights "
                   "for the run's model (default: the run's own)")
    p.add_argument("--data", help="data source (default: the run's)")
    p.add_argument("--teacher", help="teacher name, for agreement")
    p.add_argument("--teacher-weights", help="teacher weights, for agreement")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="the student as an ONNX file (uint8 images in, logits out), checked in "
                       "ONNX Runtime; --int8 adds a quantized twin")
    p.add_argument("--student", required=True, help="a run directory, or a model name with --weights")
    p.add_argument("--weights", help="weights file: required with a model name; with a run directory, other weights "
                   "for the run's model (default: the run's own)")
    p.add_argument("--data", help="data source, for the class count, input size and the check (default: the run's)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version, 18 to 25")
    p.add_argument("--int8", nargs="?", const="dynamic", choices=("dynamic", "static"), default=None,
                   help="also write OUT.int8.onnx and score it: 'dynamic' (the default) quantizes the weights and "
                   "each activation's range at run time, 'static' fixes the activation ranges from --calib "
                   "training images")
    p.add_argument("--calib", type=int, default=256, help="training images that calibrate --int8 static")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the check (default: its own)")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("profile", help="parameters, FLOPs, latency, throughput and peak memory of a model")
    p.add_argument("--model", required=True, help="a model name or a run directory")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's, else 32)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="batch for throughput and memory")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", help="teacher, no-KD student and deit-hard student on the embedded digits set")
    p.add_argument("--out", default="runs/demo", help="folder of the three runs, demo.json and demo.md")
    p.add_argument("--seed", type=int, default=0, help="seed of all three runs (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads of every run (default: one per core); a run's "
                   "figures move a little with the thread count")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every epoch count (tests use < 1)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list the distillation methods")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("models", help="list the tiny registered models (and timm's with --timm PATTERN)")
    p.add_argument("--timm", metavar="PATTERN", help="list timm model names matching a wildcard pattern")
    p.set_defaults(func=cmd_models)
    for p in sub.choices.values():
        p.add_argument("--plugin", action="append", metavar="MODULE",
                       help="a module or .py file that registers methods or models (repeatable; docs/plugins.md)")
    return parser


# The commands that run under torchrun with several processes (docs/distributed.md).
_DISTRIBUTED = ("train", "distill", "cache-teacher", "compare")


def _rank_world() -> tuple[int, int]:
    """RANK and WORLD_SIZE as torchrun sets them; (0, 1) in a plain process."""
    try:
        return int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 0, 1


# flags that name a file or folder, where an empty value would otherwise read as "not given"
_FILE_FLAGS = ("weights", "teacher_weights", "student_weights", "teacher_cache", "cache", "config")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler's stop), met as Ctrl-C is so that the same clean-up
    runs: no temporary file or half-made folder is left behind."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _main(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    rank, world = _rank_world()
    try:
        if world > 1 and args.command not in _DISTRIBUTED:
            raise UserError(f"`{args.command}` runs in one process; start it without torchrun (only "
                            f"{', '.join(_DISTRIBUTED)} use several)")
        for dest in _FILE_FLAGS:  # `--weights "$W"` with W unset must not train from scratch in silence
            value = getattr(args, dest, None)
            if isinstance(value, str) and not value.strip():
                flag = "--" + dest.replace("_", "-")
                raise UserError(f"{flag} is empty; give a file or folder, or leave {flag} out")
        from vitdistill import plugins

        plugins.load_plugins(plugins.normalise(args.plugin or []))  # and the installed entry points
        # Under torchrun rank 0 speaks for all: the others' lines would repeat it N times.
        with open(os.devnull, "w") as sink, (contextlib.redirect_stdout(sink) if rank else contextlib.nullcontext()):
            code = func(args)
            sys.stdout.flush()  # here, not at exit: a reader that went away (`| head`) is met below
            return code
    except BrokenPipeError:
        # stop quietly, as a Unix tool does; the interpreter's last flush must not meet the pipe again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    except UserError as exc:
        # Every rank reports: torchrun may stop rank 0 before it prints when another rank failed first,
        # and an error met by one rank alone must not be silent.
        print(f"error: {exc}" + (f" (rank {rank})" if rank else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(_INTERRUPTED.get(args.command, "interrupted"), file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130  # 128 + the signal, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
