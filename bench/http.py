"""End-to-end HTTP load on u2serve and on rembg's own server, same machine, same weights.

    python -m bench.http                                   # both servers, reference photos
    python -m bench.http --targets u2serve --photos 1mp 12mp --concurrency 1 4 16 64
    python -m bench.http --outputs mask --concurrency 1 4  # the issue's CPU targets

Each server runs as a real process on 127.0.0.1. For every photo set, output and concurrency
level, u2serve and rembg are loaded one after the other (never at once), and the script prints
images/s, latency percentiles, errors, u2serve's mean batch size, and the ratio between the two.

rembg (``rembg s``, CPU build) is installed by this script into ``bench/.rembg-venv`` and pointed
at the very ``u2net.onnx`` that ``python -m weights fetch u2net`` verified, through
``U2NET_HOME``, so it downloads nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from bench import REFERENCE as REFERENCE_DATA
from model.weights import default_weights_dir

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REFERENCE_DATA / "images"
REMBG_VENV = REPO / "bench" / ".rembg-venv"
REMBG_REQUIREMENT = "rembg[cpu,cli]==2.0.86"
SIZES_MP = {"0.3mp": 0.3, "1mp": 1.0, "4mp": 4.0, "12mp": 12.0}


# -- photos ------------------------------------------------------------------------------------


def photo_set(name: str) -> list[bytes]:
    """``reference``: the 18 photos as they are; ``Nmp``: one real photo re-encoded at N MP."""
    if name == "reference":
        return [p.read_bytes() for p in sorted(REFERENCE.iterdir())]
    mp = SIZES_MP[name]
    with Image.open(REFERENCE / "bike.jpg") as src:
        rgb = src.convert("RGB")
    w = round((mp * 1e6 * 3 / 2) ** 0.5)  # bike.jpg is 3:2
    h = round(w * 2 / 3)
    buf = io.BytesIO()
    rgb.resize((w, h), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
    return [buf.getvalue()]


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes]

    def request(
        self, photo: bytes, output: str, model: str = "u2net"
    ) -> tuple[str, dict[str, str], dict[str, tuple]]:
        """(path, form fields, files) for one multipart request asking for ``output``; ``model``
        is for rembg, which picks it per request (u2serve serves the one it started with)."""
        if self.name == "u2serve":
            return "/segment", {"output": output}, {"image": ("photo", photo, "image/jpeg")}
        # rembg's POST route reads its options from form fields only.
        fields = {"model": model} | ({"om": "true"} if output != "cutout" else {})
        return "/api/remove", fields, {"file": ("photo", photo, "image/jpeg")}


def _wait_http(url: str, proc: subprocess.Popen[bytes], limit_s: float) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {limit_s:.0f} s")


@contextmanager
def running(cmd: list[str], env: dict[str, str], ready_path: str, name: str) -> Iterator[Target]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (REPO / "bench" / f".{name}.log").open("wb")
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(url + ready_path, proc, 300)
        yield Target(name, url, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def ensure_rembg() -> Path:
    exe = REMBG_VENV / "bin" / "rembg"
    if not exe.exists():
        print(f"# installing {REMBG_REQUIREMENT} into {REMBG_VENV.relative_to(REPO)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(REMBG_VENV)], check=True)
        subprocess.run(
            [
                str(REMBG_VENV / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                REMBG_REQUIREMENT,
            ],
            check=True,
        )
    return exe


def rembg_home() -> Path:
    onnx = default_weights_dir() / "u2net.onnx"
    if not onnx.is_file():
        raise SystemExit(f"{onnx} is missing: run `python -m weights fetch u2net` first")
    return onnx.parent


# -- load --------------------------------------------------------------------------------------


@dataclass
class Result:
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    batch_mean: float | None

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def _batch_stats(target: Target) -> tuple[float, float]:
    if target.name != "u2serve":
        return 0.0, 0.0
    total = count = 0.0
    for line in httpx.get(f"{target.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("u2serve_batch_size_sum "):
            total = float(line.split()[1])
        elif line.startswith("u2serve_batch_size_count "):
            count = float(line.split()[1])
    return total, count


async def load(
    target: Target, photos: list[bytes], output: str, concurrency: int, requests: int
) -> Result:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            path, fields, files = target.request(photos[i % len(photos)], output)
            t = time.perf_counter()
            try:
                r = await client.post(path, data=fields, files=files)
                good = r.status_code == 200
            except httpx.HTTPError:
                good = False
            if good:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

    before = _batch_stats(target)
    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    after = _batch_stats(target)
    batches = after[1] - before[1]
    mean = (after[0] - before[0]) / batches if batches else None
    return Result(len(latencies), errors, seconds, latencies, mean)


def warm(target: Target, photos: list[bytes], output: str) -> None:
    """One request first: rembg loads its model on the first request, u2serve at start-up."""
    path, fields, files = target.request(photos[0], output)
    httpx.post(target.url + path, data=fields, files=files, timeout=600).raise_for_status()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.http",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--targets", nargs="+", default=["u2serve", "rembg"], choices=["u2serve", "rembg"]
    )
    p.add_argument("--photos", nargs="+", default=["reference"], choices=["reference", *SIZES_MP])
    p.add_argument(
        "--outputs",
        nargs="+",
        default=["mask", "cutout"],
        choices=["mask", "probability", "cutout"],
    )
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="per level (default: max(photos in the set, 3 × concurrency))",
    )
    p.add_argument("--rounds", type=int, default=1, help="alternations per level")
    args = p.parse_args(argv)

    env = {
        "U2SERVE_MODEL": "u2net",
        "U2SERVE_MAX_QUEUE": "1024",
        "U2SERVE_REQUEST_TIMEOUT_S": "600",
        "U2SERVE_LOG_LEVEL": "warning",
    }
    servers: dict[str, tuple[list[str], dict[str, str], str]] = {
        "u2serve": ([sys.executable, "-m", "service"], env, "/readyz"),
    }
    if "rembg" in args.targets:
        servers["rembg"] = (
            [str(ensure_rembg()), "s", "--no-ui", "--log_level", "warning"],
            {"U2NET_HOME": str(rembg_home())},
            "/api",
        )
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
        f"{os.cpu_count()} cores; u2serve settings: "
        + " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("U2SERVE_"))
    )
    print(
        f"{'photos':9} {'output':7} {'conc':>4} {'target':8} {'img/s':>7} {'p50 s':>7} "
        f"{'p95 s':>7} {'p99 s':>7} {'errors':>6} {'batch':>5} {'ratio':>6}"
    )
    with ExitStack() as stack:
        targets = {
            name: stack.enter_context(running(*servers[name], name=name)) for name in args.targets
        }
        for photos_name in args.photos:
            photos = photo_set(photos_name)
            for output in args.outputs:
                for t in targets.values():
                    warm(t, photos, output)
                for conc in args.concurrency:
                    n = args.requests or max(len(photos), 3 * conc)
                    results: dict[str, list[Result]] = {name: [] for name in targets}
                    for _ in range(args.rounds):
                        for name, t in targets.items():
                            results[name].append(asyncio.run(load(t, photos, output, conc, n)))
                    rates = {}
                    for name, rs in results.items():
                        merged = Result(
                            sum(r.ok for r in rs),
                            sum(r.errors for r in rs),
                            sum(r.seconds for r in rs),
                            [x for r in rs for x in r.latencies],
                            statistics.fmean(r.batch_mean for r in rs)
                            if all(r.batch_mean for r in rs)
                            else None,
                        )
                        rates[name] = merged.images_per_s
                        ratio = (
                            f"{rates['u2serve'] / rates['rembg']:>5.2f}x"
                            if name == "rembg" and "u2serve" in rates
                            else ""
                        )
                        batch = f"{merged.batch_mean:>5.2f}" if merged.batch_mean else "    -"
                        print(
                            f"{photos_name:9} {output:7} {conc:>4} {name:8} "
                            f"{merged.images_per_s:>7.2f} {merged.pct(0.5):>7.2f} "
                            f"{merged.pct(0.95):>7.2f} {merged.pct(0.99):>7.2f} "
                            f"{merged.errors:>6} {batch} {ratio:>6}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
