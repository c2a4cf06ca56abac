"""The speed switches of ``train`` (engine/speed.py): they change how fast a run goes, never what it
computes beyond float rounding, and their bad values are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, distill_args, run_cli_fast, run_cli_here
from vitdistill.config import TrainConfig
from vitdistill.engine import speed
from vitdistill.models import Teacher, create_model


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_channels_last_teacher_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    model, _ = create_model("resnet_micro_cnn", 10, 32, {})
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    teacher = Teacher(model)
    plain = teacher(images)["logits"]
    teacher.to_channels_last()
    assert next(p for p in teacher.model.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(teacher(images)["logits"], plain, rtol=1e-4, atol=1e-4)


def test_channels_last_selects_cnn_teachers_only() -> None:
    cnn, _ = create_model("resnet_micro_cnn", 10, 32, {})
    vit, _ = create_model("vit_femto_patch4_16", 10, 16, {})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert speed.is_convnet(cnn) and not speed.is_convnet(vit)
    assert speed.wants_channels_last(True, cnn, cpu) and not speed.wants_channels_last(True, vit, cpu)
    assert not speed.wants_channels_last(None, cnn, cpu) and speed.wants_channels_last(None, cnn, cuda)
    assert not speed.wants_channels_last(False, cnn, cuda)
    teachers = [Teacher(cnn), Teacher(vit)]
    assert speed.channels_last_teachers(TrainConfig(channels_last=True), teachers, cpu) == ["teacher 0: channels-last"]
    assert teachers[0].channels_last and not teachers[1].channels_last


def test_optimizer_kernels_take_the_same_steps() -> None:
    """fused, foreach and for-loop AdamW are the same update (the kernels round differently)."""
    results = {}
    for kind in ("foreach", "fused", "for-loop"):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = speed.make_optimizer([{"params": list(model.parameters()), "weight_decay": 0.05}],
                                   TrainConfig(optimizer=kind, lr=1e-2), torch.device("cpu"))
        assert opt.defaults["fused"] is (True if kind == "fused" else None)
        assert opt.defaults["foreach"] is {"foreach": True, "fused": None, "for-loop": False}[kind]
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results[kind] = model.weight.detach().clone()
    torch.testing.assert_close(results["fused"], results["foreach"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["for-loop"], results["foreach"], rtol=1e-5, atol=1e-6)
    auto = speed.optimizer_kernel(TrainConfig(), torch.device("cpu"))
    assert auto == ("fused" if speed.fused_supported(torch.device("cpu")) else "foreach")


def test_compiled_distill_matches_eager_and_keeps_plain_weights(tmp_path: Path, teacher_run: Path) -> None:
    """``train.compile`` with the aot_eager backend (torch.compile's tracing without code generation,
    so the check runs in seconds): the run writes the eager model's weight names and ends within
    float tolerance of the eager run."""
    args = distill_args("deit-hard", "deit_femto_distilled_patch4_16", "resnet_micro_cnn", teacher_run)
    assert run_cli_here(*args, "--out", str(tmp_path / "eager")) == 0
    r = run_cli_fast(*args, "--out", str(tmp_path / "compiled"), "--set", "train.compile=true",
                     "--set", "train.compile_backend=aot_eager")
    assert r.returncode == 0, r.stderr
    assert "speed: student: torch.compile; teacher 0: torch.compile" in r.stdout
    eager = load_file(str(tmp_path / "eager" / "student.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "student.safetensors"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-3)
    a, b = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    for row_a, row_b in zip(a, b):
        assert row_b["train_loss"] == pytest.approx(row_a["train_loss"], rel=1e-3)
        assert abs(row_b["test_top1"] - row_a["test_top1"]) <= 2 / 128  # one or two borderline test digits


def test_compile_leaves_tapped_models_eager(tmp_path: Path, teacher_run: Path) -> None:
    args = distill_args("hidden", "vit_femto_patch4_16", "resnet_micro_cnn", teacher_run)
    r = run_cli_fast(*args, "--out", str(tmp_path / "run"), "--epochs", "1", "--set", "train.compile=true",
                     "--set", "train.compile_backend=aot_eager")
    assert r.returncode == 0, r.stderr
    assert "student: eager (its features are tapped)" in r.stdout
    assert "teacher 0: eager (its features are tapped)" in r.stdout


@pytest.mark.parametrize("key, value, expected", [
    ("train.compile_backend", "nope", "unknown train.compile_backend 'nope'"),
    ("train.compile_mode", "fastest", "train.compile_mode must be one of"),
    ("train.optimizer", "sgd", "train.optimizer must be one of"),
    ("train.channels_last", "fast", "config key 'train.channels_last' expects"),
])
def test_bad_speed_keys_are_one_line_errors(tmp_path: Path, key: str, value: str, expected: str) -> None:
    out = tmp_path / "run"
    r = run_cli_fast("train", "--model", "vit_femto_patch4_16", "--epochs", "1", *TINY, "--out", str(out),
                     "--set", "train.compile=true", "--set", f"{key}={value}")
    assert r.returncode == 2
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_resume_of_a_run_saved_before_the_speed_keys(tmp_path: Path) -> None:
    """A checkpoint whose saved config predates the speed keys still resumes (they were not choosable
    then); a key that existed and differs still blocks it."""
    out = tmp_path / "run"
    args = ["train", "--model", "vit_femto_patch4_16", "--epochs", "2", *TINY, "--out", str(out)]
    assert run_cli_here(*args, "--set", "train.stop_after=1") == 0
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    saved = json.loads(state["config"])
    for key in ("optimizer", "compile", "compile_backend", "compile_mode", "channels_last"):
        del saved["train"][key]
    state["config"] = json.dumps(saved)
    torch.save(state, ckpt)
    r = run_cli_fast(*args, "--resume", "--set", "train.lr=0.5")
    assert r.returncode == 2 and "train.lr" in r.stderr
    assert run_cli_here(*args, "--resume") == 0
    assert len(_metrics(out)) == 2


def test_train_step_hands_teacher_outputs_over_after_the_student_forward() -> None:
    """``train.teacher_stream``: the step waits for the teacher (``consume``) after queueing the
    student's forward and before the loss, the point that lets a side CUDA stream overlap them."""
    from vitdistill.engine.distributed import TrainStep
    from vitdistill.engine.trainer import LiveTeacher
    from vitdistill.methods import build_method
    from vitdistill.models import InputPrep

    order: list[str] = []
    student, _ = create_model("vit_femto_patch4_16", 10, 16, {})
    student.register_forward_hook(lambda *_: order.append("student"))

    class Source(LiveTeacher):
        def consume(self, outputs):
            order.append("consume")

    method = build_method({"name": "logit-kd"}, 0.0)
    real = method.forward
    method.forward = lambda s, t, y: (order.append("method"), real(s, t, y))[1]
    teacher = Teacher(create_model("resnet_micro_cnn", 10, 16, {})[0])
    source = Source(teacher)
    step = TrainStep(student, InputPrep.for_model(student), method, None, source)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = step(images, source(images, torch.arange(4), 0), torch.tensor([0, 1, 2, 3]))
    assert order == ["student", "consume", "method"]
    assert out["loss"].requires_grad
    assert LiveTeacher(teacher).stream is None  # no side stream unless train.teacher_stream on CUDA
    plain = TrainStep(student, InputPrep.for_model(student), method, None, None)
    assert plain.consume is None


def test_progress_figures_on_cpu_are_read_at_once() -> None:
    from vitdistill.engine.runtime import RunningFigures

    running = RunningFigures(torch.device("cpu"))
    assert running.update(torch.tensor(6.0), torch.tensor(3), 4) == (1.5, 0.75)


def test_cpu_compile_drops_only_the_cuda_home_note(caplog: pytest.LogCaptureFixture) -> None:
    """Inductor on a CPU machine with a CUDA toolkit logs "No CUDA runtime is found, using
    CUDA_HOME=..." through torch's cpp_extension logger; a run filters that line and no other."""
    import logging

    from vitdistill.engine.speed import quiet_cpu_compile

    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet_cpu_compile()
    quiet_cpu_compile()
    assert sum(type(f).__name__ == "_NoCudaRuntimeNote" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
