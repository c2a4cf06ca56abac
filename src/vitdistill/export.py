"""``vitdistill export``: the distilled student as an ONNX file, checked against PyTorch.

Shipping the student to smaller hardware usually means an ONNX runtime. The exported graph takes
what vitdistill's data layer yields, uint8 images ``[N, C, H, W]`` with a free batch size, and
holds the student's own input preparation (resize to its resolution, its mean and std), so
nothing has to be re-implemented beside it. A distillation-token student gives DeiT's average of
its two heads, as ``vitdistill eval`` scores it. The export uses ``torch.onnx.export`` (the
``torch.export`` based exporter); the check runs the file in ONNX Runtime over the test split and
reports its top-1 beside PyTorch's, the largest logit difference and the latency at batch 1.
``--int8`` also writes an int8 twin (Jacob et al., *Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference*, CVPR 2018) and scores it the same way. Each float
tensor ``x`` of a quantized operator is stored as ``q = clamp(round(x / s) + z, -128, 127)`` and
read back as ``s * (q - z)``:

- ``--int8`` or ``--int8 dynamic``: the weights of every MatMul are int8, and each activation's
  scale ``s`` is computed from its own range at run time (ONNX Runtime's ``quantize_dynamic``).
- ``--int8 static``: the weights of MatMul, Gemm and Conv are int8 per output channel, and each
  activation's scale and zero point are fixed from its min and max over ``--calib`` training images
  (``quantize_static``, QDQ format, int8 activations: ONNX Runtime's recommended S8S8). The graph
  then needs no float range arithmetic at run time, the form that integer-only accelerators and
  their runtimes take. LayerNorm, softmax and GELU stay in float, where a ViT's outliers live.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from vitdistill.config import MAX_THREADS
from vitdistill.engine.evaluate import accuracy, predict
from vitdistill.engine.io import check_folder, make_folder, remove_folders
from vitdistill.errors import UserError
from vitdistill.evaluation import load_student
from vitdistill.models import InputPrep


class _Deployable(torch.nn.Module):
    """uint8 images -> logits: the student behind its own input preparation."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.prep = InputPrep.for_model(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prep(images))


def _runtime():  # noqa: ANN202
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime; install them with "
                        "pip install 'vitdistill[export]' (the dev extras include them)") from None
    return onnxruntime


def _open(ort, path: Path, threads: int | None, name: str):  # noqa: ANN001, ANN202
    """An ONNX Runtime session on the CPU, or a one-line error when the runtime refuses the file."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # e.g. an opset this ONNX Runtime does not implement
        raise UserError(f"ONNX Runtime cannot run the export of '{name}': {_first_line(exc)}; "
                        "try the default --opset 18") from None


def _score(session, split, batch: int) -> tuple[torch.Tensor, float]:  # noqa: ANN001
    """The session's logits on a split and its median latency in ms at batch 1."""
    logits = predict(lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), split, batch,
                     torch.device("cpu"))
    one = {"images": split.images[:1].numpy()}
    for _ in range(5):
        session.run(None, one)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        session.run(None, one)
        times.append((time.perf_counter() - start) * 1000)
    return logits, statistics.median(times)


def _calibration_reader(images: torch.Tensor, n: int, batch: int):  # noqa: ANN202
    """A fixed sample of ``n`` training images (seed 0, no augmentation) in batches, as
    ``quantize_static`` reads them."""
    from onnxruntime.quantization import CalibrationDataReader

    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
    chunks = [images[pick[i:i + batch]].numpy() for i in range(0, len(pick), batch)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(chunks)

        def get_next(self) -> dict | None:
            chunk = next(self.left, None)
            return None if chunk is None else {"images": chunk}

        def rewind(self) -> None:
            self.left = iter(chunks)

    return _Reader()


def _quantize(src: Path, dst: Path, mode: str, train_images: torch.Tensor, calib: int) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # shapes and constant folding first, as ONNX Runtime advises for static quantization
    pre = dst.with_name(dst.name + ".pre")
    try:
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(dst), _calibration_reader(train_images, calib, 32),
                        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    finally:
        pre.unlink(missing_ok=True)


_NEWEST_OPSET = 25


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def export_cli(args: argparse.Namespace) -> dict:
    """Export, then check the file (and its int8 twin with ``--int8``) on the test split."""
    ort = _runtime()
    if args.calib < 1:
        raise UserError(f"--calib {args.calib}: static int8 needs at least one calibration image, e.g. --calib 256")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: give at least 1")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise UserError(f"--threads {args.threads}: give a number from 1 to {MAX_THREADS}, or leave it out for ONNX "
                        "Runtime's own")
    import onnx

    # torch's exporter writes opset 18 and up; above 25 its version converter (torch 2.14, onnxscript)
    # fails on GELU and leaves an Attention node ONNX Runtime cannot load, so those are refused up front
    newest = min(onnx.defs.onnx_opset_version(), _NEWEST_OPSET)
    if not 18 <= args.opset <= newest:
        raise UserError(f"--opset {args.opset}: give an opset from 18 to {newest} (default 18)")
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UserError(f"--out '{out}' should name an .onnx file, e.g. runs/NAME/student.onnx")
    int8_path = out.with_name(out.stem + ".int8.onnx")
    for path in (out, int8_path) if args.int8 else (out,):
        if path.exists():
            raise UserError(f"'{path}' already exists; remove it or choose another --out")
    check_folder(out)  # a file where a folder above it should be
    name, cfg, data, model = load_student(args.student, args.weights, args.data, "export")
    deployable = _Deployable(model).eval()
    sample = data.test.images[:1].repeat(2, 1, 1, 1)  # two images: a batch of one would be traced as fixed
    created = make_folder(out.parent)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp8 = int8_path.with_name(f".{int8_path.name}.{os.getpid()}.tmp")
    done = False
    try:  # both files are scored under temporary names and renamed only once everything has passed
        try:
            torch.onnx.export(deployable, (sample,), str(tmp), dynamo=True, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              opset_version=args.opset, external_data=False, verbose=False)
        except Exception as exc:  # the exporter's errors are long; the user needs their first line
            raise UserError(f"could not export '{name}' to ONNX: {_first_line(exc)}") from None
        with torch.no_grad():
            torch_logits = predict(deployable, data.test, args.batch_size, torch.device("cpu"))
        onnx_logits, latency = _score(_open(ort, tmp, args.threads, name), data.test, args.batch_size)
        result = {"model": name, "data": cfg.data.source, "n": len(data.test), "onnx": str(out),
                  "bytes": tmp.stat().st_size, "opset": args.opset,
                  "input": {"name": "images", "dtype": "uint8", "shape": ["batch", data.in_chans, data.img_size,
                                                                       data.img_size]},
                  "max_abs_logit_diff": float((onnx_logits - torch_logits).abs().max()),
                  "top1_torch": accuracy(torch_logits, data.test.labels)["top1"],
                  "top1_onnx": accuracy(onnx_logits, data.test.labels)["top1"],
                  "agreement_onnx_torch": float((onnx_logits.argmax(1) == torch_logits.argmax(1)).float().mean()),
                  "latency_ms_b1_onnxruntime": round(latency, 4)}
        if args.int8:
            calib = min(args.calib, len(data.train)) if args.int8 == "static" else None
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # its advice to pre-process is taken (static) or beside the point (dynamic)
            try:
                _quantize(tmp, tmp8, args.int8, data.train.images, calib or 0)
            except Exception as exc:  # as for the export: the first line says what failed
                raise UserError(f"could not quantize '{name}' to int8 ({args.int8}): {_first_line(exc)}; "
                                "nothing was written, export without --int8 or try the other mode") from None
            finally:
                root.setLevel(level)
            q_logits, q_latency = _score(_open(ort, tmp8, args.threads, name), data.test, args.batch_size)
            result["int8"] = {"mode": args.int8, "calibration_images": calib,
                              "onnx": str(int8_path), "bytes": tmp8.stat().st_size,
                              "top1": accuracy(q_logits, data.test.labels)["top1"],
                              "agreement_with_fp32": float((q_logits.argmax(1) == onnx_logits.argmax(1)).float().mean()),
                              "latency_ms_b1_onnxruntime": round(q_latency, 4)}
            os.replace(tmp8, int8_path)
        os.replace(tmp, out)
        done = True
    finally:
        tmp.unlink(missing_ok=True)
        tmp8.unlink(missing_ok=True)
        if not done:
            remove_folders(created)  # a failed export leaves no new folder behind either
    return result


def check_onnx(path: Path) -> None:
    """onnx's own structural check of a written file (used by the tests and by hand)."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))

