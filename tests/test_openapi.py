"""The service's own OpenAPI document: generated (service/http/schema.py), it says what the
document written out by hand said (tests/data/openapi-before.json, saved from it), operation by
operation, but for the differences listed here with their reasons; and schemathesis over it,
against a real server process: every generated request, valid or not, gets an answer the document
describes, and never a 5xx."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.http.app import create_app
from service.settings import Settings

from .conftest import REPO
from .procs import serving, u2netp_env

BEFORE = REPO / "tests" / "data" / "openapi-before.json"
# The settings each saved document was made with: the models' enum and URL input are what the
# settings change in it.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "u2netp,u2net without url input": {"models": "u2netp,u2net", "url_input": False},
}


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT: Any = _Absent()
ANY: Any = object()


@dataclass(frozen=True, eq=False)
class Difference:
    """A difference from the saved document that was chosen: where (``fnmatch`` patterns of
    ``METHOD /path: key/key/...``, parameters by name), what it was and is (a type: any value of
    it; ``ANY``: anything), and why."""

    where: tuple[str, ...]
    before: Any
    after: Any
    why: str

    def allows(self, at: str, before: Any, after: Any) -> bool:
        return any(fnmatch.fnmatchcase(at, w) for w in self.where) and all(
            want is ANY or (isinstance(got, want) if isinstance(want, type) else got == want)
            for want, got in ((self.before, before), (self.after, after))
        )


_NULLABLE = "one of the API's optional parameters (a field of its model that may be None)"
DIFFERENCES = [
    Difference(
        ("*/title",),
        str,
        ABSENT,
        "pydantic's title of a field is its name again ('Bg Color' for bg_color): the "
        "generated document has none, where the hand-written one had SegmentParams' only",
    ),
    Difference(
        (
            "*: parameters/url/schema/minLength",
            "POST /segment: requestBody/content/*/properties/url/minLength",
        ),
        ABSENT,
        1,
        "url is an http(s) URL (pydantic's HttpUrl) of at most the fetcher's length: not empty",
    ),
    Difference(
        ("GET /api/remove: parameters/url/schema/maxLength",),
        ABSENT,
        2048,
        "rembg's url is the same type as /segment's, whose length the fetcher bounds",
    ),
    Difference(
        (
            "POST /v1.0/removebg: requestBody/content/*/properties/bg_color/type",
            "POST /v1.0/removebg: requestBody/content/*/properties/image_file_b64/type",
            "POST /v1.0/removebg: requestBody/content/*/properties/image_url/type",
            "* /api/remove: parameters/bgc/schema/type",
            "* /api/remove: parameters/extras/schema/type",
        ),
        "string",
        ABSENT,
        _NULLABLE + " is pydantic's `X | None`, anyOf X and null, as SegmentParams' are",
    ),
    Difference(
        (
            "POST /v1.0/removebg: requestBody/content/*/properties/bg_color/anyOf",
            "POST /v1.0/removebg: requestBody/content/*/properties/image_file_b64/anyOf",
            "POST /v1.0/removebg: requestBody/content/*/properties/image_url/anyOf",
            "* /api/remove: parameters/extras/schema/anyOf",
        ),
        ABSENT,
        [{"type": "string"}, {"type": "null"}],
        _NULLABLE + " is pydantic's `X | None`, anyOf X and null, as SegmentParams' are",
    ),
    Difference(
        ("* /api/remove: parameters/bgc/schema/anyOf",),
        ABSENT,
        [{"pattern": r"^\s*\d{1,3}\s*(,\s*\d{1,3}\s*){2,3}$", "type": "string"}, {"type": "null"}],
        _NULLABLE + ", and the pattern RembgParams holds bgc to (an r,g,b or r,g,b,a colour)",
    ),
    Difference(
        ("* /api/remove: responses/*/content/application/json/schema/required",),
        ["detail"],
        ["detail", "code"],
        "rembg's errors as compat/rembg.py's error() writes them: always with the code",
    ),
    Difference(
        (
            "POST /v1.0/removebg: responses/200/content/application/json/schema/properties/data/"
            "required",
        ),
        ["result_b64"],
        [
            "result_b64",
            "foreground_top",
            "foreground_left",
            "foreground_width",
            "foreground_height",
        ],
        "remove.bg's JSON answer as compat/removebg.py writes it: always with the box",
    ),
    Difference(
        ("POST /segment: responses/200/content/application/json/schema/properties/image/required",),
        ABSENT,
        ["width", "height"],
        "output=box's image size as service/images/encode.py writes it: always both",
    ),
    Difference(
        ("GET /v1.0/account: responses/200/content/application/json/schema/properties/data/*",),
        ABSENT,
        ANY,
        "the account document's whole shape, from the type account() builds (it was `data: "
        "object`); its example is that document, as before",
    ),
]


def _operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each operation by ``METHOD /path``, its parameters by name."""
    return {
        f"{method.upper()} {path}": op
        | {"parameters": {p["name"]: p for p in op.get("parameters", [])}}
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }


def _by_tag(ops: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for name, op in ops.items():
        for tag in op.get("tags", ["default"]):
            tags.setdefault(tag, []).append(name)
    return tags


def _differences(before: Any, after: Any, at: str) -> list[tuple[str, Any, Any]]:
    if isinstance(before, dict) and isinstance(after, dict):
        return [
            d
            for key in [*before, *(k for k in after if k not in before)]
            for d in _differences(before.get(key, ABSENT), after.get(key, ABSENT), f"{at}/{key}")
        ]
    return [] if before == after else [(at, before, after)]


def test_the_generated_document_says_what_the_hand_written_one_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in os.environ:
        if name.startswith("U2SERVE_"):
            monkeypatch.delenv(name)
    saved = json.loads(BEFORE.read_text())
    assert set(saved) == set(VARIANTS)
    used: set[Difference] = set()
    unexplained: list[str] = []
    for variant, settings in VARIANTS.items():
        before = saved[variant]
        after = create_app(Settings(**settings)).openapi()
        assert {k: v for k, v in after.items() if k != "paths"} == {
            k: v for k, v in before.items() if k != "paths"
        }
        ops_before, ops_after = _operations(before), _operations(after)
        # The same operations, in the order /docs shows them (under each tag, by the paths').
        assert _by_tag(ops_after) == _by_tag(ops_before), variant
        for name, op in ops_after.items():
            assert list(op["parameters"]) == list(ops_before[name]["parameters"]), name
            for at, was, now in _differences(ops_before[name], op, ""):
                where = f"{name}: {at.lstrip('/')}"
                allowed = [d for d in DIFFERENCES if d.allows(where, was, now)]
                used.update(allowed)
                if not allowed:
                    unexplained.append(f"{variant}: {where}: {was!r} -> {now!r}")
    assert not unexplained, "\n".join(unexplained)
    assert [d.why for d in DIFFERENCES if d not in used] == []


@pytest.mark.integration
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
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(REPO / "tests" / "schemathesis_hooks.py")},
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
