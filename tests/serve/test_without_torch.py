"""What an install without PyTorch (a plain `pip install imgrec`, no extras) says when asked for
what needs it: one line naming the extra, or the command that makes a directory servable.

PyTorch is hidden in process here (``sys.modules["torch"] = None``: imports of it fail, and
``importlib.util.find_spec`` finds nothing); tests/deploy/test_wheel.py does the same in a
fresh venv where it is truly absent."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.model.directory import ModelDirError
from app.serving import predictor as predictor_module
from app.serving.predictor import Predictor, resolve_device

# modules that import torch at the top: imported anew (and failing) while torch is hidden
TORCH_MODULES = ["app.nn.export", "app.nn.quantize", "app.training.cli",
                 "app.training.quantize_cli", "app.serving.engine_torch"]


@pytest.fixture()
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["torch", "torchvision"]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in TORCH_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert not predictor_module.torch_installed()


@pytest.fixture()
def graphless(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model directory as the trainer's older releases left them: no model.onnx."""
    root = shutil.copytree(tiny_model_dir, tmp_path / "graphless")
    (root / "model.onnx").unlink(missing_ok=True)
    return root


@pytest.mark.usefixtures("no_torch")
def test_a_directory_without_its_graph_is_refused_with_the_command_that_exports_it(
        graphless: Path) -> None:
    with pytest.raises(ModelDirError) as refused:
        Predictor(graphless, device="cpu")
    message = str(refused.value)
    assert "\n" not in message
    assert "no inference graph (model.onnx)" in message
    assert f"imgrec export {graphless}" in message


@pytest.mark.usefixtures("no_torch")
def test_the_torch_engine_without_torch_names_the_gpu_extra(tiny_model_dir: Path) -> None:
    with pytest.raises(RuntimeError, match=r"pip install 'imgrec\[gpu\]'"):
        Predictor(tiny_model_dir, device="cpu", engine="torch")


@pytest.mark.usefixtures("no_torch")
def test_auto_device_without_torch_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predictor_module, "_gpu_may_exist", lambda: True)  # a driver is there
    assert resolve_device("auto") == "cpu"


@pytest.mark.usefixtures("no_torch")
@pytest.mark.parametrize(("argv", "extra"), [
    (["train", "--help"], "train"),
    (["evaluate", "--help"], "train"),
    (["export", "{dir}"], "export"),
    (["quantize", "{dir}"], "export"),
])
def test_commands_that_need_torch_name_the_extra_in_one_line(
        argv: list[str], extra: str, tiny_model_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(dir=tiny_model_dir) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"imgrec {argv[0]}: needs PyTorch"), err
    assert err[0].endswith(f"pip install 'imgrec[{extra}]'"), err


def test_other_missing_modules_are_not_taken_for_a_missing_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "no_such_module_of_imgrec", None)

    def broken(command: str, rest: list[str]) -> int:
        import no_such_module_of_imgrec  # noqa: F401

        return 0

    monkeypatch.setattr("app.cli._run", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["export", "x"])


@pytest.mark.usefixtures("no_torch")
def test_indexing_with_a_directory_without_its_graph_is_one_line(
        graphless: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir()
    assert main(["index", str(catalogue), "--model-dir", str(graphless), "--store", "memory",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("imgrec index: ") and f"imgrec export {graphless}" in err[-1], err
