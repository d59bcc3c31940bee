"""A CPU host fetches, verifies and converts the released weights with the CPU install alone: the
commands run here in child processes that cannot import PyTorch, as on a host without it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Loaded by every child Python through PYTHONPATH (the converters' children too): the path finder
# made blind to PyTorch, so `import torch` fails and find_spec("torch") is None, as they are on a
# host without it (sys.modules["torch"] = None would make find_spec raise instead).
_SITECUSTOMIZE = """
import sys
from importlib.machinery import PathFinder


class _WithoutTorch(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "torch" or fullname.startswith("torch."):
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_WithoutTorch if f is PathFinder else f for f in sys.meta_path]
"""

# What a CPU host then runs: the weights verify against the pinned digest, and every engine's
# model file loads and answers, still without PyTorch.
_LOAD = """
import sys
from pathlib import Path

import numpy as np

from model.device import CPU
from model.engines import EngineOptions, load_engine
from model.weights import SPECS, verified_digest

weights = Path(sys.argv[1])
assert verified_digest(weights, "u2netp") == SPECS["u2netp"].tensors_sha256
x = np.zeros((1, 3, 320, 320), np.float32)
for engine, precision in (("mnn", "float32"), ("openvino", "float32"), ("openvino", "fast")):
    net = load_engine(engine, weights, "u2netp", EngineOptions(device=CPU, precision=precision))
    y = net.forward(x)
    assert y.shape == (1, 1, 320, 320) and np.isfinite(y).all(), (engine, precision)
    print(engine, net.arithmetic)
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
"""


@pytest.fixture(scope="module")
def without_torch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a child process that cannot import PyTorch."""
    site = tmp_path_factory.mktemp("without-torch")
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    paths = [str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )


def test_the_children_cannot_import_torch(without_torch: dict[str, str]) -> None:
    code = "import importlib.util; assert importlib.util.find_spec('torch') is None; import torch"
    done = _python(without_torch, "-c", code)
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'torch'" in done.stderr


def test_fetch_verifies_and_converts_without_torch(
    u2netp_weights: Path, tmp_path: Path, without_torch: dict[str, str]
) -> None:
    """From the verified ONNX already present (nothing downloaded): the weights, MNN's model,
    OpenVINO's float32 and int8 models; a damaged weights file is made again, a good one kept."""
    shutil.copy(u2netp_weights.with_suffix(".onnx"), tmp_path / "u2netp.onnx")
    (tmp_path / "u2netp.safetensors").write_bytes(b"garbage")
    fetch = ("-m", "weights", "fetch", "u2netp", "--dir", str(tmp_path))
    done = _python(without_torch, *fetch)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converting it again" in done.stderr
    assert "downloading" not in done.stderr
    for name in ("mnn", "f32.xml", "f32.bin", "int8.xml", "int8.bin"):
        assert (tmp_path / f"u2netp.{name}").is_file(), name
    done = _python(without_torch, *fetch)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is present and verified" in done.stderr
    done = _python(without_torch, "-c", _LOAD, str(tmp_path / "u2netp.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    # The engines' own lines (MNN prints some of its own).
    assert [
        line for line in done.stdout.splitlines() if line.startswith(("mnn ", "openvino "))
    ] == [
        "mnn float32",
        "openvino float32",
        "openvino int8+float32 (9 layers)",
    ]


def test_converting_a_pth_names_the_gpu_extra(
    tmp_path: Path, without_torch: dict[str, str]
) -> None:
    """The authors' .pth is PyTorch's format: without it, the command says what to install."""
    pth = tmp_path / "u2netp.pth"
    pth.write_bytes(b"not read")
    out = str(tmp_path / "out.safetensors")
    done = _python(
        without_torch, "-m", "weights", "convert", str(pth), "--model", "u2netp", "--out", out
    )
    assert done.returncode == 1
    assert "needs PyTorch" in done.stderr
    assert "pip install 'u2serve[gpu]'" in done.stderr
    assert "Traceback" not in done.stderr
