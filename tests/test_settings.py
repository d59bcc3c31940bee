"""Settings: validation, defaults and the warning for unknown variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.device import CPU, Device
from model.segmenter import resolve_device, resolve_dtype
from model.weights import SPECS
from service.settings import Settings


def test_unknown_variables_are_reported() -> None:
    env = {
        "U2SERVE_MAX_QUEUE": "5",
        "U2SERVE_MAX_QUEU": "5",
        "u2serve_treshold": "1",
        "PATH": "/bin",
        "U2SERVE_PORT": "80",
    }
    assert Settings.unknown_variables(env) == ["U2SERVE_MAX_QUEU", "u2serve_treshold"]


def test_every_field_is_a_known_variable() -> None:
    env = {f"U2SERVE_{name.upper()}": "x" for name in Settings.model_fields}
    assert Settings.unknown_variables(env) == []


def test_cors_origins_from_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("U2SERVE_CORS_ORIGINS", "https://a.example, https://b.example,")
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]


def test_weights_path_defaults_to_the_weights_dir(tmp_path: Path) -> None:
    s = Settings(model="u2netp", weights_dir=tmp_path)
    assert s.weights_path == tmp_path / "u2netp.safetensors"
    assert Settings(weights=tmp_path / "x.safetensors").weights_path == tmp_path / "x.safetensors"


@pytest.mark.parametrize(
    "kw",
    [
        {"device": "gpu"},
        {"port": 0},
        {"max_batch_size": 0},
        {"threshold": 0.5},
        {"dtype": "int8"},
        {"precision": "int8"},
        {"max_batch_wait_ms": -1},
    ],
)
def test_invalid_values_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**kw)  # type: ignore[arg-type]


def test_dtype_and_device_resolution() -> None:
    cpu, cuda = CPU, Device("cuda")
    u2net, u2netp = SPECS["u2net"], SPECS["u2netp"]
    assert resolve_dtype("auto", cpu, u2net) == "float32"
    # On CUDA each model's own default, chosen by the emulated parity (tests/test_parity.py).
    assert resolve_dtype("auto", cuda, u2net) == "float16"
    assert resolve_dtype("auto", cuda, u2netp) == "float32"
    assert resolve_dtype("bfloat16", cpu, u2net) == "bfloat16"
    # `fast`: float16 on CUDA for both models; on the CPU the engine makes it int8.
    assert resolve_dtype("auto", cuda, u2netp, "fast") == "float16"
    assert resolve_dtype("auto", cuda, u2net, "fast") == "float16"
    assert resolve_dtype("auto", cpu, u2netp, "fast") == "float32"
    # `float32`: float32 everywhere, U2NET's CUDA default included.
    assert resolve_dtype("auto", cuda, u2net, "float32") == "float32"
    assert resolve_dtype("auto", cpu, u2net, "float32") == "float32"
    with pytest.raises(ValueError, match="float16 is for CUDA"):
        resolve_dtype("float16", cpu, u2net)
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", cpu, u2net)
    assert Device.parse("cuda:1") == Device("cuda", 1)
    assert str(Device.parse("cuda:1")) == "cuda:1"
    with pytest.raises(ValueError, match="device must be"):
        Device.parse("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_precision_defaults_to_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default is whatever model.engines.DEFAULT_PRECISION says (tests/test_parity.py
    holds it to the parity rule); the variable selects the other."""
    from model.engines import DEFAULT_PRECISION

    assert Settings().precision == DEFAULT_PRECISION
    monkeypatch.setenv("U2SERVE_PRECISION", "fast")
    assert Settings().precision == "fast"
    monkeypatch.setenv("U2SERVE_PRECISION", "float32")
    assert Settings().precision == "float32"


def test_codec_threads_leave_a_core_to_the_network() -> None:
    """Measured on 2 cores: a second codec thread stalls the network's lockstep threads."""
    cores = len(os.sched_getaffinity(0))
    assert Settings().codec_threads == max(1, cores - 1)


def test_models_the_first_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().served_models == ("u2net",)
    assert Settings(model="u2netp").served_models == ("u2netp",)
    monkeypatch.setenv("U2SERVE_MODELS", "u2netp, u2net")
    s = Settings()
    assert (s.served_models, s.default_model) == (("u2netp", "u2net"), "u2netp")
    assert s.weights_for("u2net") == s.weights_dir / "u2net.safetensors"
    # U2SERVE_MODEL still names the default, which must be one of them.
    monkeypatch.setenv("U2SERVE_MODEL", "u2net")
    assert Settings().served_models == ("u2net", "u2netp")
    monkeypatch.setenv("U2SERVE_MODELS", "u2netp")
    with pytest.raises(ValidationError, match="not among models"):
        Settings()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"models": "u2net,u2net"}, "at most once"),
        ({"models": "u2net,isnet"}, "u2netp"),
        ({"models": "u2net,u2netp", "weights": "x.safetensors"}, "one model's file"),
        ({"url_allow": "10.0.0.0/8, http://bucket/"}, "neither an address"),
        ({"url_timeout_s": 0}, "greater than 0"),
    ],
)
def test_invalid_model_and_url_settings(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Settings(**kw)  # type: ignore[arg-type]


def test_url_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.url_input
    assert not s.allow_list  # nothing private is reachable by default
    monkeypatch.setenv("U2SERVE_URL_ALLOW", "bucket.internal, 10.0.0.0/8,127.0.0.2")
    monkeypatch.setenv("U2SERVE_URL_INPUT", "false")
    s = Settings()
    assert not s.url_input
    assert s.url_allow == ["bucket.internal", "10.0.0.0/8", "127.0.0.2"]
    assert s.allow_list.hosts == {"bucket.internal"}
