"""``u2serve segment`` with a gate, for a test that interrupts it at a point of its choosing.

    python -m tests.gated_cli GATE [u2serve arguments...]

Reading the photo whose file name is ``GATE`` waits until the process gets SIGINT, so that when
the test sends the signal the run is known to be stopped there: every photo before the gate
done, the gate's photo and those after it not. SIGINT then opens the gate and interrupts the run
as Ctrl-C does, and the run's own handling of it is what the test sees.
"""

from __future__ import annotations

import signal
import sys
import threading
import types
from pathlib import Path
from typing import Any, NoReturn

import u2serve.folder
from u2serve.cli import main

_opened = threading.Event()
_read = u2serve.folder._read


def _gated_read(path: Path, *args: Any) -> object:
    if path.name == sys.argv[1]:
        _opened.wait()
    return _read(path, *args)


def _interrupt(signum: int, frame: types.FrameType | None) -> NoReturn:
    _opened.set()
    raise KeyboardInterrupt


if __name__ == "__main__":
    u2serve.folder._read = _gated_read  # type: ignore[assignment]
    signal.signal(signal.SIGINT, _interrupt)
    sys.exit(main(sys.argv[2:]))
