"""The layers: the core is built and answers without a web framework, and the faces stand on it
(the import contracts themselves are `make lint`'s: pyproject.toml's [tool.importlinter])."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import REPO, reference_dir


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_core_imports_no_web_framework() -> None:
    out = _run(
        """
        import sys
        import service.core.service, service.core.pipeline, service.core.request
        import service.processes.remote, service.processes.worker
        print(sorted({m.split(".")[0] for m in sys.modules} & {"fastapi", "starlette", "uvicorn"}))
        """
    )
    assert out.strip() == "[]"


def test_a_remover_answers_without_building_an_app(u2netp_weights: Path) -> None:
    """The in-process face starts the core itself: no FastAPI app, not even its module."""
    photo = reference_dir() / "images" / "girl.png"
    out = _run(
        f"""
        import sys
        from u2serve import Remover
        with Remover("u2netp", device="cpu", weights_dir={str(u2netp_weights.parent)!r}) as r:
            mask = r.remove({str(photo)!r}, output="mask")
        assert mask[:8] == b"\\x89PNG\\r\\n\\x1a\\n", mask[:8]
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"fastapi", "starlette"}}))
        """
    )
    assert out.strip().splitlines()[-1] == "[]"
