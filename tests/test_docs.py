"""The manual (``docs/``, ``mkdocs.yml``) and the README: the strict build (no broken link,
anchor or page), nothing loaded from another host, the OpenAPI reference made from the app's own
schema, the README's links, and every shell command of both run against a real service, or marked
as needing what a test machine lacks (``<!-- not run: why -->`` on the line before its block;
docs/development.md, "The docs site")."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from docsite.openapi_hook import FOLDER, openapi_document

from .conftest import REPO, reference_dir, weights_file
from .procs import file_server, serving

DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))

# A fenced block the suite does not run says why on the line just before it.
NOT_RUN = re.compile(r"^\s*<!-- not run: (?P<why>\S.*?) -->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[\w-]*)")
SHELL = {"sh", "bash", "shell", "console"}


@dataclass(frozen=True)
class Block:
    """A fenced shell block of a Markdown file."""

    path: Path
    line: int
    text: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence = len(m.group("indent")), m.group("fence")
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:])
            i += 1
        i += 1
        if m.group("info") in SHELL:
            marked = NOT_RUN.match(lines[start - 1]) if start else None
            why = marked.group("why") if marked else None
            blocks.append(Block(path, start + 1, "\n".join(body), why))
    return blocks


BLOCKS = [b for p in [README, *PAGES] for b in shell_blocks(p)]


def _build(config_dir: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=config_dir,
        env={**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as ``make docs`` builds it, with ``--strict``: any warning (a link to a
    page or anchor that does not exist, a page left out of the navigation) fails it."""
    out = tmp_path_factory.mktemp("site")
    r = _build(REPO, out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_the_strict_build_makes_every_page(site: Path) -> None:
    for page in PAGES:
        html = site / page.relative_to(DOCS).with_suffix(".html")
        assert html.is_file(), f"{page} was not built"
    # bench/README.md's figures are in the benchmarks page, not only linked.
    assert "Latest figures" in (site / "benchmarks.html").read_text()


def test_a_broken_anchor_fails_the_strict_build(tmp_path: Path) -> None:
    """The link check is on: a link to a heading that does not exist stops the build."""
    for name in ("mkdocs.yml", "docs", "docsite", "bench/README.md"):
        src, dst = REPO / name, tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\n[nowhere](operations/limits.md#no-such-heading)\n")
    r = _build(tmp_path, tmp_path / "site")
    assert r.returncode != 0
    assert "no-such-heading" in r.stdout + r.stderr


# What a page makes the browser fetch: scripts, style sheets, icons, images, frames, fonts.
_FETCHED = re.compile(
    r"<(?:script|img|iframe|source|embed)\b[^>]*?\bsrc=[\"']?(?P<src>[^\"' >]+)"
    r"|<link\b[^>]*?\bhref=[\"']?(?P<href>[^\"' >]+)"
    r"|url\(\s*[\"']?(?P<url>[^\"')]+)"
    r"|@import\s+[\"'](?P<imp>[^\"']+)",
    re.IGNORECASE,
)


def test_nothing_is_loaded_from_another_host(site: Path) -> None:
    """No CDN, no web fonts: every script, style sheet, icon and image a page or style sheet
    loads is a file of the site. (Material's bundle names a CDN for Mermaid, loaded only for a
    ``mermaid`` block, which the manual has none of, and a polyfill only for browsers without
    ResizeObserver.)"""
    remote = []
    for path in [*site.rglob("*.html"), *site.rglob("*.css")]:
        text = path.read_text(errors="replace")
        for m in _FETCHED.finditer(text):
            ref = next(g for g in m.groups() if g)
            if re.match(r"(?i)^(https?:)?//", ref):
                remote.append(f"{path.relative_to(site)}: {ref}")
        if path.suffix == ".html":
            assert 'class="mermaid"' not in text, path
            assert "fonts.googleapis" not in text, path
    assert not remote, remote


def test_the_openapi_reference_is_the_apps_own(site: Path) -> None:
    """Made at build time from ``create_app(...).openapi()``, not copied by hand; its page
    embeds it and runs Swagger UI from the site's own files."""
    folder = site / FOLDER
    built = json.loads((folder / "openapi.json").read_text())
    assert built == openapi_document()
    assert {"/segment", "/api/remove", "/v1.0/removebg"} <= built["paths"].keys()
    page = (folder / "index.html").read_text()
    assert '"/segment"' in page
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert (folder / name).is_file()
        assert f'"{name}"' in page


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_the_readme_is_a_front_door_whose_links_reach_the_manual(site: Path) -> None:
    """At most about 150 lines; every relative link names a file of the repository, and a link
    into the manual names a heading that the built page has."""
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    targets = [m.group("target") for m in _LINK.finditer(text)]
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), target
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            html = site / Path(path).relative_to("docs").with_suffix(".html")
            assert f'id="{anchor}"' in html.read_text(), target


def test_every_not_run_block_says_why() -> None:
    assert BLOCKS, "no shell blocks found"
    assert any(b.not_run is None for b in BLOCKS)
    for b in BLOCKS:
        assert b.not_run is None or len(b.not_run) > 10, b.name


# The photo server's address, which the service is told it may fetch from (URL examples name
# example.com, which a test cannot reach).
ALLOWED = "127.0.0.2"


@pytest.fixture(scope="module")
def photo_server() -> Iterator[str]:
    photo = (reference_dir() / "images" / "horse.jpg").read_bytes()
    with file_server(ALLOWED, {"/photo.jpg": (photo, "image/jpeg")}) as base:
        yield base


@pytest.fixture(scope="module")
def service_url(photo_server: str) -> Iterator[str]:
    """What the examples talk to at localhost:8000: both models, U2NETP the default (the
    examples name ``model=u2netp`` for a service started with both)."""
    for name in ("u2net", "u2netp"):
        weights_file(name)
    env = {
        "U2SERVE_MODELS": "u2netp,u2net",
        "U2SERVE_DEVICE": "cpu",
        "U2SERVE_MAX_BATCH_WAIT_MS": "0",
        "U2SERVE_URL_ALLOW": ALLOWED,
    }
    with serving(env) as (_, url):
        yield url


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """The files the examples name: photo.jpg, photo.png, a folder photos/, a.jpg, b.png and a
    folder shoot/ with a subfolder; and ``u2serve`` on the PATH, this checkout's."""
    images = reference_dir() / "images"
    jpg, png = images / "horse.jpg", images / "im_01.png"
    for name, src in (
        ("photo.jpg", jpg),
        ("photo.png", png),
        ("a.jpg", jpg),
        ("b.png", png),
        ("photos/horse.jpg", jpg),
        ("photos/im_01.png", png),
        ("shoot/day1/horse.jpg", jpg),
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "u2serve"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m u2serve.cli "$@"\n')
    shim.chmod(0o755)
    return tmp_path


# With --fail-with-body an HTTP error fails the command (and so the block), its body shown.
_PRELUDE = 'curl() { command curl --fail-with-body --silent --show-error "$@"; }\n'


@pytest.mark.integration
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_run is None], ids=lambda b: b.name)
def test_the_shell_block_runs(
    block: Block, workspace: Path, service_url: str, photo_server: str
) -> None:
    """Run as written, but for where it points: ``localhost:8000`` (and ``gpu-host:8000``) are
    the test's service, example.com's photo is the test's photo server, and ``.venv/bin/python``
    is the interpreter running the suite."""
    text = (
        block.text.replace("http://localhost:8000", service_url)
        .replace("http://gpu-host:8000", service_url)
        .replace("https://example.com/photo.jpg", f"{photo_server}/photo.jpg")
        .replace(".venv/bin/python", shlex.quote(sys.executable))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("U2SERVE_")}
    env |= {
        "PATH": f"{workspace / '.bin'}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
    }
    r = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", _PRELUDE + text],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert r.returncode == 0, f"{block.name}\n{text}\n{r.stdout}\n{r.stderr}"
