"""The serving path's ceiling: the real service with an instant network (``bench/instant.py``),
loaded over HTTP, so that what is measured is everything but the network.

    python -m bench.ceiling                                  # 1 MP and 12 MP, masks and cut-outs
    python -m bench.ceiling --photos 1mp --outputs mask --concurrency 16 --seconds 20
    python -m bench.ceiling --variant w2:U2SERVE_WORKERS=2   # settings against each other
    python -m bench.ceiling --checkout before=../before      # this code against another's
    python -m bench.ceiling --device cuda --fronts 1 2 4     # a GPU host: the real network

For each photo size, output and concurrency it prints images/s, latency p50 and p99, and, read
from ``/proc`` before and after the load:

- ``cpu ms/img``: the CPU time of every process of the service (all their threads), per image;
- ``× stages``: that CPU time over the per-image stages' (decode, the network's input, the
  digest, the map back, the encoding), run one at a time in this process on the same photo and
  the stand-in's same map, before any server starts (the best run of each; printed as a ``#``
  line each): what the serving path adds to the work it cannot avoid;
- ``loop ms/req``: the CPU time of the threads that run an event loop (each process's main
  thread), per request: what the per-request Python costs where the requests are accepted.

The load generator is a small HTTP/1.1 client on raw asyncio streams with each request's bytes
made once, so that on a machine it shares with the server it takes as little as it can (it runs
in this process, whose own CPU time is printed too). Requests are multipart uploads, as browsers
and ``curl -F`` send them (``--body raw``: the image as the body). Each server is a real process
on 127.0.0.1; several (``--variant``) are loaded one after another, alternating, never at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.http import (
    REPO,
    SIZES_MP,
    add_checkout_argument,
    batch_totals,
    photo_set,
    running,
    settings_arg,
)

_TICK = os.sysconf("SC_CLK_TCK")


# -- the server's CPU time ---------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return out


def _cpu_s(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


@dataclass(frozen=True)
class CpuTimes:
    total: float  # every thread of every process
    loops: float  # each process's main thread

    @classmethod
    def of(cls, pid: int) -> CpuTimes:
        total = loops = 0.0
        for p in _tree(pid):
            try:
                total += _cpu_s(Path(f"/proc/{p}/stat"))
                loops += _cpu_s(Path(f"/proc/{p}/task/{p}/stat"))
            except OSError:
                continue  # a process that has just exited
        return cls(total, loops)


# -- the stages one at a time -------------------------------------------------------------------


def stage_costs(
    photo: bytes, output: str, model: str, repeat: int = 5, min_s: float = 0.5
) -> dict[str, float]:
    """The CPU ms (every thread of this process) of each per-image stage of the service, run here
    one after another on ``photo`` with the stand-in's map, as its codec threads run them: what
    the served image costs beyond them is the serving path's own. Each stage runs at least
    ``repeat`` times and ``min_s`` seconds, and its best run is kept (the fastest is the one
    least disturbed by anything else on the machine)."""
    from bench import instant
    from service.core.budget import map_large_buffers
    from service.core.cache import digest
    from service.core.infer import finish
    from service.core.service import load_segmenter
    from service.images.decode import decode, read_header
    from service.images.encode import render
    from service.params import parse_params
    from service.settings import Settings

    instant.install()
    map_large_buffers()  # as the service allocates
    settings = Settings(model=model, device="cpu")
    seg = load_segmenter(settings)
    params = parse_params({"output": output})
    limit = settings.max_pixels
    header = read_header(photo, max_pixels=limit)
    image = decode(photo, max_pixels=limit, header=header)
    prepared = seg.prepare(image.model_rgb)
    levels = seg.levels_of([prepared])[0]
    finished = finish(seg, levels, image.model_rgb, params)
    stages = {
        "header": lambda: read_header(photo, max_pixels=limit),
        "decode": lambda: decode(photo, max_pixels=limit, header=header),
        "prepare": lambda: seg.prepare(image.model_rgb),
        "digest": lambda: digest(photo),
        "finish": lambda: finish(seg, levels, image.model_rgb, params),
        "render": lambda: render(finished, image, params),
    }
    costs = {}
    for name, stage in stages.items():
        best, runs, end = float("inf"), 0, time.monotonic() + min_s
        while runs < repeat or time.monotonic() < end:
            t = time.process_time()
            stage()
            best, runs = min(best, time.process_time() - t), runs + 1
        costs[name] = best * 1e3
    return costs


# -- the load ----------------------------------------------------------------------------------


def request_bytes(photo: bytes, output: str, port: int, body: str) -> bytes:
    """One whole HTTP/1.1 request for ``/segment``."""
    if body == "raw":
        head = f"POST /segment?output={output} HTTP/1.1\r\nContent-Type: image/jpeg\r\n"
        payload = photo
    else:
        boundary = "u2serve-ceiling-boundary"
        payload = (
            (
                f"--{boundary}\r\nContent-Disposition: form-data; name=output\r\n\r\n{output}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=image; filename=p.jpg\r\n"
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + photo
            + f"\r\n--{boundary}--\r\n".encode()
        )
        head = (
            f"POST /segment HTTP/1.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        )
    head += f"Host: 127.0.0.1:{port}\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


@dataclass
class Result:
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    cpu: CpuTimes
    client_cpu_s: float
    batch_mean: float | None

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _worker(
    port: int, request: bytes, end: float, limit: int, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < end and len(latencies) + len(errors) < limit:
            t = time.perf_counter()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                # An early answer (a 503 for memory) closes the connection after a lingering
                # wait; a client still sending its upload then may be reset before it reads
                # the answer. Counted as an error (status 0), on a new connection.
                head = b"HTTP/1.1 000 reset\r\nconnection: close\r\n"
            if head[9:12] == b"200":
                latencies.append(time.perf_counter() - t)
            else:
                errors.append(int(head[9:12]))
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


def load(
    pid: int, port: int, request: bytes, concurrency: int, seconds: float, limit: int
) -> Result:
    url = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    errors: list[int] = []

    async def run() -> float:
        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(
            *(_worker(port, request, end, limit, latencies, errors) for _ in range(concurrency))
        )
        return time.perf_counter() - start

    b0, c0 = batch_totals(url), CpuTimes.of(pid)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = asyncio.run(run())
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1, b1 = CpuTimes.of(pid), batch_totals(url)
    n = b1[1] - b0[1]
    return Result(
        len(latencies),
        len(errors),
        elapsed,
        latencies,
        CpuTimes(c1.total - c0.total, c1.loops - c0.loops),
        (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        (b1[0] - b0[0]) / n if n else None,
    )


# -- servers -----------------------------------------------------------------------------------


def _with_fronts(
    servers: dict[str, dict[str, str]], checkouts: dict[str, Path], fronts: list[int]
) -> tuple[dict[str, dict[str, str]], dict[str, Path]]:
    """Every server once per count of front processes, named ``NAME-Nf``."""
    each = {
        f"{name}-{n}f": env | {"U2SERVE_WORKERS": str(n)}
        for name, env in servers.items()
        for n in fronts
    }
    where = {f"{name}-{n}f": checkouts.get(name, REPO) for name in servers for n in fronts}
    return each, where


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.ceiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--photos", nargs="+", default=["1mp", "12mp"], choices=list(SIZES_MP))
    p.add_argument("--outputs", nargs="+", default=["mask", "cutout"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=10.0, help="per level and server")
    p.add_argument("--max-requests", type=int, default=5000, help="per level and server")
    p.add_argument("--rounds", type=int, default=1, help="alternations per level")
    p.add_argument("--body", choices=["multipart", "raw"], default="multipart")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the service runs its network (U2SERVE_DEVICE)",
    )
    p.add_argument(
        "--network",
        choices=["instant", "real"],
        default=None,
        help="the instant stand-in (bench/instant.py), or the model itself; default: instant on "
        "the CPU, real on CUDA, where the serving path is measured at the network's own pace",
    )
    p.add_argument(
        "--fronts",
        nargs="+",
        type=int,
        default=[1],
        help="front processes (U2SERVE_WORKERS): each server is run with each count",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="another server with these settings (repeatable)",
    )
    add_checkout_argument(p)
    args = p.parse_args(argv)
    network = args.network or ("instant" if args.device == "cpu" else "real")
    env = {
        "U2SERVE_MODEL": args.model,
        "U2SERVE_DEVICE": args.device,
        "U2SERVE_MAX_QUEUE": "1024",
        "U2SERVE_REQUEST_TIMEOUT_S": "600",
        "U2SERVE_LOG_LEVEL": "warning",
        "U2SERVE_CACHE_MAP_BYTES": "0",  # every request through the batch, none from the cache
        "U2SERVE_MAX_CONNECTIONS": "1024",
    }
    servers = {"base": env}
    for variant in args.variant:
        vname, _, assignments = variant.partition(":")
        servers[vname] = env | settings_arg(assignments)
    checkouts = {"base": REPO}
    for cname, where, extra in args.checkout:
        if not (where / "bench" / "instant.py").is_file():
            p.error(f"--checkout {cname}: {where} has no bench/instant.py (its instant network)")
        servers[cname] = env | extra
        checkouts[cname] = where
    if args.fronts != [1]:
        servers, checkouts = _with_fronts(servers, checkouts, args.fronts)
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, "
        f"{args.body} bodies, the {network} network on {args.device}, {args.seconds:g} s a level; "
        + "; ".join(
            f"{n}: " + " ".join(f"{k}={v}" for k, v in e.items()) for n, e in servers.items()
        )
        + "".join(f"; {n} run from {d}" for n, d in checkouts.items() if n != "base")
    )
    width = max(8, *map(len, servers))
    print(
        f"{'photos':6} {'output':7} {'conc':>4} {'server':{width}} {'img/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'cpu ms/img':>10} {'× stages':>8} {'loop ms/req':>11} "
        f"{'client ms/req':>13} {'batch':>5} {'errors':>6}"
    )
    chains: dict[tuple[str, str], float] = {}
    for photos_name in args.photos:
        (photo,) = photo_set(photos_name)
        for output in args.outputs:
            costs = stage_costs(photo, output, args.model)
            chains[photos_name, output] = chain = sum(costs.values())
            print(
                f"# {photos_name} {output}, the stages one at a time: "
                + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
                + f"; {chain:.1f} ms of CPU"
            )
    with ExitStack() as stack:
        instant = [sys.executable, "-m", "bench.instant" if network == "instant" else "service"]
        targets = {
            n: stack.enter_context(
                running(instant, e, "/readyz", f"ceiling-{n}", args.model, checkouts.get(n, REPO))
            )
            for n, e in servers.items()
        }
        live = {n: (t.proc.pid, int(t.url.rsplit(":", 1)[1])) for n, t in targets.items()}
        for photos_name in args.photos:
            (photo,) = photo_set(photos_name)
            for output in args.outputs:
                for conc in args.concurrency:
                    results: dict[str, list[Result]] = {n: [] for n in live}
                    for _ in range(args.rounds):
                        for n, (pid, port) in live.items():
                            req = request_bytes(photo, output, port, args.body)
                            load(pid, port, req, conc, 1.0, 4 * conc)  # warm
                            results[n].append(
                                load(pid, port, req, conc, args.seconds, args.max_requests)
                            )
                    for n, rs in results.items():
                        ok = sum(r.ok for r in rs)
                        seconds = sum(r.seconds for r in rs)
                        lat = [x for r in rs for x in r.latencies]
                        merged = Result(
                            ok,
                            sum(r.errors for r in rs),
                            seconds,
                            lat,
                            CpuTimes(sum(r.cpu.total for r in rs), sum(r.cpu.loops for r in rs)),
                            sum(r.client_cpu_s for r in rs),
                            statistics.fmean(b for r in rs if (b := r.batch_mean))
                            if any(r.batch_mean for r in rs)
                            else None,
                        )
                        per = max(ok + merged.errors, 1)
                        batch = f"{merged.batch_mean:5.1f}" if merged.batch_mean else "    -"
                        print(
                            f"{photos_name:6} {output:7} {conc:>4} {n:{width}} "
                            f"{ok / seconds:7.1f} "
                            f"{merged.pct(0.5) * 1e3:7.1f} {merged.pct(0.99) * 1e3:7.1f} "
                            f"{merged.cpu.total * 1e3 / per:10.2f} "
                            f"{merged.cpu.total * 1e3 / per / chains[photos_name, output]:8.2f} "
                            f"{merged.cpu.loops * 1e3 / per:11.2f} "
                            f"{merged.client_cpu_s * 1e3 / per:13.2f} {batch} {merged.errors:6}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
