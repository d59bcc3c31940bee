"""End-to-end HTTP load on u2serve and on rembg's own server, same machine, same weights.

    python -m bench.http                                   # both servers, reference photos
    python -m bench.http --targets u2serve --photos 1mp 12mp --concurrency 1 4 16 64
    python -m bench.http --outputs mask --concurrency 1 4  # the issue's CPU targets
    python -m bench.http --model u2netp --outputs mask cutout --concurrency 1 4
    python -m bench.http --targets u2serve --variant t1:U2SERVE_THREADS=1 \
        --variant t2:U2SERVE_THREADS=2                     # settings against each other
    python -m bench.http --checkout before=../before       # this code against another's

Each server runs as a real process on 127.0.0.1. For every photo set, output and concurrency
level, u2serve and rembg are loaded one after the other (never at once), and the script prints
images/s, latency percentiles, errors, u2serve's mean batch size, the ratio between the two, and
what a health check met meanwhile (its median and longest wait, polled every 100 ms on a
connection of its own: a probe that waits past its timeout takes the replica out of service);
at the end, each server's peak resident memory. ``--variant NAME:VAR=VALUE,...`` adds u2serve
processes with other settings, loaded in the same alternation.

rembg (``rembg s``, CPU build) is installed by this script into ``bench/.rembg-venv`` and pointed
at the very ``u2net.onnx`` that ``python -m weights fetch u2net`` verified, through
``U2NET_HOME``, so it downloads nothing (the same for ``u2netp``).
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
SIZES_MP = {"0.3mp": 0.3, "1mp": 1.0, "4mp": 4.0, "12mp": 12.0, "39mp": 39.0}


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

    model: str

    @property
    def is_rembg(self) -> bool:
        return self.name == "rembg"

    @property
    def health_path(self) -> str:
        # rembg has no health route: its smallest answer is its API's page.
        return "/api" if self.is_rembg else "/healthz"

    def request(self, photo: bytes, output: str) -> tuple[str, dict[str, str], dict[str, tuple]]:
        """(path, form fields, files) for one multipart request asking for ``output``."""
        if not self.is_rembg:
            return "/segment", {"output": output}, {"image": ("photo", photo, "image/jpeg")}
        # rembg's POST route reads its options from form fields only.
        fields = {"model": self.model} | ({"om": "true"} if output != "cutout" else {})
        return "/api/remove", fields, {"file": ("photo", photo, "image/jpeg")}

    def peak_rss_mib(self) -> float:
        """The process's peak resident memory so far (Linux: VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


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
def running(
    cmd: list[str],
    env: dict[str, str],
    ready_path: str,
    name: str,
    model: str,
    cwd: Path = REPO,
) -> Iterator[Target]:
    """``cmd`` started in ``cwd`` (a checkout of the project) on a free port, until it answers
    ``ready_path``; stopped with SIGTERM on exit. It logs to ``bench/.NAME.log``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (REPO / "bench" / f".{name}.log").open("wb")
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(url + ready_path, proc, 300)
        yield Target(name, url, proc, model)
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


Server = tuple[list[str], dict[str, str], str]  # command, environment, readiness path


def u2serve_server(env: dict[str, str]) -> Server:
    return [sys.executable, "-m", "service"], env, "/readyz"


def rembg_server(model: str) -> Server:
    """``rembg s``, installed here if needed, on the very ONNX file that u2serve verified."""
    cmd = [str(ensure_rembg()), "s", "--no-ui", "--log_level", "warning"]
    return cmd, {"U2NET_HOME": str(rembg_home(model))}, "/api"


def rembg_home(model: str) -> Path:
    onnx = default_weights_dir() / f"{model}.onnx"
    if not onnx.is_file():
        raise SystemExit(f"{onnx} is missing: run `python -m weights fetch {model}` first")
    return onnx.parent


def settings_arg(assignments: str) -> dict[str, str]:
    """``VAR=VALUE,...`` as a dict of settings."""
    return dict(kv.split("=", 1) for kv in assignments.split(",") if kv)


def checkout_arg(value: str) -> tuple[str, Path, dict[str, str]]:
    """``NAME=DIR[:VAR=VALUE,...]``: a server run from another checkout, with these settings."""
    name, _, where = value.partition("=")
    where, _, assignments = where.partition(":")
    if not name or not (Path(where) / "service" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"{where!r} is not a checkout of this project")
    return name, Path(where).resolve(), settings_arg(assignments)


def add_checkout_argument(p: argparse.ArgumentParser) -> None:
    """``--checkout NAME=DIR[:VAR=VALUE,...]`` (repeatable), parsed by :func:`checkout_arg`."""
    p.add_argument(
        "--checkout",
        action="append",
        default=[],
        type=checkout_arg,
        metavar="NAME=DIR[:VAR=VALUE,...]",
        help="another server run from another checkout of the project (such as `git worktree "
        "add ../before HEAD~1`), with these settings too: a change of code measured in one run "
        "(repeatable)",
    )


# -- load --------------------------------------------------------------------------------------


@dataclass
class Result:
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    batch_mean: float | None
    probes: list[float]  # a health check's seconds, every 100 ms during the load

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds

    @classmethod
    def merge(cls, rs: list[Result]) -> Result:
        """Several rounds of the same load as one."""
        return cls(
            sum(r.ok for r in rs),
            sum(r.errors for r in rs),
            sum(r.seconds for r in rs),
            [x for r in rs for x in r.latencies],
            statistics.fmean(r.batch_mean for r in rs if r.batch_mean)
            if all(r.batch_mean for r in rs)
            else None,
            [x for r in rs for x in r.probes],
        )

    def pct(self, q: float, of: list[float] | None = None) -> float:
        xs = sorted(self.latencies if of is None else of)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def batch_totals(url: str) -> tuple[float, float]:
    """u2serve's images and batches so far, summed over the models' series."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("u2serve_batch_size_sum"):
            total += float(line.split()[-1])
        elif line.startswith("u2serve_batch_size_count"):
            count += float(line.split()[-1])
    return total, count


def _batch_stats(target: Target) -> tuple[float, float]:
    return (0.0, 0.0) if target.is_rembg else batch_totals(target.url)


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

    probes: list[float] = []

    async def probe(done: asyncio.Event) -> None:
        """What a load balancer's health check meets meanwhile: the time to an answer from the
        server's cheapest route, on a connection of its own."""
        async with httpx.AsyncClient(base_url=target.url, timeout=600) as client:
            while not done.is_set():
                t = time.perf_counter()
                await client.get(target.health_path)
                probes.append(time.perf_counter() - t)
                await asyncio.sleep(0.1)

    before = _batch_stats(target)
    done = asyncio.Event()
    probing = asyncio.create_task(probe(done))
    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    done.set()
    await probing
    after = _batch_stats(target)
    batches = after[1] - before[1]
    mean = (after[0] - before[0]) / batches if batches else None
    return Result(len(latencies), errors, seconds, latencies, mean, probes)


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
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="another u2serve process with these settings (repeatable)",
    )
    add_checkout_argument(p)
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
        "U2SERVE_MODEL": args.model,
        "U2SERVE_MAX_QUEUE": "1024",
        "U2SERVE_REQUEST_TIMEOUT_S": "600",
        "U2SERVE_LOG_LEVEL": "warning",
        # The same photos are sent again and again: every answer is computed, as rembg's are.
        "U2SERVE_CACHE_MAP_BYTES": "0",
    }
    servers = {"u2serve": u2serve_server(env)}
    names = list(args.targets)
    checkouts: dict[str, Path] = {}
    for variant in args.variant:
        vname, _, assignments = variant.partition(":")
        servers[vname] = u2serve_server(env | settings_arg(assignments))
        names.append(vname)
    for cname, where, extra in args.checkout:
        servers[cname] = u2serve_server(env | extra)
        checkouts[cname] = where
        names.append(cname)
    if "rembg" in args.targets:
        servers["rembg"] = rembg_server(args.model)
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
        f"{os.cpu_count()} cores; u2serve settings: "
        + " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("U2SERVE_"))
    )
    print(
        f"{'photos':9} {'output':7} {'conc':>4} {'target':8} {'img/s':>7} {'p50 s':>7} "
        f"{'p95 s':>7} {'p99 s':>7} {'errors':>6} {'batch':>5} {'ratio':>6} "
        f"{'probe p50':>9} {'probe max':>9}"
    )
    with ExitStack() as stack:
        targets = {
            name: stack.enter_context(
                running(*servers[name], name=name, model=args.model, cwd=checkouts.get(name, REPO))
            )
            for name in names
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
                    merged = {name: Result.merge(rs) for name, rs in results.items()}
                    rembg = merged.get("rembg")
                    for name, m in merged.items():
                        ratio = (
                            f"{m.images_per_s / rembg.images_per_s:>5.2f}x"
                            if rembg is not None and name != "rembg"
                            else ""
                        )
                        batch = f"{m.batch_mean:>5.2f}" if m.batch_mean else "    -"
                        print(
                            f"{photos_name:9} {output:7} {conc:>4} {name:8} "
                            f"{m.images_per_s:>7.2f} {m.pct(0.5):>7.2f} "
                            f"{m.pct(0.95):>7.2f} {m.pct(0.99):>7.2f} "
                            f"{m.errors:>6} {batch} {ratio:>6} "
                            f"{m.pct(0.5, m.probes):>9.3f} {max(m.probes, default=0):>9.3f}",
                            flush=True,
                        )
        for name, t in targets.items():
            print(f"# {name}: peak RSS {t.peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
