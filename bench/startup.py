"""Start-up: ``make serve``'s two steps (the weights' fetch, which verifies what is there, then the
service) to ``/readyz`` 200, and the ready service's idle memory.

    python -m bench.startup                                # U2NET, 3 rounds
    python -m bench.startup --checkout before=../before --weights before=/path/to/v1-weights

For each round and each checkout (alternating): the fetch step's seconds, the service's seconds
from its start to ``/readyz`` 200 (polled every 20 ms), their sum, and the resident memory of the
service's processes once ready and idle (VmRSS, summed over the process tree). Medians at the
end. The weights must already be fetched and converted (the second start is what is measured,
as a restarted replica or a laptop's second ``make serve`` pays it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.http import REPO
from model.weights import default_weights_dir


def _rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` and its children, in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_start(checkout: Path, model: str, weights: Path) -> tuple[float, float, float]:
    """Seconds of the fetch step and of the service to ready, and the ready service's MiB."""
    env = os.environ | {"U2SERVE_WEIGHTS_DIR": str(weights), "U2SERVE_MODEL": model}
    env.pop("PYTHONPATH", None)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "weights", "fetch", model],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
    )
    fetched = time.perf_counter() - t
    port = _free_port()
    t = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=checkout,
        env=env | {"U2SERVE_LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the service in {checkout} exited with {proc.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
            ready = time.perf_counter() - t
            time.sleep(2)  # idle: what the warm-up left behind
            rss = _rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return fetched, ready, rss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.startup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2net")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkout", action="append", default=[], help="NAME=PATH, another checkout")
    p.add_argument(
        "--weights", action="append", default=[], help="NAME=DIR, a checkout's weights folder"
    )
    args = p.parse_args(argv)
    checkouts = {"this": REPO} | {
        name: Path(path).resolve() for name, _, path in (c.partition("=") for c in args.checkout)
    }
    folders = {name: Path(path) for name, _, path in (w.partition("=") for w in args.weights)}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in checkouts}
    print(f"{args.model}, {args.rounds} rounds, alternating")
    print("| checkout | round | fetch step s | service to ready s | total s | idle RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in range(args.rounds):
        for name, checkout in checkouts.items():
            got = one_start(checkout, args.model, folders.get(name, default_weights_dir()))
            results[name].append(got)
            f, s, m = got
            print(f"| {name} | {r + 1} | {f:.2f} | {s:.2f} | {f + s:.2f} | {m:.0f} |", flush=True)
    for name, rows in results.items():
        f, s, m = (statistics.median(col) for col in zip(*rows, strict=True))
        print(
            f"median {name}: fetch {f:.2f} s, service {s:.2f} s, total {f + s:.2f} s, {m:.0f} MiB"
        )


if __name__ == "__main__":
    main()
