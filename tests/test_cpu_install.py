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
from typing import Any

import httpx
import pytest

from model.weights import default_weights_dir

from .conftest import REPO, reference_dir
from .procs import free_port, wait_ready
from .test_api import running
from .test_api import settings as api_settings
from .test_shipping import wheel_of

pytestmark = pytest.mark.integration

PHOTO = reference_dir() / "images" / "horse.jpg"
MODEL = "u2netp"
# The servers the fresh install runs (their settings) and what each is asked: a mask and a
# cut-out (the matte and its colour) at the default precision, and a mask at the fast one (int8).
ASKED: dict[str, tuple[dict[str, str], list[dict[str, str]]]] = {
    "faithful": ({}, [{"output": "mask"}, {"output": "cutout"}]),
    "fast": ({"U2SERVE_PRECISION": "fast"}, [{"output": "mask"}]),
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


def _env() -> dict[str, str]:
    """The environment of the fresh install's processes: the suite's weights, and not the
    suite's own sources (the installed package is what runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"U2SERVE_WEIGHTS_DIR": str(default_weights_dir())}


def test_no_torch_and_no_nvidia_library_is_installed(cpu_venv: Path) -> None:
    names = _installed(cpu_venv)
    assert "u2serve" in names
    assert "torch" not in names
    assert not {n for n in names if n.startswith("nvidia")}, sorted(names)
    # What the CPU engines and the fetch need is there.
    assert {"mnn", "openvino", "numpy", "opencv-python-headless", "nncf", "onnx"} <= names


def _post(client: httpx.Client | httpx.AsyncClient, params: dict[str, str]) -> Any:
    files = {"image": ("horse.jpg", PHOTO.read_bytes(), "image/jpeg")}
    return client.post("/segment", files=files, data=params)


def _fresh_answers(python: Path, cwd: Path) -> tuple[list[bytes], list[bool]]:
    """The fresh install's server's answers to :data:`ASKED`, and for each server whether its
    process loaded PyTorch (from its memory map)."""
    answers, loaded = [], []
    for settings, asked in ASKED.values():
        port = free_port()
        with subprocess.Popen(
            [str(python), "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=_env() | {"U2SERVE_MODEL": MODEL, "U2SERVE_LOG_LEVEL": "warning"} | settings,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as proc:
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(url, proc)
                with httpx.Client(base_url=url, timeout=120) as client:
                    for params in asked:
                        r = _post(client, params)
                        assert r.status_code == 200, r.text
                        answers.append(r.content)
                loaded.append("libtorch" in Path(f"/proc/{proc.pid}/maps").read_text())
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    return answers, loaded


async def test_a_served_segment_is_the_suites_answer(
    cpu_venv: Path, tmp_path: Path, u2netp_weights: Path
) -> None:
    fresh, loaded = _fresh_answers(cpu_venv, tmp_path)
    assert loaded == [False, False]
    suite = []
    for settings, asked in ASKED.values():
        precision = settings.get("U2SERVE_PRECISION", "faithful")
        async with running(api_settings(u2netp_weights, precision=precision)) as (_, client):
            for params in asked:
                r = await _post(client, params)
                assert r.status_code == 200, r.text
                suite.append(r.content)
    assert len(fresh) == len(suite) == 3
    for got, want, what in zip(fresh, suite, ["mask", "cut-out", "fast mask"], strict=True):
        assert got == want, what


_REMOVE = """
import sys, pathlib, u2serve
photo, model, out = open(sys.argv[1], "rb").read(), sys.argv[2], pathlib.Path(sys.argv[3])
for output in ("mask", "cutout"):
    (out / output).write_bytes(u2serve.remove(photo, model=model, output=output))
sys.stderr.write("torch imported" if "torch" in sys.modules else "torch not imported")
"""


def test_remove_is_the_suites_answer(cpu_venv: Path, tmp_path: Path) -> None:
    """``u2serve.remove()``'s mask and cut-out from the fresh install and from the suite's
    environment (which has PyTorch installed: it is not imported there either)."""
    answers = {}
    for side, python, cwd, env in (
        ("fresh", cpu_venv, tmp_path, _env()),
        ("suite", Path(sys.executable), REPO, {**os.environ}),
    ):
        out = tmp_path / side
        out.mkdir()
        done = subprocess.run(
            [str(python), "-c", _REMOVE, str(PHOTO), MODEL, str(out)],
            cwd=cwd,
            env=env,
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert done.stderr.decode().endswith("torch not imported"), done.stderr.decode()[-3000:]
        answers[side] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(answers["fresh"]) == {"mask", "cutout"}
    assert answers["fresh"] == answers["suite"]
