"""A cut-out's alpha, chosen by ``alpha``: the mask, the soft map, or a matte solved from the
photo, with the subject's own colour where alpha is partial; through every face."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.params import CUTOUT_ALPHA
from u2serve import InvalidParameter, Remover

from .test_api import assert_error, photo, post_image, running, settings

HORSE = "horse.jpg"


def pixels(r: httpx.Response | bytes) -> np.ndarray:
    data = r if isinstance(r, bytes) else r.content
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture
async def client(u2netp_weights: Path) -> httpx.AsyncClient:
    async with running(settings(u2netp_weights)) as (_, c):
        yield c


async def test_each_alpha_and_the_default(client: httpx.AsyncClient) -> None:
    """``mask``: 0/255, the mask output's; ``soft``: the probability output's map; ``matte``:
    another, partial where the photo's edges are; the default is the documented one."""
    mask = pixels(await post_image(client, photo(), output="mask"))
    soft_map = pixels(await post_image(client, photo(), output="probability"))
    answers = {
        a: pixels(await post_image(client, photo(), output="cutout", alpha=a))
        for a in ("mask", "soft", "matte")
    }
    default = pixels(await post_image(client, photo(), output="cutout"))
    np.testing.assert_array_equal(default, answers[CUTOUT_ALPHA])
    np.testing.assert_array_equal(answers["mask"][..., 3], mask)
    np.testing.assert_array_equal(answers["soft"][..., 3], soft_map)
    matte = answers["matte"][..., 3]
    partial = (matte > 0) & (matte < 255)
    assert partial.any()
    assert not np.array_equal(matte, soft_map)
    # Far from the boundary, the matte agrees with the mask: the band is narrow.
    assert np.mean(np.abs(matte.astype(int) - mask.astype(int)) > 128) < 0.01


async def test_partial_alpha_has_the_subjects_own_colour(client: httpx.AsyncClient) -> None:
    """Where the soft alpha is partial the colour is estimated, not the photo's mix with the
    old background; where it is whole, the photo's own pixel."""
    rgb = np.asarray(Image.open(io.BytesIO(photo())).convert("RGB"))
    cut = pixels(await post_image(client, photo(), output="cutout", alpha="soft"))
    alpha = cut[..., 3]
    whole, partial = alpha == 255, (alpha > 0) & (alpha < 255)
    np.testing.assert_array_equal(cut[..., :3][whole], rgb[whole])
    moved = np.abs(cut[..., :3][partial].astype(int) - rgb[partial].astype(int)).max(axis=1)
    assert np.mean(moved > 8) > 0.2, "the rim keeps the photo's colours"


async def test_bg_color_and_jpeg_use_the_chosen_alpha(client: httpx.AsyncClient) -> None:
    on = {}
    for a in ("mask", "soft"):
        r = await post_image(
            client, photo(), output="cutout", alpha=a, bg_color="102030", format="jpeg"
        )
        assert r.headers["content-type"] == "image/jpeg"
        on[a] = pixels(r)
    assert on["mask"].shape == on["soft"].shape
    assert not np.array_equal(on["mask"], on["soft"])


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"output": "cutout", "alpha": "feathered"}, ["'mask'", "'soft'", "'matte'"]),
        ({"output": "mask", "alpha": "soft"}, ["output=cutout", "output=mask"]),
        ({"output": "probability", "alpha": "matte"}, ["output=cutout"]),
    ],
)
async def test_a_wrong_alpha_is_a_422_that_says_why(
    client: httpx.AsyncClient, params: dict[str, str], named: list[str]
) -> None:
    r = await post_image(client, photo(), **params)
    assert_error(r, 422, "invalid_parameter")
    message = r.json()["error"]["message"]
    assert message.startswith("alpha"), message
    for word in named:
        assert word in message, message


async def test_the_document_and_the_page_offer_it(client: httpx.AsyncClient) -> None:
    """The page builds its choices from the OpenAPI document's parameters of /segment."""
    doc = (await client.get("/openapi.json")).json()
    params = {p["name"]: p for p in doc["paths"]["/segment"]["post"]["parameters"]}
    choices = params["alpha"]["schema"]["anyOf"][0]["enum"]
    assert choices == ["mask", "soft", "matte"]


def test_remove_passes_alpha_through(u2netp_weights: Path) -> None:
    """``remove(..., alpha=)`` is the service's answer for the same parameters."""
    path = str(Path(__file__).parent / "data" / "reference" / "images" / HORSE)
    with Remover("u2netp", device="cpu", weights_dir=u2netp_weights.parent) as remover:
        soft = remover.remove(path, alpha="soft")
        matte = remover.remove(path, alpha="matte")
        with pytest.raises(InvalidParameter, match="alpha"):
            remover.remove(path, output="mask", alpha="soft")
    assert pixels(soft)[..., 3].max() == 255
    assert not np.array_equal(pixels(soft), pixels(matte))
