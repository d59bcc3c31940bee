"""Shared fixtures: the reference photos and the real weights (fetched by `make weights`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import REFERENCE
from model.weights import SPECS, default_weights_dir

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    if not (REFERENCE / "images").is_dir():
        pytest.fail(f"reference data not found at {REFERENCE}")
    return REFERENCE


def weights_file(name: str, suffix: str = ".safetensors") -> Path:
    path = default_weights_dir() / f"{name}{suffix}"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `{SPECS[name].fetch_command}` (or `make weights`)")
    return path


def load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB")))


@pytest.fixture(scope="session")
def reference_images() -> list[Path]:
    return sorted((reference_dir() / "images").iterdir())


@pytest.fixture(scope="session")
def u2netp_weights() -> Path:
    return weights_file("u2netp")


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    # Deterministic and quick on a small CI machine.
    torch.manual_seed(0)


def require_system_tool(name: str) -> str:
    """A system program a test needs (nginx, dockerd, …). `.ci/run` installs them and sets
    REQUIRE_SYSTEM_TOOLS=1, so in CI a missing one fails instead of skipping."""
    import os
    import shutil

    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{name} is not installed (`make system-deps` installs it)"
        if os.environ.get("REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
