"""Soak: thousands of requests of mixed sizes and outputs, with the server's RSS over time,
on u2serve and on rembg's own server under the same load in the same run.

    python -m bench.soak                                   # 2000 requests each, U2NETP
    python -m bench.soak --requests 5000 --concurrency 16 --model u2net
    python -m bench.soak --targets u2serve --repeats 3     # each photo asked for 4 times

Both servers run as real processes on 127.0.0.1, one after the other (never at once), with the
same weights (see bench/http.py, whose helpers start them). The load cycles through the 18
reference photos (0.07–6 MP), one photo re-encoded at 12 MP, and a flat 24 MP PNG (tiny on the
wire, large decoded), alternating masks and cut-outs. Every upload is made of other bytes
(a counter appended after the image's end, which readers ignore), so that without repeats u2serve
computes every answer, as it did before it had a map cache. With ``--repeats N`` each upload is
followed by N requests for other outputs of the same photo (cut-out, soft map, mask at another
threshold, in turn): to u2serve by its ``X-Image-Id`` with an empty body, to rembg (which has no
ids) as the same upload again; the hit ratio of u2serve's map cache is printed at the end.
A sampler reads the server's RSS from /proc once a second; the script prints it as the load goes
on, then RSS at the start (after one warm-up request), the peak, and the end (after 10 s idle),
and the answers' status counts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.http import Target, photo_set, rembg_server, running, u2serve_server

MiB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def photos() -> list[bytes]:
    flat = io.BytesIO()
    Image.new("RGB", (6000, 4000), (90, 140, 200)).save(flat, "PNG")
    return [*photo_set("reference"), *photo_set("12mp"), flat.getvalue()]


class Sampler(threading.Thread):
    """RSS once a second, kept with the time and the requests answered so far."""

    def __init__(self, pid: int, progress: list[int]) -> None:
        super().__init__(daemon=True)
        self.pid, self.progress = pid, progress
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(1.0):
            self.samples.append((time.monotonic() - self._t0, self.progress[0], rss(self.pid)))

    def stop(self) -> None:
        self._halt.set()
        self.join()


_REPEATS = ({"output": "cutout"}, {"output": "probability"}, {"threshold": "0.3"})


async def load(
    target: Target, blobs: list[bytes], n: int, conc: int, repeats: int, progress: list[int]
) -> collections.Counter[str]:
    statuses: collections.Counter[str] = collections.Counter()
    groups = iter(range(-(-n // (repeats + 1))))

    async def send(client: httpx.AsyncClient, request: Any) -> httpx.Response | None:
        try:
            r = await request
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1
            r = None
        else:
            statuses[str(r.status_code)] += 1
        progress[0] += 1
        return r

    async def worker(client: httpx.AsyncClient) -> None:
        for g in groups:
            output = ("mask", "cutout")[(g // len(blobs)) % 2]
            photo = blobs[g % len(blobs)] + f"soak {g}".encode()
            path, fields, files = target.request(photo, output)
            r = await send(client, client.post(path, data=fields, files=files))
            image_id = r.headers.get("x-image-id") if r is not None else None
            for k in range(repeats):
                options = _REPEATS[k % len(_REPEATS)]
                if target.is_rembg or image_id is None:
                    path, fields, files = target.request(photo, options.get("output", "mask"))
                    await send(client, client.post(path, data=fields, files=files))
                else:
                    params = options | {"image_id": image_id}
                    await send(client, client.post("/segment", params=params))

    limits = httpx.Limits(max_connections=conc)
    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(conc)))
    return statuses


def hit_ratio(target: Target) -> str:
    if target.is_rembg:
        return ""
    text = httpx.get(f"{target.url}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:  # one series per model: summed
            if s.name in ("u2serve_map_cache_hits_total", "u2serve_map_cache_misses_total"):
                values[s.name] = values.get(s.name, 0.0) + s.value
    hits = values.get("u2serve_map_cache_hits_total", 0.0)
    misses = values.get("u2serve_map_cache_misses_total", 0.0)
    total = hits + misses
    return f"; map cache hits {hits:.0f} of {total:.0f} ({hits / total if total else 0:.0%})"


def soak(target: Target, blobs: list[bytes], args: argparse.Namespace) -> None:
    path, fields, files = target.request(blobs[0], "mask")
    httpx.post(target.url + path, data=fields, files=files, timeout=600).raise_for_status()
    time.sleep(2)
    start = rss(target.proc.pid)
    progress = [0]
    sampler = Sampler(target.proc.pid, progress)
    sampler.start()
    t0 = time.monotonic()
    last = 0.0
    statuses: collections.Counter[str] = collections.Counter()

    async def main() -> None:
        nonlocal statuses, last
        task = asyncio.create_task(
            load(target, blobs, args.requests, args.concurrency, args.repeats, progress)
        )
        while not task.done():
            await asyncio.sleep(1)
            if time.monotonic() - t0 - last >= args.every and sampler.samples:
                last = time.monotonic() - t0
                t, done, now = sampler.samples[-1]
                print(
                    f"{target.name:8} {t:7.0f} s {done:6d} answered  RSS {now / MiB:7.0f} MiB",
                    flush=True,
                )
        statuses = task.result()

    asyncio.run(main())
    seconds = time.monotonic() - t0
    time.sleep(10)
    sampler.stop()
    end = rss(target.proc.pid)
    peak = max(s[2] for s in sampler.samples) if sampler.samples else end
    print(
        f"# {target.name}: {progress[0]} requests in {seconds:.0f} s "
        f"({progress[0] / seconds:.2f}/s); statuses {dict(statuses)}{hit_ratio(target)}; RSS start "
        f"{start / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, end (10 s idle) {end / MiB:.0f} MiB",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", nargs="+", default=["u2serve", "rembg"])
    p.add_argument("--model", default="u2netp", choices=["u2net", "u2netp"])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--every", type=float, default=30, help="seconds between RSS lines")
    p.add_argument(
        "--repeats", type=int, default=0, help="requests for other outputs after each upload"
    )
    args = p.parse_args(argv)
    env = {
        "U2SERVE_MODEL": args.model,
        "U2SERVE_REQUEST_TIMEOUT_S": "600",
        "U2SERVE_LOG_LEVEL": "warning",
    }
    servers = {"u2serve": u2serve_server(env)}
    if "rembg" in args.targets:
        servers["rembg"] = rembg_server(args.model)
    blobs = photos()
    print(
        f"# {len(blobs)} photos, masks and cut-outs alternating; model {args.model}; "
        f"{args.requests} requests at concurrency {args.concurrency} per server, "
        f"{args.repeats} repeats per upload",
        flush=True,
    )
    for name in args.targets:
        with running(*servers[name], name=name, model=args.model) as target:
            soak(target, blobs, args)


if __name__ == "__main__":
    main()
