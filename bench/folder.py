"""A folder of photos through ``u2serve segment`` and through ``rembg p``, same folder, same run.

    python -m bench.folder                       # the 18 reference photos, mask and cut-out
    python -m bench.folder --repeat 3 --rounds 2 --outputs cutout
    python -m bench.folder --u2serve-flags "" "--threads 1"   # two u2serve variants
    python -m bench.folder --serve                # and u2serve segment --server, against a
                                                  # python -m service started for the run
    python -m bench.folder --server http://gpu-host:8000   # against a service already running

Both commands run as real processes, one after the other (never at once), each into an empty
output folder, and are timed from start to exit: start-up and loading the model included, as an
operator would see them. With ``--serve`` or ``--server``, ``u2serve segment --server URL`` is
timed too: the service is already up (``--serve`` starts ``python -m service`` with its default
settings, as ``make serve`` does, but the map cache off, since every round sends the same photos
again; a service given by ``--server`` should run with ``U2SERVE_CACHE_MAP_BYTES=0`` too; it is
started before the first run and stopped after the last), so that
run's time is the photos' way there and back and the service's work, not its start-up; the
idle service stays loaded while the other commands run. rembg is the copy that ``bench.http``
installs into ``bench/.rembg-venv``, pointed through ``U2NET_HOME`` at the very ``u2net.onnx``
that ``python -m weights fetch u2net`` verified, so both use the same weights. ``output=mask``
is compared with ``rembg p -om`` (its soft mask), ``output=cutout`` with its default RGBA
cut-out.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.http import REFERENCE, REPO, ensure_rembg, rembg_home, running, u2serve_server


def make_folder(root: Path, repeat: int) -> int:
    """``repeat`` copies of the reference photos under distinct names; how many there are.

    Each copy after the first has a few bytes appended after the image's end (readers ignore
    them), so that its bytes differ: ``u2serve segment`` keeps maps by the bytes' digest, and
    byte-identical copies would be answered from its map cache instead of being computed."""
    root.mkdir(parents=True)
    n = 0
    for i in range(repeat):
        for photo in sorted(REFERENCE.iterdir()):
            data = photo.read_bytes() + (f"copy {i}".encode() if i else b"")
            (root / f"{i:02d}-{photo.name}").write_bytes(data)
            n += 1
    return n


def commands(
    target: str, output: str, folder: Path, out: Path, model: str
) -> tuple[list[str], dict[str, str]]:
    """``target`` is ``rembg``, or ``u2serve`` followed by extra flags for it."""
    if target.startswith("u2serve"):
        cmd = [sys.executable, "-m", "u2serve.cli", "segment", str(folder), "-o", str(out)]
        extra = shlex.split(target.removeprefix("u2serve"))
        return [*cmd, "-q", "--model", model, "--output", output, *extra], {}
    cmd = [str(ensure_rembg()), "p", "-m", model, *(["-om"] if output == "mask" else [])]
    return [*cmd, str(folder), str(out)], {"U2NET_HOME": str(rembg_home(model))}


def timed(cmd: list[str], env: dict[str, str], out: Path) -> tuple[float, int]:
    """Seconds from start to exit, and how many files it wrote."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return seconds, sum(1 for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--outputs", nargs="+", default=["mask", "cutout"], choices=["mask", "cutout"])
    p.add_argument("--repeat", type=int, default=1, help="copies of the 18 photos in the folder")
    p.add_argument("--rounds", type=int, default=1, help="alternations per output")
    p.add_argument("--model", default="u2net", choices=["u2net"], help="rembg's name for it")
    p.add_argument(
        "--u2serve-flags",
        nargs="+",
        default=[""],
        metavar="FLAGS",
        help='one u2serve run per entry, with these extra flags (e.g. "" "--threads 1")',
    )
    served = p.add_mutually_exclusive_group()
    served.add_argument(
        "--server",
        metavar="URL",
        help="also time `u2serve segment --server URL` against this running service (it must "
        "serve --model)",
    )
    served.add_argument(
        "--serve",
        action="store_true",
        help="also time `u2serve segment --server` against a `python -m service` started here "
        "for the run, with its default settings (as `make serve`)",
    )
    args = p.parse_args(argv)

    ensure_rembg()
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
        f"{os.cpu_count()} cores; model {args.model}"
    )
    with ExitStack() as stack:
        url = args.server
        if args.serve:
            # The map cache off: every round sends the same photos again, and the other commands
            # start afresh each time.
            env = {"U2SERVE_MODEL": args.model, "U2SERVE_CACHE_MAP_BYTES": "0"}
            cmd, env, ready = u2serve_server(env)
            url = stack.enter_context(running(cmd, env, ready, "u2serve-served", args.model)).url
        if url:
            print(f"# u2serve --server: {url}")
        variants = [*args.u2serve_flags, *([f"--server {url}"] if url else [])]
        run(args, [*(f"u2serve {f}".strip() for f in variants), "rembg"], url)


def run(args: argparse.Namespace, targets: list[str], url: str | None) -> None:
    """Time each target (see :func:`commands`), alternating, for each output."""
    # The --server variant is named without its URL, which the header gives.
    names = {t: "u2serve --server" if url and t.endswith(f"--server {url}") else t for t in targets}
    width = max(len(n) for n in names.values())
    print(f"{'output':7} {'round':>5} {'target':{width}} {'images':>6} {'seconds':>8} {'img/s':>7}")
    with tempfile.TemporaryDirectory(prefix="u2serve-bench-") as tmp:
        folder = Path(tmp) / "photos"
        n = make_folder(folder, args.repeat)
        for output in args.outputs:
            totals = dict.fromkeys(targets, 0.0)
            for r in range(args.rounds):
                for i, target in enumerate(totals):
                    out = Path(tmp) / f"out-{i}"
                    cmd, env = commands(target, output, folder, out, args.model)
                    seconds, written = timed(cmd, env, out)
                    if written != n:
                        raise SystemExit(f"{target} wrote {written} files for {n} photos")
                    totals[target] += seconds
                    print(
                        f"{output:7} {r + 1:>5} {names[target]:{width}} {n:>6} {seconds:>8.1f} "
                        f"{n / seconds:>7.2f}",
                        flush=True,
                    )
            rembg = n * args.rounds / totals["rembg"]
            for target in targets[:-1]:
                rate = n * args.rounds / totals[target]
                print(
                    f"{output:7} {'all':>5} {names[target]}: {rate:.2f} img/s, rembg p "
                    f"{rembg:.2f} img/s, ratio {rate / rembg:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
