"""A file's digest, computed once for each version of the file.

Every model file is checked by its digest before use (:mod:`model.weights`,
:mod:`model.engines`), and those digests cost reading the files: about 570 MB for U2NET's weights
and engine files, 1.2 s of every ``make serve``'s fetch step, at each start. So a folder keeps a
record, ``.verified.json``, of each digest computed there with what identifies the version of
the file it was computed on: its size, its modification and change times, its inode (what git's
index keeps to know a file is unchanged without reading it). A later check that finds the same
identity takes the recorded digest; any other reads the file again.

Any write to a file sets its change time, which no call can set back, so a record never outlives
the bytes it was made from: a truncated, replaced or rewritten file is read and refused as
before. A file changed within :data:`SETTLING_S` of being hashed is not recorded (the clock's
tick can be coarser than the writes: git's "racy" files), and a folder that cannot be written
(a read-only image) keeps no record: its files are read at every check, as they always were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["RECORD", "SETTLING_S", "digest"]

log = logging.getLogger(__name__)

RECORD = ".verified.json"
SETTLING_S = 2.0


def digest(path: Path, kind: str, compute: Callable[[Path], str]) -> str:
    """``compute(path)``, the digest of this ``kind`` (such as ``"sha256"``), or what it gave
    for this very version of the file before."""
    before = _identity(path)
    key = f"{path.name}:{kind}"
    entry = _read(path.parent).get(key)
    if isinstance(entry, dict) and entry.get("file") == before and "digest" in entry:
        return str(entry["digest"])
    value = compute(path)
    after = _identity(path)
    settled = time.time() - max(after[1], after[2]) / 1e9 >= SETTLING_S
    if after == before and settled:
        _record(path.parent, key, {"file": after, "digest": value})
    return value


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read(folder: Path) -> dict[str, object]:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _record(folder: Path, key: str, entry: dict[str, object]) -> None:
    """Add ``entry`` to the folder's record, replaced whole (a reader never sees half of it; of
    two processes writing at once, one's entry may be lost, and is computed again next time)."""
    record = _read(folder) | {key: entry}
    part = folder / f"{RECORD}.{os.getpid()}.part"
    try:
        part.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        part.replace(folder / RECORD)
    except OSError as exc:
        log.debug("no record of verified files in %s: %s", folder, exc)
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
