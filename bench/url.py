"""What fetching the image by URL adds to a request, against uploading the same bytes, on loopback.

    python -m bench.url                                   # 0.3, 1 and 12 MP; U2NETP; 20 rounds
    python -m bench.url --photos 1mp --rounds 50 --model u2net

One u2serve process (``U2SERVE_URL_ALLOW`` lists the photos' host) and a static file server
(Python's ``http.server`` on 127.0.0.2) that serves the very JPEG that is uploaded. Requests go one
at a time, an upload and a URL in each round, in alternating order, so that both meet the same
machine. Prints, per photo, the median and 90th percentile of each kind's latency as the client
sees it, the difference of the medians, and the medians of the server's own ``upload`` and
``fetch`` stages (``Server-Timing``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.http import photo_set, running, u2serve_server

HOST = "127.0.0.2"


def _stage(response: httpx.Response, name: str) -> float:
    for part in response.headers.get("server-timing", "").split(", "):
        stage, _, rest = part.partition(";dur=")
        if stage == name:
            return float(rest.split(";")[0])
    return 0.0


def static_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    from bench.http import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            HOST,
            "--directory",
            str(folder),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the static file server did not start")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.url", description=__doc__)
    parser.add_argument("--photos", nargs="+", default=["0.3mp", "1mp", "12mp"])
    parser.add_argument("--model", default="u2netp", choices=["u2net", "u2netp"])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(
        f"# {platform.processor() or platform.machine()}, {args.model}, output=mask, one at a time"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = {name: photo_set(name)[0] for name in args.photos}
        for name, data in photos.items():
            (folder / f"{name}.jpg").write_bytes(data)
        static, base = static_server(folder)
        env = {
            "U2SERVE_MODEL": args.model,
            "U2SERVE_URL_ALLOW": HOST,
            "U2SERVE_LOG_LEVEL": "warning",
            # The upload and the URL are the same bytes: without this the second of each pair
            # would be a map cache hit, and the comparison would be of the network, not the way in.
            "U2SERVE_CACHE_MAP_BYTES": "0",
        }
        cmd, env, ready = u2serve_server(env)
        try:
            with running(cmd, env, ready, "u2serve", args.model) as target:
                client = httpx.Client(base_url=target.url, timeout=120)
                print(
                    f"{'photo':>6} {'bytes':>9} | {'upload p50':>10} {'p90':>7} | "
                    f"{'url p50':>8} {'p90':>7} | {'url - upload':>12} | "
                    f"{'upload stage':>12} {'fetch stage':>11}  (ms)"
                )
                for name, data in photos.items():

                    def upload(data: bytes = data) -> httpx.Response:
                        files = {"image": ("photo.jpg", data, "image/jpeg")}
                        return client.post("/segment", files=files)

                    def by_url(name: str = name) -> httpx.Response:
                        return client.post("/segment", data={"url": f"{base}/{name}.jpg"})

                    kinds = {"upload": upload, "url": by_url}
                    for fn in kinds.values():  # warm-up: first-size allocations, connections
                        for _ in range(2):
                            fn().raise_for_status()
                    times: dict[str, list[float]] = {k: [] for k in kinds}
                    stages: dict[str, list[float]] = {"upload": [], "fetch": []}
                    for i in range(args.rounds):
                        order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
                        for kind in order:
                            start = time.perf_counter()
                            r = kinds[kind]()
                            elapsed = (time.perf_counter() - start) * 1000
                            r.raise_for_status()
                            times[kind].append(elapsed)
                            stage = "upload" if kind == "upload" else "fetch"
                            stages[stage].append(_stage(r, stage))

                    def p(xs: list[float], q: float) -> float:
                        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]

                    up, url = times["upload"], times["url"]
                    print(
                        f"{name:>6} {len(data):>9} | {statistics.median(up):>10.1f} "
                        f"{p(up, 0.9):>7.1f} | {statistics.median(url):>8.1f} {p(url, 0.9):>7.1f}"
                        f" | {statistics.median(url) - statistics.median(up):>+12.1f} | "
                        f"{statistics.median(stages['upload']):>12.1f} "
                        f"{statistics.median(stages['fetch']):>11.1f}",
                        flush=True,
                    )
                client.close()
        finally:
            static.kill()
            static.wait()


if __name__ == "__main__":
    main()
