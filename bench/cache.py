"""One upload, many answers: what the map cache and image ids save a client that asks for several
outputs of the same photo, at concurrency 1.

    python -m bench.cache                          # U2NET, the 18 reference photos
    python -m bench.cache --model u2netp --rounds 2

Two u2serve processes with default settings, loaded one after the other (never at once), photo
by photo, alternating which goes first:
- ``cached``: the photo is uploaded once (``output=mask``, a miss: the first answer), then each
  of the other option sets below is asked for by its ``X-Image-Id``, with an empty body;
- ``uncached`` (``U2SERVE_CACHE_MAP_BYTES=0``), what a client without ids does: the photo
  uploaded again with each option set, and the network run again each time.

Printed per photo: its size, the first answer's time, the mean time of the later ones on each
server, their ratios (first / later on ``cached``: the issue's measure; ``uncached`` / ``cached``
for the later ones), and the bytes the client sent for the first and the second answer (request
line, headers and body, as sent on the wire). Then the geometric means, and each server's RSS.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import httpx
from PIL import Image

from bench.http import REFERENCE, running, u2serve_server

OPTIONS: list[dict[str, str]] = [
    {"output": "cutout"},
    {"output": "probability"},
    {"output": "cutout", "bg_color": "ffffff", "format": "jpeg"},
    {"output": "cutout", "crop": "true", "crop_margin": "10%", "max_side": "512"},
    {"threshold": "0.3"},
]


def wire_bytes(request: httpx.Request) -> int:
    """What the client puts on the connection for this request (HTTP/1.1)."""
    line = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    headers = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
    return len(line) + headers + 2 + len(request.content)


def timed(client: httpx.Client, request: httpx.Request) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    r = client.send(request)
    seconds = time.perf_counter() - t
    r.raise_for_status()
    return seconds, r


def stages(r: httpx.Response) -> dict[str, float]:
    """Server-Timing's milliseconds by stage."""
    out = {}
    for part in r.headers.get("server-timing", "").split(", "):
        name, _, rest = part.partition(";dur=")
        if rest:
            out[name] = float(rest.split(";")[0])
    return out


def one_photo(
    client: httpx.Client, data: bytes, cached: bool, seen: list[dict[str, float]]
) -> tuple[float, list[float], int, int]:
    """(first answer's seconds, later answers' seconds, bytes sent for the first, the second);
    the later answers' stages are added to ``seen``."""
    files = {"image": ("photo", data, "application/octet-stream")}
    first_req = client.build_request("POST", "/segment", files=files)
    first_s, r = timed(client, first_req)
    image_id = r.headers["x-image-id"]
    later, second_bytes = [], 0
    for i, options in enumerate(OPTIONS):
        if cached:
            req = client.build_request("POST", "/segment", params=options | {"image_id": image_id})
        else:
            req = client.build_request("POST", "/segment", params=options, files=files)
        req.read()
        if i == 0:
            second_bytes = wire_bytes(req)
        seconds, r = timed(client, req)
        later.append(seconds)
        seen.append(stages(r))
    first_req.read()
    return first_s, later, wire_bytes(first_req), second_bytes


def pixels(path: Path) -> int:
    with Image.open(path) as im:
        return im.size[0] * im.size[1]


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--rounds", type=int, default=1, help="passes over the photos")
    args = p.parse_args(argv)
    env = {"U2SERVE_MODEL": args.model, "U2SERVE_LOG_LEVEL": "warning"}
    photos = sorted(REFERENCE.iterdir())
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
        f"{os.cpu_count()} cores; model {args.model}; concurrency 1; later answers: "
        + "; ".join("&".join(f"{k}={v}" for k, v in o.items()) for o in OPTIONS)
    )
    print(
        f"{'photo':18} {'MP':>5} {'first ms':>8} {'later ms':>8} {'ratio':>6} "
        f"{'uncached':>8} {'ratio':>6} {'sent 1st':>9} {'sent 2nd':>8}"
    )
    firsts, ratios, vs_uncached, seconds_sent = [], [], [], []
    breakdown: dict[tuple[str, bool], list[dict[str, float]]] = {}
    servers = {
        "cached": u2serve_server(env),
        "uncached": u2serve_server(env | {"U2SERVE_CACHE_MAP_BYTES": "0"}),
    }
    with (
        running(*servers["cached"], name="cached", model=args.model) as cached,
        running(*servers["uncached"], name="uncached", model=args.model) as uncached,
        httpx.Client(base_url=cached.url, timeout=600) as c_client,
        httpx.Client(base_url=uncached.url, timeout=600) as u_client,
    ):
        for round_ in range(args.rounds):
            for i, path in enumerate(photos):
                # Each round sends the photo with other trailing bytes (readers ignore them),
                # so that its first answer is a miss on the cached server too.
                data = path.read_bytes() + f"round {round_}".encode()
                mp = pixels(path) / 1e6
                order = [(True, c_client), (False, u_client)]
                results = {}
                for is_cached, client in order if (i + round_) % 2 == 0 else order[::-1]:
                    seen = breakdown.setdefault((path.name, is_cached), [])
                    results[is_cached] = one_photo(client, data, is_cached, seen)
                first, later, sent1, sent2 = results[True]
                _, u_later, _, _ = results[False]
                ratio = first / statistics.fmean(later)
                vs = statistics.fmean(u_later) / statistics.fmean(later)
                firsts.append(first)
                ratios.append(ratio)
                vs_uncached.append(vs)
                seconds_sent.append(sent2)
                print(
                    f"{path.name:18} {mp:>5.2f} {first * 1000:>8.1f} "
                    f"{statistics.fmean(later) * 1000:>8.1f} {ratio:>5.1f}x "
                    f"{statistics.fmean(u_later) * 1000:>8.1f} {vs:>5.1f}x {sent1:>9} {sent2:>8}",
                    flush=True,
                )
        print(
            f"# geometric mean: first / later {geomean(ratios):.1f}x (lowest {min(ratios):.1f}x), "
            f"uncached later / cached later {geomean(vs_uncached):.1f}x "
            f"(lowest {min(vs_uncached):.1f}x); bytes sent for the second answer: at most "
            f"{max(seconds_sent)}"
        )
        largest = max(photos, key=pixels).name
        for is_cached in (True, False):
            seen = breakdown[(largest, is_cached)]
            names = [n for n in seen[0] if n != "total"]
            mean = {n: statistics.fmean(x.get(n, 0.0) for x in seen) for n in names}
            print(
                f"# {largest}, later answers, {'cached' if is_cached else 'uncached'}, mean ms "
                "by stage: " + ", ".join(f"{n} {v:.0f}" for n, v in mean.items())
            )
        print(
            f"# RSS: cached {rss_mib(cached.proc.pid):.0f} MiB, "
            f"uncached {rss_mib(uncached.proc.pid):.0f} MiB "
            f"(default cache bounds: maps 64 MiB, uploads 256 MiB)"
        )


if __name__ == "__main__":
    main()
