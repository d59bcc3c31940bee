"""schemathesis over the service's own OpenAPI document, against a real server process: every
generated request, valid or not, gets an answer the document describes, and never a 5xx."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .procs import serving, u2netp_env

pytestmark = pytest.mark.integration


def test_every_answer_is_documented_and_none_is_a_5xx(u2netp_weights: Path, tmp_path: Path) -> None:
    env = u2netp_env(
        u2netp_weights,
        # Generated images are small but may be tall or wide: keep each one quick.
        U2SERVE_MAX_PIXELS="4000000",
        # Generated URLs would be resolved and fetched from the internet, slowly or not at
        # all, and a 502/504 for a host that is down is right but a 5xx all the same: the
        # url parameter is held to its statuses by tests/test_fetch.py, against real servers.
        U2SERVE_URL_INPUT="false",
        # No access log: the server's output goes to a pipe nobody reads while the test runs,
        # and a few hundred lines fill it (64 KiB), after which the server blocks on writing.
        U2SERVE_LOG_LEVEL="warning",
    )
    with serving(env) as (_, url):
        # The command line rather than its pytest plugin, which does not load under pytest 9;
        # deterministic generation, so that a failure here fails every time.
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file",
                str(REPO / "tests" / "schemathesis.toml"),
                "--no-color",
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--generation-deterministic",
            ],
            cwd=tmp_path,  # it keeps a .schemathesis folder of its own there
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert counts is not None, run.stdout[-2000:]
    assert int(counts[1]) >= 40, counts[0]  # every operation was exercised
    assert counts[1] == counts[2]
