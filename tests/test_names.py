"""Every dotted name of the project that a docstring or the manual mentions
(``service.core.request.Submission``, ``model.engines.openvino_files.KEEP_MIXED``) names
something that is there, so that what sends a reader somewhere stays true as code moves.

Names are resolved from the sources (nothing is imported): the longest prefix that is a module
or a package of the repository, then each further part a name defined at that module's top
level (a function, a class, an assignment or an import, which is followed), or in that class's
body."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGES = ("u2serve", "service", "model", "weights", "bench", "docsite", "tests")
DOTTED = re.compile(
    r"(?<![\w./-])((?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?![\w/-])"
)
# A name that ends in a file's suffix is a file (``service.py``, ``model.safetensors``).
SUFFIXES = {"py", "md", "json", "txt", "yaml", "yml", "toml", "html", "js", "css", "safetensors"}
# Dotted names that are not the code's: loggers.
LOGGERS = {"u2serve.access"}


def _module_file(parts: list[str]) -> Path | None:
    path = REPO.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _defined(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module's or a class's body defines, and what defines each."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[name.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                out[alias.asname or alias.name.split(".")[0]] = node
        elif isinstance(node, ast.If | ast.Try):  # TYPE_CHECKING blocks, guarded imports
            out |= _defined(node.body)
    return out


def resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        path = _module_file(parts[:i])
        if path is not None:
            break
    else:
        return False
    rest = parts[i:]
    body: list[ast.stmt] = _tree(path).body
    for k, part in enumerate(rest):
        node = _defined(body).get(part)
        if node is None:
            return False
        if isinstance(node, ast.ImportFrom | ast.Import):
            # A package's face (its __init__) re-exports; anywhere else a name is sent to where
            # it is defined, not to a module that happens to import it.
            if path.name != "__init__.py" or not isinstance(node, ast.ImportFrom):
                return False
            return bool(node.module) and resolves(".".join([node.module, part, *rest[k + 1 :]]))
        if isinstance(node, ast.ClassDef):
            body = node.body
            continue
        # A function's or a value's own attributes are not followed.
        return k == len(rest) - 1 or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    return True


def _docstrings(path: Path) -> Iterator[str]:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield doc


def _mentions() -> list[tuple[str, str]]:
    """(where, name) for every dotted name in the project's docstrings and its manual."""
    found: set[tuple[str, str]] = set()
    sources = [
        p
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(REPO).parts)  # venvs, caches
    ]
    for path in sources:
        for doc in _docstrings(path):  # tests/ too: its docstrings send readers to the code
            found |= {(str(path.relative_to(REPO)), m) for m in DOTTED.findall(doc)}
    manual = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), REPO / "bench" / "README.md"]
    for path in manual:
        found |= {(str(path.relative_to(REPO)), m) for m in DOTTED.findall(path.read_text())}
    return sorted(
        (where, name)
        for where, name in found
        if name.split(".")[-1] not in SUFFIXES and name not in LOGGERS
    )


def test_the_resolver_tells_a_true_name_from_a_false_one() -> None:
    assert resolves("service.core.request.Submission")
    assert resolves("model.engines.openvino_files.KEEP_MIXED")
    assert resolves("service.images.matte.refine")
    assert not resolves("service.http.upload.Submission")
    assert not resolves("model.refine")
    assert not resolves("service.core.pipeline.Pipeline.no_such_method")


def test_every_dotted_name_mentioned_resolves() -> None:
    mentions = _mentions()
    assert len(mentions) > 50  # the pattern finds them
    broken = [f"{where}: {name}" for where, name in mentions if not resolves(name)]
    if broken:
        pytest.fail("names that lead nowhere:\n" + "\n".join(broken))
