"""``eval`` and ``profile`` subcommands: score or measure a model given by name or by run directory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from vitdistill.config import Config, build_config, load_yaml
from vitdistill.data import Dataset
from vitdistill.engine.evaluate import accuracy, calibration, predict
from vitdistill.engine.setup import load_run_data
from vitdistill.engine.runtime import pick_device
from vitdistill.errors import UserError
from vitdistill.methods import build_method
from vitdistill.models import InputPrep, Teacher, create_model
from vitdistill.models.factory import load_weights, resolve_weights_path
from vitdistill.report.profile import profile_model


def _run_config(run_dir: Path) -> Config:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml); give a folder written by "
                        "`vitdistill train` or `distill`, or a model name")
    return build_config([load_yaml(run_dir / "config.yaml")])


def _build(name: str, num_classes: int, img_size: int | None, kwargs: dict, weights: str | None,
           cfg: Config | None) -> torch.nn.Module:
    """A model by name, reshaped by its run's method when that method adapts students (MiniViT's
    shared blocks, Co-advise's extra tokens), then given its weights."""
    model, _ = create_model(name, num_classes, img_size, kwargs)
    if cfg is not None:
        model = build_method(cfg.method).adapt_student(model, name)
    if weights:
        load_weights(model, weights, name)
    return model


def load_run_model(run_dir: str | Path) -> torch.nn.Module:
    """The trained model of a ``train`` or ``distill`` run directory, in eval mode, without loading
    its data: the architecture and overrides from ``config.yaml``, the class count and resolution
    from the weights' metadata, reshaped by the run's method where it adapts students (MiniViT's
    shared blocks, Co-advise's extra tokens), then the weights. The one way back for the students
    timm alone cannot rebuild."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    path = resolve_weights_path(str(run_dir))  # a run directory always yields its .safetensors
    try:
        with safe_open(str(path), "pt") as f:
            kwargs = json.loads((f.metadata() or {})["timm_kwargs"])
    except Exception:  # noqa: BLE001 - a file without vitdistill's metadata is the same problem however it fails
        raise UserError(f"'{path}' carries no timm_kwargs metadata; it was not written by vitdistill "
                        "(load it with `vitdistill eval --student NAME --weights FILE --data SOURCE`)") from None
    img_size = kwargs.get("img_size")
    if img_size is None:  # a CNN takes no img_size; its resolution is in the overlay it was built with
        input_size = (kwargs.get("pretrained_cfg_overlay") or {}).get("input_size")
        if input_size:
            h, w = input_size[1:]
            img_size = h if h == w else (h, w)
    return _build(cfg.model.student, kwargs["num_classes"], img_size, cfg.model.student_kwargs,
                  str(path), cfg).eval()


def load_student(student: str, weights: str | None, data_spec: str | None, command: str,
                 weights_flag: str = "--weights") -> tuple[str, Config, Dataset, torch.nn.Module]:
    """(name, config, data, model) for ``--student`` given as a run directory or as a model name
    with ``--weights`` and ``--data``. A run directory gives the architecture, the data and (unless
    ``--weights`` gives others, e.g. another run's of the same model) the weights; its test subset
    (``data.test_limit``) holds for its own data, while ``--data`` means that source's whole test split."""
    if not student.strip():  # Path("") is the current folder, which would be named as '.'
        raise UserError(f"--student is empty; give a run directory or a model name with {weights_flag}")
    run_dir = Path(student)
    run_cfg = None
    if "/" in student and ":" not in student and not run_dir.exists():  # a path (hub names hold a colon)
        raise UserError(f"--student '{student}' does not exist; give a run directory or a model name with "
                        f"{weights_flag}")
    if run_dir.is_file():  # a file of a run, or a weights file, where its folder or a name belongs
        raise UserError(f"--student '{student}' is a file; give its run directory (--student {run_dir.parent}) "
                        f"or a model name with {weights_flag} FILE")
    if run_dir.is_dir():
        cfg = run_cfg = _run_config(run_dir)
        name, kwargs, weights = cfg.model.student, cfg.model.student_kwargs, weights or str(run_dir)
    else:
        if not weights:
            raise UserError(f"{command} needs {weights_flag} FILE with a model name (or pass a run directory as "
                            "--student)")
        if not data_spec:
            raise UserError(f"{command} needs --data with a model name (or pass a run directory as --student)")
        cfg, name, kwargs = Config(), student, {}
    if data_spec:
        cfg.data.source, cfg.data.test_limit = data_spec, None
    data = load_run_data(cfg)
    return name, cfg, data, _build(name, data.num_classes, data.img_size, kwargs, weights, run_cfg).eval()


def evaluate_cli(args: argparse.Namespace) -> dict:
    """Top-1/top-5 on the test split, plus agreement with a teacher when one is given."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: give at least 1")
    if args.teacher_weights and not args.teacher:
        raise UserError("--teacher-weights is given with no --teacher; name the weights' architecture with "
                        "--teacher NAME")
    name, cfg, data, model = load_student(args.student, args.weights, args.data, "eval")
    device = pick_device(args.device)
    model.to(device).eval()
    prep = InputPrep.for_model(model).to(device)
    logits = predict(lambda x: model(prep(x)), data.test, args.batch_size, device)
    teacher_pred = None
    if args.teacher:
        if not args.teacher_weights:
            raise UserError(f"agreement with teacher '{args.teacher}' needs its weights; pass --teacher-weights FILE")
        tmodel, _ = create_model(args.teacher, data.num_classes, data.img_size, weights=args.teacher_weights)
        teacher = Teacher(tmodel).to(device)
        teacher_pred = predict(lambda x: teacher(x)["logits"], data.test, args.batch_size, device).argmax(1)
    result = {**accuracy(logits, data.test.labels, teacher_pred), **calibration(logits, data.test.labels)}
    return {"model": name, "data": cfg.data.source, "n": len(data.test), **result}


def profile_cli(args: argparse.Namespace) -> dict:
    """Parameters, FLOPs, latency at batch 1, throughput and peak memory at ``--batch``."""
    for flag, value in (("--img-size", args.img_size), ("--num-classes", args.num_classes), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give at least 1")
    if not args.model.strip():
        raise UserError("--model is empty; give a model name (`vitdistill models` lists them) or a run directory")
    run_dir = Path(args.model)
    if run_dir.is_file():
        raise UserError(f"--model '{args.model}' is a file; give its run directory (--model {run_dir.parent}) or a "
                        "model name (`vitdistill models` lists them)")
    num_classes, kwargs, name = args.num_classes, {}, args.model
    img_size = args.img_size
    cfg = None
    if run_dir.is_dir():
        cfg = _run_config(run_dir)
        name, kwargs = cfg.model.student, cfg.model.student_kwargs
        if (run_dir / "summary.json").is_file():  # the class count and input size the run trained with
            try:
                summary = json.loads((run_dir / "summary.json").read_text())
                num_classes = summary["timm_spec"]["kwargs"]["num_classes"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"'{run_dir / 'summary.json'}' is damaged; remove it to profile the run's "
                                "model at --num-classes, or re-run the training") from None
            img_size = img_size or summary.get("img_size")
    model = _build(name, num_classes, img_size, kwargs, None, cfg)
    size = InputPrep.for_model(model).size or img_size or 32
    try:
        result = profile_model(model, (3, size, size), device=str(pick_device(args.device)), batch=args.batch)
    except (RuntimeError, MemoryError) as exc:  # torch's allocators say it in a RuntimeError
        if not isinstance(exc, MemoryError) and not any(w in str(exc) for w in ("alloc", "out of memory", "overflow")):
            raise
        raise UserError(f"not enough memory to profile '{name}' at --batch {args.batch} of {size}-px images; "
                        "give a smaller --batch") from None
    return {"model": name, "img_size": size, **result}
