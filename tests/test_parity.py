"""Parity with the authors' own maps and with ONNX Runtime, using the released weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.parity import measure
from model.preprocess import preprocess
from model.segmenter import Segmenter
from model.u2net import u2net, u2netp
from model.weights import SPECS

from .conftest import load_rgb, reference_dir, weights_file

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=["u2netp", "u2net"])
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("device", DEVICES)
def test_maps_match_the_authors(name: str, device: str) -> None:
    """The default path on each device: mean MAE ≤ 0.001, worst ≤ 0.003, IoU@0.5 ≥ 0.995/0.99."""
    report = measure(name, weights_file(name), reference_dir(), device=device)
    assert len(report.maes) == 18, report.summary()
    assert report.mean_mae <= 0.001, report.summary()
    assert report.worst_mae <= 0.003, report.summary()
    assert report.mean_iou >= 0.995, report.summary()
    assert report.worst_iou >= 0.99, report.summary()


def test_converted_model_agrees_with_onnx_runtime(name: str, reference_images: list[Path]) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        str(weights_file(name, ".onnx")), providers=["CPUExecutionProvider"]
    )
    model = (u2net if name == "u2net" else u2netp)(weights=weights_file(name))
    x = preprocess([load_rgb(reference_images[0])], SPECS[name])
    (input_meta,) = session.get_inputs()
    expected = session.run(None, {input_meta.name: x.numpy()})
    with torch.inference_mode():
        ours = model.forward_side_outputs(x)
    for ref, got in zip(expected, ours, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-4, rtol=0)


def test_batch_equals_one_by_one(u2netp_weights: Path, reference_images: list[Path]) -> None:
    """Images of different sizes share one batch and get the same maps as alone."""
    seg = Segmenter("u2netp", u2netp_weights, device="cpu")
    images = [load_rgb(p) for p in reference_images[:4]]
    assert len({im.shape for im in images}) > 1
    x = preprocess(images, seg.spec)
    together = seg.forward(x)
    for i, image in enumerate(images):
        torch.testing.assert_close(
            together[i : i + 1], seg.forward(x[i : i + 1]), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(x[i : i + 1], preprocess([image], seg.spec))
    # The authors' 8-bit step can turn a 1e-7 difference into one level on a rare pixel.
    for image, got in zip(images, seg.predict(images), strict=True):
        (alone,) = seg.predict([image])
        assert got.shape == image.shape[:2]
        diff = (got - alone).abs()
        assert diff.max() <= 1 / 255 + 1e-6
        assert (diff > 1e-5).float().mean() < 1e-3
