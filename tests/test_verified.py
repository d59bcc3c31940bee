"""A file's digest is computed once for each version of the file (model/verified.py), and no
version it was not computed on is ever taken for checked."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

import model.engines
import model.weights
from model import verified
from model.device import CPU
from model.engines import EngineOptions, file_sha256, mnn_engine
from model.weights import WeightsError, default_weights_dir
from weights.fetch import fetch


class Counted:
    """A digest function that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> str:
        self.calls += 1
        return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New bytes of the same size, the modification time put back: only the change time (which
    no call can set) tells this version from the last. Rewritten until the change time moved
    (the clock that stamps files can tick more coarsely than writes)."""
    before = path.stat()
    while True:
        path.write_bytes(data)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if path.stat().st_ctime_ns != before.st_ctime_ns:
            return
        time.sleep(0.01)


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as settled at once (they are written by the test itself, just before)."""
    monkeypatch.setattr(verified, "SETTLING_S", 0.0)


@pytest.mark.usefixtures("settled")
def test_a_digest_is_computed_once_for_each_version(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"a" * 1000)
    count = Counted()
    first = verified.digest(f, "sha256", count)
    assert verified.digest(f, "sha256", count) == first
    assert count.calls == 1
    assert verified.digest(f, "other", count) == first  # another kind is its own entry
    assert count.calls == 2

    rewrite_in_place(f, b"b" * 1000)  # same size, same modification time
    assert verified.digest(f, "sha256", count) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert count.calls == 3

    f.unlink()
    f.write_bytes(b"b" * 1000)  # a new file with the same bytes: another inode
    verified.digest(f, "sha256", count)
    assert count.calls == 4


@pytest.mark.usefixtures("settled")
def test_the_record_moves_with_its_folder(tmp_path: Path) -> None:
    """Files are named in their folder's record by name: a folder copied whole elsewhere (the
    inode changes) is read again, one renamed in place is not."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.bin").write_bytes(b"x")
    count = Counted()
    verified.digest(tmp_path / "a" / "m.bin", "sha256", count)
    (tmp_path / "a").rename(tmp_path / "b")
    verified.digest(tmp_path / "b" / "m.bin", "sha256", count)
    assert count.calls == 1
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    verified.digest(tmp_path / "c" / "m.bin", "sha256", count)
    assert count.calls == 2


def test_a_file_just_written_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verified, "SETTLING_S", 3600.0)
    f = tmp_path / "model.bin"
    f.write_bytes(b"a")
    count = Counted()
    verified.digest(f, "sha256", count)
    verified.digest(f, "sha256", count)
    assert count.calls == 2
    assert not (tmp_path / verified.RECORD).exists()


@pytest.mark.usefixtures("settled")
def test_a_folder_that_keeps_no_record_reads_every_time(tmp_path: Path) -> None:
    (tmp_path / verified.RECORD).mkdir()  # neither readable nor replaceable as a file
    f = tmp_path / "model.bin"
    f.write_bytes(b"a")
    count = Counted()
    assert verified.digest(f, "sha256", count) == verified.digest(f, "sha256", count)
    assert count.calls == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([verified.RECORD, "model.bin"])


def copy_weights(name: str, to: Path) -> Path:
    for path in default_weights_dir().glob(f"{name}.*"):
        if path.suffix != ".onnx":
            shutil.copy2(path, to / path.name)
    return to / f"{name}.safetensors"


@pytest.mark.usefixtures("settled")
def test_a_second_fetch_and_load_read_no_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make serve``'s fetch step and the service's load on a second start: every file was
    verified by the first, and none of them is read for its digest again."""
    weights = copy_weights("u2netp", tmp_path)
    fetch("u2netp", tmp_path)  # reads and records every file

    def unexpected(*_: object) -> str:
        raise AssertionError("a verified file was read again")

    monkeypatch.setattr(model.engines, "_sha256", unexpected)
    monkeypatch.setattr(model.weights, "tensors_sha256", unexpected)
    fetch("u2netp", tmp_path)
    from model.segmenter import Segmenter

    Segmenter("u2netp", weights, device="cpu", engine="mnn")
    Segmenter("u2netp", weights, device="cpu", engine="openvino", precision="fast")


@pytest.mark.usefixtures("settled")
def test_a_verified_file_changed_afterwards_is_refused(tmp_path: Path) -> None:
    """A byte of the MNN file flipped after it was verified and recorded, size and modification
    time kept: its new version is read, and refused."""
    weights = copy_weights("u2netp", tmp_path)
    mnn = mnn_engine.engine_file(weights)
    file_sha256(mnn)  # recorded
    data = bytearray(mnn.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rewrite_in_place(mnn, bytes(data))
    with pytest.raises(WeightsError, match="corrupt"):
        mnn_engine.load(weights, "u2netp", EngineOptions(device=CPU))

    weights_data = bytearray(weights.read_bytes())
    model.weights.verified_digest(weights, "u2netp")  # recorded
    weights_data[-100] ^= 0xFF  # inside the last tensor
    rewrite_in_place(weights, bytes(weights_data))
    with pytest.raises(WeightsError, match="corrupt"):
        model.weights.verified_digest(weights, "u2netp")
