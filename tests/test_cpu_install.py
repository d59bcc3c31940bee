"""What a CPU host installs: ``pip install u2serve`` into a fresh virtual environment, as a user
would (its default dependencies, from pip's cache where the suite's install left the wheels), has
no PyTorch and no NVIDIA library, and there ``u2serve.remove()`` and a served ``POST /segment``
answer with the bytes of the suite's own service, without importing PyTorch.

The package is built from a copy of the sources into a wheel first, so nothing is written into
the working tree. The weights are the suite's, already converted (a fresh install reads them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.weights import default_weights_dir

from .conftest import REPO, reference_dir
from .procs import free_port, wait_ready
from .test_shipping import wheel_of

pytestmark = pytest.mark.integration

PHOTO = reference_dir() / "images" / "horse.jpg"
MODEL = "u2netp"
# What each answer is asked with: a mask, a cut-out (the matte and its colour), and a mask at the
# fast precision (int8), each as the suite's service answers it.
ASKED = {
    "mask": ({}, {"output": "mask"}),
    "cutout": ({}, {"output": "cutout"}),
    "fast": ({"U2SERVE_PRECISION": "fast"}, {"output": "mask"}),
}


@pytest.fixture(scope="module")
def cpu_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with ``pip install u2serve`` (the built wheel) in it."""
    tmp = tmp_path_factory.mktemp("cpu-install")
    wheel = wheel_of(tmp / "dist")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield python
    shutil.rmtree(venv, ignore_errors=True)


def _installed(python: Path) -> set[str]:
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {d["name"].lower() for d in json.loads(listed)}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the fresh install's processes: the suite's weights, and not the
    suite's own sources (the installed package is what runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"U2SERVE_WEIGHTS_DIR": str(default_weights_dir())} | (extra or {})


def test_no_torch_and_no_nvidia_library_is_installed(cpu_venv: Path) -> None:
    names = _installed(cpu_venv)
    assert "u2serve" in names
    assert "torch" not in names
    assert not {n for n in names if n.startswith("nvidia")}, sorted(names)
    # What the CPU engines and the fetch need is there.
    assert {"mnn", "openvino", "numpy", "opencv-python-headless", "nncf", "onnx"} <= names


def _served(python: Path | str, env: dict[str, str], cwd: Path) -> dict[str, bytes]:
    """The answers of a server run by ``python`` for each of :data:`ASKED` whose environment is
    ``env``'s, and whether its process imported PyTorch (from its memory map)."""
    out: dict[str, bytes] = {}
    for name, (settings, params) in ASKED.items():
        port = free_port()
        with subprocess.Popen(
            [str(python), "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env | {"U2SERVE_MODEL": MODEL, "U2SERVE_LOG_LEVEL": "warning"} | settings,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as proc:
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(url, proc)
                r = httpx.post(
                    f"{url}/segment",
                    files={"image": ("horse.jpg", PHOTO.read_bytes(), "image/jpeg")},
                    data=params,
                    timeout=120,
                )
                assert r.status_code == 200, r.text
                out[name] = r.content
                maps = Path(f"/proc/{proc.pid}/maps").read_text()
                out[f"{name}: torch loaded"] = b"yes" if "libtorch" in maps else b"no"
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    return out


def test_a_served_segment_is_the_suites_answer(cpu_venv: Path, tmp_path: Path) -> None:
    fresh = _served(cpu_venv, _env(), tmp_path)
    suite = _served(sys.executable, {**os.environ}, REPO)
    for name in ASKED:
        assert fresh[name] == suite[name], name
        assert fresh[f"{name}: torch loaded"] == b"no"
        assert suite[f"{name}: torch loaded"] == b"no", "the suite's CPU service loaded PyTorch"


_REMOVE = """
import sys, u2serve
out = u2serve.remove(open(sys.argv[1], "rb").read(), model=sys.argv[2], output=sys.argv[3])
sys.stdout.buffer.write(out)
sys.stderr.write("torch imported" if "torch" in sys.modules else "torch not imported")
"""


@pytest.mark.parametrize("output", ["mask", "cutout"])
def test_remove_is_the_suites_answer(cpu_venv: Path, tmp_path: Path, output: str) -> None:
    answers = {}
    for python, cwd in ((cpu_venv, tmp_path), (Path(sys.executable), REPO)):
        done = subprocess.run(
            [str(python), "-c", _REMOVE, str(PHOTO), MODEL, output],
            cwd=cwd,
            env=_env() if python == cpu_venv else {**os.environ},
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert done.stderr.decode().endswith("torch not imported"), done.stderr.decode()[-3000:]
        answers[python] = done.stdout
    assert answers[cpu_venv] == answers[Path(sys.executable)]
