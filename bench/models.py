"""Resident memory of one process serving one model, or several (``U2SERVE_MODELS``).

    python -m bench.models                                  # u2net, then u2net,u2netp
    python -m bench.models --sets u2netp u2net,u2netp --rounds 2

For each set of models, a real ``python -m service`` (default engine and settings) is started;
once ready (loaded and warmed up), its RSS is read; then one 1 MP photo is segmented by each of
its models, and its RSS and peak RSS (VmHWM) are read again. Sets alternate for ``--rounds``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import httpx

from bench.http import photo_set, running, u2serve_server


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    parser.add_argument("--sets", nargs="+", default=["u2net", "u2net,u2netp"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    photo = photo_set("1mp")[0]
    print(f"# {platform.processor() or platform.machine()}; MiB")
    print(f"{'models':>14} | {'ready RSS':>9} | {'after RSS':>9} | {'peak':>7}")
    for _ in range(args.rounds):
        for models in args.sets:
            env = {"U2SERVE_MODELS": models, "U2SERVE_LOG_LEVEL": "warning"}
            cmd, env, ready = u2serve_server(env)
            with running(cmd, env, ready, "u2serve", models.split(",")[0]) as target:
                time.sleep(1)
                pid = target.proc.pid
                idle = _status_mib(pid, "VmRSS")
                for model in models.split(","):
                    r = httpx.post(
                        f"{target.url}/segment",
                        params={"model": model},
                        files={"image": ("p.jpg", photo, "image/jpeg")},
                        timeout=120,
                    )
                    r.raise_for_status()
                time.sleep(1)
                after, peak = _status_mib(pid, "VmRSS"), _status_mib(pid, "VmHWM")
            print(f"{models:>14} | {idle:>9.0f} | {after:>9.0f} | {peak:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
