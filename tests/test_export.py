"""``vitdistill export``: an ONNX file that ONNX Runtime scores like PyTorch, and its int8 twin."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli_fast, run_cli_here
from vitdistill.data import load_data


@pytest.fixture(scope="module")
def token_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distillation-token student trained on digits (both heads on the label) far enough for its
    int8 twin's agreement to mean something (about 47 % top-1 on the 359 test digits, in 10 s)."""
    out = tmp_path_factory.mktemp("runs") / "deit-student"
    assert run_cli_here("train", "--model", "deit_femto_distilled_patch4_16", "--epochs", "8", "--lr", "2e-3",
                        "--batch-size", "64", "--threads", "1", "--no-progress", "--out", str(out)) == 0
    assert json.loads((out / "summary.json").read_text())["student_top1"] > 0.4
    return out


def _json(r) -> dict:  # noqa: ANN001
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_export_matches_pytorch_and_eval(token_student: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    import timm
    from safetensors.torch import load_file

    from vitdistill.export import check_onnx

    out = tmp_path / "deploy" / "student.onnx"
    got = _json(run_cli_fast("export", "--student", str(token_student), "--out", str(out), "--int8",
                             "--threads", "1"))
    check_onnx(out)
    evaluated = _json(run_cli_fast("eval", "--student", str(token_student)))
    assert got["top1_onnx"] == got["top1_torch"] == evaluated["top1"]  # the full test split, both heads averaged
    assert got["agreement_onnx_torch"] == 1.0 and got["max_abs_logit_diff"] < 1e-4
    assert got["input"] == {"name": "images", "dtype": "uint8", "shape": ["batch", 3, 16, 16]}
    assert not list(out.parent.glob(".*tmp"))  # written through a temporary file

    # uint8 images of any batch size in, the student's logits out: the graph holds its normalisation
    spec = json.loads((token_student / "summary.json").read_text())["timm_spec"]
    model = timm.create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(load_file(token_student / "model.safetensors"))  # `train` names it so
    model.eval()
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, -1, 1, 1) * 255
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, -1, 1, 1) * 255
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = load_data("digits").test.images
    for n in (1, 5):
        logits = session.run(None, {"images": images[:n].numpy()})[0]
        with torch.no_grad():
            want = model((images[:n].float() - mean) / std)
        assert logits.shape == (n, 10) and torch.allclose(torch.from_numpy(logits), want, atol=1e-4)

    q = got["int8"]
    assert q["mode"] == "dynamic" and q["calibration_images"] is None  # a bare --int8
    assert "DynamicQuantizeLinear" in {n.op_type for n in __import__("onnx").load(q["onnx"]).graph.node}
    assert Path(q["onnx"]).is_file() and q["bytes"] < 0.6 * got["bytes"]  # int8 weights: under 60 % of fp32
    assert q["agreement_with_fp32"] >= 0.9 and abs(q["top1"] - got["top1_onnx"]) <= 0.05


def test_static_int8_fixes_activation_ranges_from_the_calibration_images(token_student: Path, tmp_path: Path) -> None:
    """``--int8 static``: Jacob et al.'s affine map with each activation's range fixed by min/max
    calibration, checked on the patch embedding's input, whose range the calibration images set."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from vitdistill.export import check_onnx
    from vitdistill.models import InputPrep

    out = tmp_path / "student.onnx"
    got = _json(run_cli_fast("export", "--student", str(token_student), "--out", str(out), "--int8", "static",
                             "--calib", "8", "--threads", "1"))
    q = got["int8"]
    assert q["mode"] == "static" and q["calibration_images"] == 8
    check_onnx(Path(q["onnx"]))
    graph = onnx.load(q["onnx"]).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops  # ranges are constants, not computed
    assert "LayerNormalization" in ops and "Softmax" in ops  # left in float
    assert not list(tmp_path.glob(".*"))  # neither the temporary file nor the pre-processed copy is left
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    weight = producer[conv.input[1]]
    assert weight.op_type == "DequantizeLinear" and inits[weight.input[0]].dtype == np.int8
    assert inits[weight.input[1]].shape == (inits[weight.input[0]].shape[0],)  # one scale per output channel
    consumers = {i: n for n in graph.node for i in n.input}
    first_norm = next(n for n in graph.node if n.op_type == "LayerNormalization")  # block 0's norm1
    quant = consumers[first_norm.output[0]]
    assert quant.op_type == "QuantizeLinear"
    scale, zero = float(inits[quant.input[1]]), int(inits[quant.input[2]])

    # the same 8 training images the export drew, through the student's own input preparation and
    # block 0's first LayerNorm: their min and max fix the scale and the zero point
    import timm
    from safetensors.torch import load_file

    spec = json.loads((token_student / "summary.json").read_text())["timm_spec"]
    model = timm.create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(load_file(token_student / "model.safetensors"))
    model.eval()
    train = load_data("digits").train.images
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:8]
    seen = []
    model.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(InputPrep.for_model(model)(train[pick]))
    lo, hi = min(float(seen[0].min()), 0.0), max(float(seen[0].max()), 0.0)  # the range always holds zero
    want = (hi - lo) / 255
    assert abs(scale - want) < 1e-4 * want and zero == round(-128 - lo / want)
    with torch.no_grad():
        model(InputPrep.for_model(model)(train[-8:]))
    other = (max(float(seen[1].max()), 0.0) - min(float(seen[1].min()), 0.0)) / 255
    assert abs(other - want) > 1e-3 * want  # so the check above tells which images calibrated
    assert q["bytes"] < 0.35 * got["bytes"]  # int8 MatMul, Gemm and Conv weights: about a quarter
    assert q["agreement_with_fp32"] >= 0.9 and abs(q["top1"] - got["top1_onnx"]) <= 0.05


def test_bad_export_inputs_end_in_one_line(token_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args: str, says: str) -> None:
        r = run_cli_fast("export", *args)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr

    fails("--student", str(token_student), "--out", str(tmp_path / "model.pt"), says="should name an .onnx file")
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"")
    fails("--student", str(token_student), "--out", str(taken), says="already exists")
    fails("--student", "deit_femto_distilled_patch4_16", "--out", str(tmp_path / "a.onnx"), says="--weights")
    fails("--student", str(token_student), "--out", str(tmp_path / "c.onnx"), "--int8", "static", "--calib", "0",
          says="at least one calibration image")
    assert not (tmp_path / "c.onnx").exists()
    real_import = __import__

    def no_onnxruntime(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_onnxruntime)
    fails("--student", str(token_student), "--out", str(tmp_path / "b.onnx"), says="vitdistill[export]")
    assert not (tmp_path / "b.onnx").exists()
