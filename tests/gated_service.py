"""``python -m service`` whose batches are held until a file exists, for tests that must act while
requests are known to wait on the model: with several processes (the inference worker's batches)
or in one (the lifespan's batcher).

    python -m tests.gated_service GATE [python -m service arguments...]

Each batch waits for the file ``GATE`` to exist; meanwhile ``GATE.pid`` names the process that
holds it (the inference worker, or the service's one process), for a test that kills it or waits
for a batch to be held.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import service.core.service
from service.__main__ import main

_run = service.core.service.run_batch


def _gated(*args: Any, **kwargs: Any) -> Any:
    gate = Path(sys.argv[1])
    Path(f"{gate}.pid").write_text(str(os.getpid()))
    while not gate.exists():
        time.sleep(0.01)
    return _run(*args, **kwargs)


if __name__ == "__main__":
    # The batchers of both shapes are started by service.core.service.Start.
    service.core.service.run_batch = _gated  # type: ignore[assignment]
    sys.exit(main(sys.argv[2:]))
