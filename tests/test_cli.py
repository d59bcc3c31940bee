"""``u2serve``: segment folders in-process (outputs identical to the API's, failures reported and
skipped, resumption, exit statuses, Ctrl-C), and the ``serve``/``fetch`` pass-throughs."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import httpx
import numpy as np
import pytest
from PIL import Image

from service.params import SegmentParams
from u2serve.cli import _parsers, _settings, main

from .conftest import REPO, reference_dir
from .procs import free_port, serving, serving_gated, u2netp_env, wait_ready
from .test_api import running, settings

SMALL = ["girl.png", "rifle2.jpeg", "long.jpg"]  # small photos keep this quick


def flags(weights: Path) -> list[str]:
    return ["--model", "u2netp", "--weights", str(weights), "--device", "cpu"]


def photos(folder: Path, names: list[str] = SMALL) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(reference_dir() / "images" / n, folder / n)) for n in names]


def with_alpha(path: Path) -> Path:
    """A photo whose left quarter is transparent: a cut-out keeps an input's own alpha."""
    rgba = Image.open(path).convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[:, : rgba.width // 4] = 0
    rgba.putalpha(Image.fromarray(alpha))
    out = path.with_name(path.stem + "-alpha.png")
    rgba.save(out)
    return out


# -- options -------------------------------------------------------------------------------------


def test_every_segment_parameter_is_an_option() -> None:
    _, segment = _parsers()
    actions = {a.dest: a for a in segment._actions}
    for name, info in SegmentParams.model_fields.items():
        action = actions[f"param_{name}"]
        assert "--" + name.replace("_", "-") in action.option_strings
        if get_origin(info.annotation) is Literal:
            assert action.choices == [str(c) for c in get_args(info.annotation)]


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Descriptions are written for people and may hold a literal "%": help still prints."""
    parser, _ = _parsers()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["segment", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in [*SegmentParams.model_fields, "engine", "threads"]:
        assert "--" + name.replace("_", "-") in out


def test_flags_win_over_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("U2SERVE_MODEL", "u2net")
    monkeypatch.setenv("U2SERVE_DTYPE", "bfloat16")
    parser, segment = _parsers()
    argv = ["segment", "in", "-o", "out", "--model", "u2netp", "--no-channels-last"]
    s = _settings(parser.parse_args(argv), segment)
    assert (s.model, s.channels_last, s.dtype) == ("u2netp", False, "bfloat16")


def test_bad_parameter_or_setting_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos(tmp_path / "in", SMALL[:1])
    for extra, message in [
        (["--threshold", "2"], "threshold"),
        (["--device", "gpu"], "--device / U2SERVE_DEVICE"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- outputs -------------------------------------------------------------------------------------


async def test_outputs_are_the_apis_bytes(u2netp_weights: Path, tmp_path: Path) -> None:
    sources = photos(tmp_path / "in", SMALL[:1])
    sources.append(with_alpha(sources[0]))
    cases = [
        {"output": "mask"},
        {"output": "probability", "format": "webp"},
        {"output": "cutout", "threshold": "0.3"},
        {"output": "cutout", "alpha": "soft"},
        {"output": "cutout", "alpha": "matte", "bg_color": "203040"},
    ]
    async with running(settings(u2netp_weights)) as (_, client):
        for i, params in enumerate(cases):
            out = tmp_path / f"out{i}"
            options = [f for k, v in params.items() for f in ("--" + k.replace("_", "-"), v)]
            argv = ["segment", str(tmp_path / "in"), "-o", str(out), "-q", *options]
            assert main([*argv, *flags(u2netp_weights)]) == 0
            suffix = "." + params.get("format", "png")
            for src in sources:
                r = await client.post(
                    "/segment", params=params, files={"image": (src.name, src.read_bytes())}
                )
                assert r.status_code == 200, r.text
                assert (out / (src.stem + suffix)).read_bytes() == r.content, (params, src.name)


# -- folders, failures, resumption ---------------------------------------------------------------


def make_folder(root: Path) -> None:
    photos(root, SMALL[:2])
    photos(root / "sub", SMALL[2:])
    good = (reference_dir() / "images" / "horse.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (root / "fake.png").write_text("a text file with an image's name")
    (root / "notes.txt").write_text("not an image by name: ignored")
    (root / ".hidden.jpg").write_bytes(good)  # hidden files are left alone


@pytest.fixture(scope="module")
def service(u2netp_weights: Path) -> Iterator[str]:
    """A real service process, for ``--server``: the same model, weights and device."""
    with serving(u2netp_env(u2netp_weights)) as (_, url):
        yield url


def where(run: str, request: pytest.FixtureRequest, weights: Path) -> list[str]:
    """The flags of a run in-process (``local``), or by the service (``server``)."""
    if run == "local":
        return flags(weights)
    return ["--server", request.getfixturevalue("service"), "--model", "u2netp"]


@pytest.mark.parametrize("run", ["local", pytest.param("server", marks=pytest.mark.integration)])
def test_folder_with_broken_files_and_resumption(
    u2netp_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    run: str,
) -> None:
    """The same reports, resumption and summary in-process and by a running service."""
    src, out = tmp_path / "photos", tmp_path / "out"
    make_folder(src)
    args = ["segment", str(src), "-o", str(out), "-q", *where(run, request, u2netp_weights)]

    assert main(args) == 1  # some files failed
    err = capsys.readouterr().err
    assert f"failed: {src / 'broken.jpg'}: unsupported_image" in err
    assert f"failed: {src / 'fake.png'}: unsupported_image" in err
    assert "2 written, 0 skipped (already done), 2 failed, 1 ignored" in err
    assert sorted(p.name for p in out.iterdir()) == ["girl.png", "rifle2.png"]  # not recursive

    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([*args, "--recursive"]) == 1
    assert "1 written, 2 skipped (already done), 2 failed, 1 ignored" in capsys.readouterr().err
    assert (out / "sub" / "long.png").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # done files untouched

    for bad in ("broken.jpg", "fake.png"):
        (src / bad).unlink()
    assert main([*args, "--recursive", "--overwrite"]) == 0
    assert "3 written, 0 skipped (already done), 0 failed, 1 ignored" in capsys.readouterr().err
    assert not list(out.rglob(".*"))  # no temporary files left


def test_a_batch_the_network_fails_is_reported_and_the_run_goes_on(
    u2netp_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process: the photos of a batch whose network call fails are reported as failed, each,
    and the next batch is answered."""
    import u2serve.folder

    src, out = tmp_path / "photos", tmp_path / "out"
    photos(src)
    run_batch, calls = u2serve.folder.run_batch, []

    def failing_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("the device went away")
        return run_batch(*args, **kwargs)

    monkeypatch.setattr(u2serve.folder, "run_batch", failing_first)
    args = ["segment", str(src), "-o", str(out), "-q", *flags(u2netp_weights)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"failed: {src / 'girl.png'}: RuntimeError: the device went away" in err
    assert "2 written, 0 skipped (already done), 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["long.png", "rifle2.png"]


def test_a_second_run_skips_the_boxes_written(
    u2netp_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A box is written as .json, and a second run knows it is done by that name."""
    src, out = tmp_path / "photos", tmp_path / "out"
    make_folder(src)
    for bad in ("broken.jpg", "fake.png"):
        (src / bad).unlink()
    args = ["segment", str(src), "-o", str(out), "-q", "--output", "box", *flags(u2netp_weights)]
    assert main(args) == 0
    assert "2 written, 0 skipped" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["girl.json", "rifle2.json"]
    assert main(args) == 0
    assert "0 written, 2 skipped (already done)" in capsys.readouterr().err


def test_stderr_has_the_progress_bar_and_the_summary_only(
    u2netp_weights: Path, tmp_path: Path
) -> None:
    """No library's chatter between the bar's updates (libvips reports each encode at INFO)."""
    src, out = tmp_path / "photos", tmp_path / "out"
    photos(src)
    args = ["segment", str(src), "-o", str(out), "--output", "cutout", *flags(u2netp_weights)]
    run = subprocess.run(
        [sys.executable, "-m", "u2serve.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    parts = [p.strip() for p in re.split(r"[\r\n]+", run.stderr) if p.strip()]
    summary = parts.pop()
    assert summary.startswith(f"{len(SMALL)} written, 0 skipped"), run.stderr
    assert parts, "no progress bar"
    assert all(p.endswith("img/s]") for p in parts), parts


def test_named_files_and_missing_inputs(u2netp_weights: Path, tmp_path: Path) -> None:
    (photo,) = photos(tmp_path / "in", SMALL[:1])
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    argv = ["segment", str(photo), str(missing), "-o", str(out), "-q"]
    status = main([*argv, *flags(u2netp_weights)])
    assert status == 1  # the missing input counts as a failure; the photo is still done
    assert (out / "girl.png").is_file()


def test_never_writes_over_an_input(
    u2netp_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    (photo,) = photos(folder, SMALL[:1])  # girl.png, whose mask would be girl.png
    before = photo.read_bytes()
    assert main(["segment", str(folder), "-o", str(folder), "-q", *flags(u2netp_weights)]) == 1
    assert "is also the output folder" in capsys.readouterr().err
    assert main(["segment", str(photo), "-o", str(folder), "-q", *flags(u2netp_weights)]) == 1
    assert "its output would replace it" in capsys.readouterr().err
    assert photo.read_bytes() == before


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(
    u2netp_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "photos", tmp_path / "out"
    names = [f"{i:02d}-{n}" for i in range(4) for n in SMALL]  # 12 photos
    src.mkdir()
    for name in names:
        shutil.copy(reference_dir() / "images" / name[3:], src / name)
    first, gate = sorted(names)[:3], sorted(names)[3]
    # Reading the fourth photo waits for the signal (tests/gated_cli.py), so the run is
    # interrupted there however fast the machine is: the first three written, nothing else. Two
    # codec threads: the one waiting at the gate, and one to write the first three.
    args = ["segment", str(src), "-o", str(out), "--codec-threads", "2", *flags(u2netp_weights)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gated_cli", gate, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    written = [out / (Path(n).stem + ".png") for n in first]
    end = time.monotonic() + 300  # only a failing run ever waits this long
    while not all(p.exists() for p in written):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < end, "the photos before the gate were not written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "img/s" in err  # the progress bar
    done = sorted(out.iterdir())
    assert done == sorted(written)  # nothing half-written, nothing past the gate
    for p in done:
        with Image.open(p) as im:
            im.load()  # every file written is whole

    assert main([*args, "-q"]) == 0
    assert f"{len(names) - len(done)} written, {len(done)} skipped" in capsys.readouterr().err
    assert len(list(out.iterdir())) == len(names)


# -- serve and fetch -----------------------------------------------------------------------------


def test_console_script_is_this_main() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    module, _, name = project["project"]["scripts"]["u2serve"].partition(":")
    assert getattr(import_module(module), name) is main


def test_fetch_is_python_m_weights_fetch(u2netp_weights: Path) -> None:
    # Already there and verified: nothing is downloaded.
    assert main(["fetch", "u2netp", "--dir", str(u2netp_weights.parent)]) == 0


@pytest.mark.integration
def test_serve_is_python_m_service(u2netp_weights: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "U2SERVE_MODEL": "u2netp",
        "U2SERVE_WEIGHTS": str(u2netp_weights),
        "U2SERVE_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "u2serve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        photo = (reference_dir() / "images" / SMALL[0]).read_bytes()
        r = httpx.post(f"{url}/segment", files={"image": ("p", photo)}, timeout=60)
        assert r.status_code == 200
        assert Image.open(io.BytesIO(r.content)).size == (400, 267)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # drained, as python -m service does
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_the_same_photo_twice_is_a_map_cache_hit(
    u2netp_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A photo that comes again under another name skips the network; its output is the same."""
    src, out = tmp_path / "photos", tmp_path / "out"
    photos(src, SMALL[:2])
    shutil.copy(src / SMALL[0], src / "again.png")
    args = ["segment", str(src), "-o", str(out), "-q", "--output", "cutout"]
    assert main([*args, *flags(u2netp_weights)]) == 0
    err = capsys.readouterr().err
    assert "3 written" in err
    assert "map cache: 1 hits of 3 (33%)" in err
    assert (out / "again.png").read_bytes() == (out / "girl.png").read_bytes()
    # With no room for maps, every photo is computed, to the same bytes.
    again = tmp_path / "out2"
    off = ["segment", str(src), "-o", str(again), "-q", "--output", "cutout"]
    assert main([*off, "--cache-map-bytes", "0", *flags(u2netp_weights)]) == 0
    assert "map cache: 0 hits of 3 (0%)" in capsys.readouterr().err
    assert (again / "again.png").read_bytes() == (out / "again.png").read_bytes()


# -- by a running service: --server --------------------------------------------------------------


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def reports(err: str) -> list[str]:
    """What a run reported: its failures, and its summary's counts (not its time)."""
    lines = [line for line in err.splitlines() if line.startswith("failed: ")]
    (summary,) = [line for line in err.splitlines() if " written, " in line]
    return [*sorted(lines), summary.split(" in ")[0]]


@pytest.mark.integration
@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--output", "cutout", "--format", "webp"],
        ["--output", "cutout", "--bg-color", "ffffff", "--format", "jpeg", "--max-side", "300"],
        ["--output", "probability", "--crop", "--crop-margin", "5%", "--threshold", "0.3"],
        ["--output", "box"],
    ],
    ids=["mask", "cutout-webp", "cutout-jpeg", "probability-crop", "box"],
)
def test_a_served_folder_is_the_local_one_byte_for_byte(
    u2netp_weights: Path,
    service: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
) -> None:
    src, local, served = tmp_path / "photos", tmp_path / "local", tmp_path / "served"
    make_folder(src)
    with_alpha(src / SMALL[0])
    common = ["segment", str(src), "-r", "-q", *options]
    assert main([*common, "-o", str(local), *flags(u2netp_weights)]) == 1  # the broken files
    local_err = capsys.readouterr().err
    assert main([*common, "-o", str(served), "--server", service, "--model", "u2netp"]) == 1
    served_err = capsys.readouterr().err
    assert len(tree(local)) == 4
    assert tree(served) == tree(local)
    assert reports(served_err) == reports(local_err)


def test_server_refuses_what_only_a_local_run_means(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos(tmp_path / "in", SMALL[:1])
    args = ["segment", str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    for extra, message in [
        (["--server", "http://127.0.0.1:9", "--device", "cpu"], "--device: how the model runs"),
        (["--server", "http://127.0.0.1:9", "--threads", "2"], "--threads: how the model runs"),
        (["--concurrency", "2"], "--concurrency: only with --server"),
        (["--server", "http://127.0.0.1:9", "--concurrency", "0"], "--concurrency: at least 1"),
        (["--server", "127.0.0.1:9"], "--server: the service's URL is http(s)://"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main([*args, *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _as_from_a_terminal() -> None:
    """In the child before it starts: Ctrl-C's default, as a command typed in a terminal has.
    A suite started in the background by a non-interactive shell (as CI may start it) has SIGINT
    ignored, and Python keeps an ignored SIGINT ignored: the run would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.integration
def test_ctrl_c_stops_a_served_run_at_once_and_the_next_resumes(
    u2netp_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service holds every batch (tests/gated_service.py): the run is interrupted with its
    requests in flight, and ends without waiting for them; nothing is written."""
    src, out, gate = tmp_path / "photos", tmp_path / "out", tmp_path / "gate"
    photos(src)
    with serving_gated(u2netp_env(u2netp_weights), gate) as (_, url):
        args = ["segment", str(src), "-o", str(out), "--server", url, "--model", "u2netp"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "u2serve.cli", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_as_from_a_terminal,
        )
        held = Path(f"{gate}.pid")
        end = time.monotonic() + 300  # only a failing run ever waits this long
        while not held.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < end, "no request reached the service's batch"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # the gate is still shut: nothing was waited for
        assert proc.returncode == 130, err
        assert "0 written" in err
        assert "interrupted" in err
        assert not out.exists() or not list(out.rglob("*"))
        gate.touch()
        assert main([*args, "-q"]) == 0
    assert f"{len(SMALL)} written, 0 skipped" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["girl.png", "long.png", "rifle2.png"]
