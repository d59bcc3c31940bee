"""``u2serve.Remover`` and ``u2serve.remove``: in process, the very bytes a real service process
answers for every output and format, in the kind of image given; the service's validation and
errors, typed; many threads batched together; weights fetched when missing."""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import u2serve
from model.weights import load_state_dict
from u2serve import InvalidParameter, Remover, U2ServeError, UnsupportedImage
from u2serve.images import as_fields

from .conftest import reference_dir
from .procs import serving, u2netp_env
from .test_cli import with_alpha

SMALL = "girl.png"  # 400×267: under the network's side, so its map is finished on the worker
PHOTO = "horse.jpg"  # 770×595

# Every output and format, with the options that change the answer's bytes.
CASES: list[dict[str, Any]] = [
    {"output": "mask"},
    {"output": "mask", "format": "webp", "threshold": 0.3},
    {"output": "mask", "refine": True},
    {"output": "probability"},
    {"output": "probability", "format": "webp", "crop": True, "crop_margin": "10%"},
    {"output": "cutout"},
    {"output": "cutout", "format": "webp", "max_side": 200},
    {"output": "cutout", "format": "jpeg", "bg_color": "ffffff", "quality": 80},
    {"output": "cutout", "bg_color": "#00ff0080", "crop": True},
    {"output": "box"},
    {"output": "box", "crop": True, "crop_margin": 20},
]


def case_id(case: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.fixture(scope="module")
def remover(u2netp_weights: Path) -> Iterator[Remover]:
    with Remover("u2netp", device="cpu", weights_dir=u2netp_weights.parent) as r:
        yield r


@pytest.fixture(scope="module")
def service(u2netp_weights: Path) -> Iterator[str]:
    with serving(u2netp_env(u2netp_weights)) as (_, url):
        yield url


def served(url: str, data: bytes, options: dict[str, Any]) -> httpx.Response:
    """The service's answer for ``data``, the options sent as a client sends them."""
    return httpx.post(
        f"{url}/segment",
        params=as_fields(options),
        content=data,
        headers={"content-type": "application/octet-stream"},
        timeout=300,
    )


def photos(tmp_path: Path) -> list[Path]:
    small = Path(shutil.copy(reference_dir() / "images" / SMALL, tmp_path / SMALL))
    return [small, with_alpha(small), reference_dir() / "images" / PHOTO]


def same_image(a: Image.Image, b: Image.Image) -> bool:
    return (a.mode, a.size, a.tobytes()) == (b.mode, b.size, b.tobytes())


# -- the service's bytes -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bytes_are_the_services(
    remover: Remover, service: str, tmp_path: Path, case: dict[str, Any]
) -> None:
    for path in photos(tmp_path):
        data = path.read_bytes()
        expected = served(service, data, case)
        assert expected.status_code == 200, expected.text
        assert remover.remove(data, **case) == expected.content, (path.name, case)
        # A path gives the answer's bytes too.
        assert remover.remove(path, **case) == expected.content
        assert remover.remove(str(path), **case) == expected.content


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pil_and_arrays_are_the_services_answer_for_their_pixels(
    remover: Remover, service: str, case: dict[str, Any]
) -> None:
    """A PIL image or an array gives the service's answer for a lossless file of its pixels,
    decoded: the same kind out as in."""
    with Image.open(reference_dir() / "images" / SMALL) as im:
        pil = im.convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, "PNG")
    expected = served(service, buf.getvalue(), case)
    assert expected.status_code == 200, expected.text
    from_pil = remover.remove(pil, **case)
    from_array = remover.remove(np.asarray(pil), **case)
    if case["output"] == "box":
        assert from_pil == from_array == expected.json()
        return
    answer = Image.open(io.BytesIO(expected.content))
    assert isinstance(from_pil, Image.Image)
    assert same_image(from_pil, answer)
    assert isinstance(from_array, np.ndarray)
    assert np.array_equal(from_array, np.asarray(answer))


@pytest.mark.integration
def test_a_pil_image_keeps_its_exif_orientation(remover: Remover, service: str) -> None:
    """As the service turns a photo's file upright, so a PIL image of it (as rembg does)."""
    with Image.open(reference_dir() / "images" / PHOTO) as im:
        rgb = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95, exif=exif)
    expected = served(service, buf.getvalue(), {"output": "cutout"})
    with Image.open(io.BytesIO(buf.getvalue())) as opened:
        cutout = remover.remove(opened)
    assert cutout.size == (rgb.height, rgb.width)  # upright
    assert same_image(cutout, Image.open(io.BytesIO(expected.content)))


# -- options and errors --------------------------------------------------------------------------


BAD: list[dict[str, Any]] = [
    {"threshold": 2},
    {"treshold": 0.5},  # misspelt: refused, not ignored
    {"crop_margin": "10%"},  # without crop
    {"output": "box", "format": "webp"},
    {"format": "jpeg"},  # a transparent cut-out
    {"bg_color": "red"},
    {"max_side": 0, "quality": 50},  # two at once: both named
]


@pytest.mark.integration
@pytest.mark.parametrize("bad", BAD, ids=case_id)
def test_invalid_options_raise_the_services_message(
    remover: Remover, service: str, bad: dict[str, Any]
) -> None:
    data = (reference_dir() / "images" / SMALL).read_bytes()
    answer = served(service, data, {"output": "cutout"} | bad)
    assert answer.status_code == 422
    with pytest.raises(InvalidParameter) as exc:
        remover.remove(data, **bad)
    error = answer.json()["error"]
    assert (exc.value.status, exc.value.code, exc.value.message) == (
        422,
        error["code"],
        error["message"],
    )


@pytest.mark.integration
@pytest.mark.parametrize("data", [b"not an image", b""], ids=["text", "empty"])
def test_undecodable_input_raises_the_services_error(
    remover: Remover, service: str, data: bytes
) -> None:
    answer = served(service, data, {})
    error = answer.json()["error"]
    with pytest.raises(U2ServeError) as exc:
        remover.remove(data)
    assert (exc.value.status, exc.value.code, exc.value.message) == (
        answer.status_code,
        error["code"],
        error["message"],
    )
    if data:
        assert isinstance(exc.value, UnsupportedImage)


def test_the_model_is_the_removers(remover: Remover) -> None:
    with pytest.raises(InvalidParameter, match="this Remover runs u2netp"):
        remover.remove(b"", model="u2net")


def test_what_is_not_an_image_is_a_type_error(remover: Remover) -> None:
    with pytest.raises(TypeError, match="not int"):
        remover.remove(3)
    with pytest.raises(TypeError, match="dtype complex128"):
        remover.remove(np.zeros((4, 4), np.complex128))


def test_bad_settings_are_value_errors(u2netp_weights: Path) -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        Remover("u3net")
    with pytest.raises(ValueError, match="device"):
        Remover("u2netp", device="gpu", weights_dir=u2netp_weights.parent)


def test_a_closed_remover_says_so(u2netp_weights: Path) -> None:
    r = Remover("u2netp", device="cpu", weights_dir=u2netp_weights.parent)
    r.close()
    r.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        r.remove((reference_dir() / "images" / SMALL).read_bytes())


def test_remove_keeps_a_remover_per_model(remover: Remover) -> None:
    data = (reference_dir() / "images" / SMALL).read_bytes()
    assert u2serve.remove(data, model="u2netp", output="mask") == remover.remove(
        data, output="mask"
    )
    assert u2serve.remove(data, model="u2netp") == remover.remove(data)  # cutout, as rembg


# -- threads and batches -------------------------------------------------------------------------


class Gate:
    """Holds the Remover's batches until opened, recording each batch's size: images from
    several threads are then known to wait together, however fast the machine is."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, remover: Remover) -> None:
        self.opened = threading.Event()
        self.sizes: list[int] = []
        segmenter = remover._service.segmenter  # the loaded model the service's batcher runs
        run = segmenter.levels_of

        def levels_of(inputs: Any) -> Any:
            self.sizes.append(len(inputs))
            self.opened.wait()
            return run(inputs)

        monkeypatch.setattr(segmenter, "levels_of", levels_of)


def until(condition: Callable[[], bool], limit_s: float = 300) -> None:
    """Wait for ``condition``; only a failing test waits ``limit_s``."""
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return
        time.sleep(0.01)
    pytest.fail("the condition was not reached")


def test_threads_are_batched_together(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = []
    with Image.open(reference_dir() / "images" / PHOTO) as im:
        rgb = im.convert("RGB")
    for i in range(5):  # five different photos: none is a map cache hit for another
        buf = io.BytesIO()
        rgb.resize((200 + i, 150)).save(buf, "PNG")
        images.append(buf.getvalue())
    answers: dict[int, bytes] = {}
    with Remover(
        "u2netp", device="cpu", max_batch_size=4, weights_dir=u2netp_weights.parent
    ) as remover:
        gate = Gate(monkeypatch, remover)

        def call(i: int) -> None:
            answers[i] = remover.remove(images[i], output="mask")

        first = threading.Thread(target=call, args=(0,))
        first.start()
        until(lambda: gate.sizes == [1])  # the first photo is in the network, alone
        rest = [threading.Thread(target=call, args=(i,)) for i in range(1, 5)]
        for t in rest:
            t.start()
        batcher = remover._service.batcher  # the service's batcher, in this process
        assert batcher is not None
        until(lambda: batcher.depth == 4)  # the other four wait together
        gate.opened.set()
        for t in [first, *rest]:
            t.join()
    assert gate.sizes == [1, 4]
    # Batched or alone, the same answers.
    with Remover("u2netp", device="cpu", weights_dir=u2netp_weights.parent) as alone:
        assert [answers[i] for i in range(5)] == [
            alone.remove(data, output="mask") for data in images
        ]


def test_close_finishes_the_calls_under_way(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = (reference_dir() / "images" / SMALL).read_bytes()
    remover = Remover("u2netp", device="cpu", weights_dir=u2netp_weights.parent)
    gate = Gate(monkeypatch, remover)
    answers: list[bytes] = []
    call = threading.Thread(target=lambda: answers.append(remover.remove(data, output="mask")))
    call.start()
    until(lambda: gate.sizes == [1])  # the call is in the network
    closing = threading.Thread(target=remover.close)
    closing.start()
    until(lambda: remover._service.draining)  # close() has begun, and waits
    gate.opened.set()
    call.join()
    closing.join()
    assert Image.open(io.BytesIO(answers[0])).mode == "L"  # answered whole, not cut short


# -- weights -------------------------------------------------------------------------------------


def test_missing_weights_are_fetched_and_verified(u2netp_weights: Path, tmp_path: Path) -> None:
    """With the verified ONNX release (and the engines' files made from the same weights) in the
    folder, nothing is downloaded: the weights are converted from it and verified."""
    for path in u2netp_weights.parent.glob("u2netp.*"):
        if path.suffix != ".safetensors":
            shutil.copy(path, tmp_path / path.name)
    with Remover("u2netp", device="cpu", weights_dir=tmp_path) as remover:
        answer = remover.remove((reference_dir() / "images" / SMALL).read_bytes())
    load_state_dict(tmp_path / "u2netp.safetensors", "u2netp")  # made, and verifies
    assert Image.open(io.BytesIO(answer)).mode == "RGBA"
