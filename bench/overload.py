"""Overload, as an operator meets it: a burst of requests at once against a small bound, answered
how, and how soon.

    python -m bench.overload                                 # 48 and 200 at once, 1 and 2 fronts
    python -m bench.overload --burst 48 --workers 1 --network instant

Each server is a real process on 127.0.0.1 with ``U2SERVE_MAX_QUEUE=2``,
``U2SERVE_MAX_BATCH_SIZE=2``, model U2NETP on the CPU and the map cache off (every photo is the
same 1 MP one), with its real network or ``bench/instant.py``'s instant stand-in. Every client
opens its own connection and sends one multipart request; the burst is released at once. For
each case it prints the answers by status, the longest wait for any answer, the ``Retry-After``
values the 503s carried, and the server's ``u2serve_rejected_total`` by reason. What the README
promises: past the bound, 503 with ``Retry-After`` at once, no 504, everything answered within
a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from dataclasses import dataclass

import httpx

from bench.ceiling import request_bytes
from bench.http import photo_set, running


@dataclass
class Answer:
    status: int
    seconds: float
    retry_after: str | None


async def _one(port: int, request: bytes, start: asyncio.Event) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await start.wait()
    t = time.perf_counter()
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        retry = None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            elif name.lower() == b"retry-after":
                retry = value.strip().decode()
        await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        status, retry = 0, None  # reset before an answer
    finally:
        writer.close()
    return Answer(status, time.perf_counter() - t, retry)


async def _burst(port: int, request: bytes, n: int) -> tuple[list[Answer], float]:
    start = asyncio.Event()
    tasks = [asyncio.ensure_future(_one(port, request, start)) for _ in range(n)]
    await asyncio.sleep(0.5)  # every connection open
    t = time.perf_counter()
    start.set()
    answers = await asyncio.gather(*tasks)
    return answers, time.perf_counter() - t


def _rejected(url: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("u2serve_rejected_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = out.get(reason, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--burst", nargs="+", type=int, default=[48, 200])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--network", nargs="+", choices=["real", "instant"], default=["real", "instant"])
    p.add_argument("--photos", default="1mp")
    p.add_argument("--max-queue", default="2")
    p.add_argument("--model", default="u2netp")
    p.add_argument("--precision", default=None, help="U2SERVE_PRECISION (default: the server's)")
    p.add_argument("--output", default="mask", choices=["mask", "probability", "cutout"])
    args = p.parse_args(argv)
    (photo,) = photo_set(args.photos)
    precision = f", U2SERVE_PRECISION={args.precision}" if args.precision else ""
    print(
        f"# {args.model.upper()} on the CPU{precision}, U2SERVE_MAX_QUEUE={args.max_queue}, "
        f"U2SERVE_MAX_BATCH_SIZE=2, map cache off, {args.photos} {args.output}s, every client "
        "at once; the memory budget the server's default"
    )
    print(
        f"{'network':8} {'fronts':>6} {'burst':>5} {'200':>4} {'503':>4} {'504':>4} "
        f"{'other':>5} {'last answer s':>13} {'Retry-After':20} {'peak RSS MiB':>12} rejected"
    )
    for network in args.network:
        cmd = [sys.executable, "-m", "bench.instant" if network == "instant" else "service"]
        for workers in args.workers:
            env = {
                "U2SERVE_MODEL": args.model,
                "U2SERVE_DEVICE": "cpu",
                "U2SERVE_MAX_QUEUE": args.max_queue,
                "U2SERVE_MAX_BATCH_SIZE": "2",
                "U2SERVE_CACHE_MAP_BYTES": "0",
                "U2SERVE_WORKERS": str(workers),
            }
            if args.precision:
                env["U2SERVE_PRECISION"] = args.precision
            with running(cmd, env, "/readyz", f"overload-{network}-{workers}", args.model) as t:
                port = int(t.url.rsplit(":", 1)[1])
                request = request_bytes(photo, args.output, port, "multipart")
                asyncio.run(_burst(port, request, 4))  # warm
                for n in args.burst:
                    before = _rejected(t.url)
                    answers, took = asyncio.run(_burst(port, request, n))
                    after = _rejected(t.url)
                    codes = collections.Counter(a.status for a in answers)
                    retry = collections.Counter(a.retry_after for a in answers if a.status == 503)
                    other = n - codes[200] - codes[503] - codes[504]
                    rejected = {k: v - before.get(k, 0) for k, v in after.items()}
                    print(
                        f"{network:8} {workers:>6} {n:>5} {codes[200]:>4} {codes[503]:>4} "
                        f"{codes[504]:>4} {other:>5} {took:13.2f} "
                        f"{','.join(f'{k}×{v}' for k, v in sorted(retry.items())) or '-':20} "
                        f"{t.peak_rss_mib():12.0f} "
                        f"{', '.join(f'{k} {v}' for k, v in rejected.items() if v) or '-'}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
