"""Weights files: verified on load, refused with a useful message when missing or damaged."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.segmenter import Segmenter
from model.u2net import u2netp
from model.weights import SPECS, WeightsError, load_state_dict, recorded_digest, tensors_sha256
from weights.__main__ import main as weights_cli
from weights.convert import save_weights


def _random_state() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in u2netp(fused=True).state_dict().items()}


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """A user-converted u2netp file (random weights, its own digest in the metadata)."""
    path = tmp_path / "u2netp.safetensors"
    save_weights(_random_state(), path, "u2netp", source="random.pth", source_md5="0" * 32)
    return path


def test_digest_is_the_one_first_taken_of_torch_tensors() -> None:
    """The digests pinned in SPECS were first taken of PyTorch tensors, dtypes spelt its way:
    the numpy digest hashes the same bytes."""
    state = {
        "a.weight": torch.randn(4, 3, 3, 3),
        "a.bias": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 2, dtype=torch.float16),
    }
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    assert tensors_sha256({k: v.numpy() for k, v in state.items()}) == h.hexdigest()


def test_a_state_dict_of_another_layout_is_not_written(tmp_path: Path) -> None:
    state = _random_state()
    path = tmp_path / "u2netp.safetensors"
    # Both models have the same names; not the same shapes.
    with pytest.raises(ValueError, match=r"conv_s1.weight is float32 \(16, 64, 3, 3\)"):
        save_weights(state, path, "u2net", source="x", source_md5="0" * 32)
    unfused = {**state, "side1.bn.weight": state["side1.bias"]}
    del unfused["side1.weight"]
    with pytest.raises(ValueError, match=r"missing \['side1.weight'\].*unexpected"):
        save_weights(unfused, path, "u2netp", source="x", source_md5="0" * 32)
    state["side1.bias"] = state["side1.bias"].astype(np.float64)
    with pytest.raises(ValueError, match=r"side1\.bias is float64"):
        save_weights(state, path, "u2netp", source="x", source_md5="0" * 32)
    assert not path.exists()


def test_missing_file_names_the_file_and_the_fetch_command(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError) as exc:
        load_state_dict(missing, "u2net")
    assert str(missing) in str(exc.value)
    assert "python -m weights fetch u2net" in str(exc.value)


def test_truncated_file_is_refused(tiny_weights: Path) -> None:
    data = tiny_weights.read_bytes()
    tiny_weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="unreadable or truncated") as exc:
        load_state_dict(tiny_weights, "u2netp")
    assert SPECS["u2netp"].tensors_sha256 in str(exc.value)


def test_corrupted_tensor_bytes_are_refused(tiny_weights: Path) -> None:
    data = bytearray(tiny_weights.read_bytes())
    data[-100] ^= 0xFF
    tiny_weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt: its tensors hash to"):
        load_state_dict(tiny_weights, "u2netp")


def test_file_of_another_model_is_refused(tiny_weights: Path) -> None:
    with pytest.raises(WeightsError, match="holds model 'u2netp', not 'u2net'"):
        load_state_dict(tiny_weights, "u2net")


def test_claiming_the_release_requires_the_pinned_digest(tmp_path: Path) -> None:
    """Random tensors labelled as the released ONNX are caught by the pinned digest."""
    path = tmp_path / "u2netp.safetensors"
    spec = SPECS["u2netp"]
    save_weights(_random_state(), path, "u2netp", source="forged", source_md5=spec.onnx_md5)
    with pytest.raises(WeightsError) as exc:
        load_state_dict(path, "u2netp")
    assert spec.tensors_sha256 in str(exc.value)


def test_good_file_loads_strictly(tiny_weights: Path) -> None:
    model = u2netp(weights=tiny_weights)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_released_weights_verify(u2netp_weights: Path) -> None:
    assert weights_cli(["verify", "--model", "u2netp", str(u2netp_weights)]) == 0


def test_cli_converts_an_official_checkpoint(tmp_path: Path) -> None:
    pth = tmp_path / "u2netp.pth"
    torch.save(u2netp().state_dict(), pth)
    out = tmp_path / "out.safetensors"
    assert weights_cli(["convert", str(pth), "--model", "u2netp", "--out", str(out)]) == 0
    assert weights_cli(["verify", "--model", "u2netp", str(out)]) == 0
    assert weights_cli(["convert", str(pth), "--model", "u2net", "--out", str(out)]) == 1


def test_cli_reports_bad_weights_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert weights_cli(["verify", "--model", "u2net", str(tmp_path / "x.safetensors")]) == 1
    assert "python -m weights fetch u2net" in capsys.readouterr().err


def test_a_stripped_file_is_the_cpu_engines_record(tmp_path: Path, u2netp_weights: Path) -> None:
    """``python -m weights strip`` keeps a weights file's record alone (what the CPU image
    ships): the CPU engines load from it beside their own files and give the same maps; what
    needs the tensors refuses it, saying why."""
    for path in u2netp_weights.parent.glob("u2netp.*"):
        if path.suffix != ".onnx":
            shutil.copy(path, tmp_path / path.name)
    stripped = tmp_path / u2netp_weights.name
    assert weights_cli(["strip", "--model", "u2netp", str(stripped)]) == 0
    assert stripped.stat().st_size < 10_000
    assert recorded_digest(stripped, "u2netp") == recorded_digest(u2netp_weights, "u2netp")
    image = np.full((64, 80, 3), 90, np.uint8)
    for engine, precision in (("mnn", "faithful"), ("openvino", "float32"), ("openvino", "fast")):
        ours = Segmenter("u2netp", stripped, device="cpu", engine=engine, precision=precision)
        full = Segmenter("u2netp", u2netp_weights, device="cpu", engine=engine, precision=precision)
        assert ours.identity == full.identity
        assert np.array_equal(ours.levels([image]), full.levels([image]))
    with pytest.raises(WeightsError, match="without their tensors"):
        load_state_dict(stripped, "u2netp")


def test_the_int8_model_loads_where_its_quantizer_is_not_installed(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU image's runtime has no NNCF: the int8 model its build stage quantized loads there
    (the installed OpenVINO must still be the one that made it), checked by its digests."""
    from importlib import metadata

    real = metadata.version

    def version(name: str) -> str:
        if name == "nncf":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    fast = Segmenter("u2netp", u2netp_weights, device="cpu", engine="openvino", precision="fast")
    assert fast.dtype == "int8"
    monkeypatch.setattr(metadata, "version", lambda name: "0" if name == "openvino" else real(name))
    with pytest.raises(WeightsError, match="was made by"):
        Segmenter("u2netp", u2netp_weights, device="cpu", engine="openvino", precision="fast")


class ServeCalls:
    """``python -m service --fetch`` with the fetch and the server replaced: what each got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fails: str | None = None) -> None:
        import service.core.budget
        import service.http.server
        import weights.fetch

        self.fetched: list[tuple[str, Path]] = []
        self.served = 0

        def fetch(name: str, dest: Path, *, force: bool = False) -> Path:
            if name == fails:
                raise WeightsError(f"{name}: the index could not be reached")
            self.fetched.append((name, dest))
            return dest / f"{name}.safetensors"

        def serve(app: object, settings: object) -> int:
            self.served += 1
            return 0

        monkeypatch.setattr(weights.fetch, "fetch", fetch)
        monkeypatch.setattr(service.http.server, "serve_app", serve)
        monkeypatch.setattr(service.core.budget, "limit_arenas", lambda count: True)


def test_the_service_fetches_the_models_it_serves_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make serve`` runs ``python -m service --fetch``: the served models' weights (whichever
    U2SERVE_MODEL(S) names, the default first), fetched in the service's own process, then the
    service; a failed fetch stops it with the fetch's message; a file named by U2SERVE_WEIGHTS
    (the user's own) is not fetched."""
    from service.__main__ import main as service_main

    monkeypatch.setenv("U2SERVE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("U2SERVE_MODELS", "u2netp,u2net")
    calls = ServeCalls(monkeypatch)
    assert service_main(["--fetch"]) == 0
    assert calls.fetched == [("u2netp", tmp_path), ("u2net", tmp_path)]
    assert calls.served == 1

    calls = ServeCalls(monkeypatch, fails="u2net")
    assert service_main(["--fetch"]) == 1
    assert "u2net: the index could not be reached" in capsys.readouterr().err
    assert calls.served == 0

    monkeypatch.delenv("U2SERVE_MODELS")
    monkeypatch.setenv("U2SERVE_WEIGHTS", str(tmp_path / "mine.safetensors"))
    calls = ServeCalls(monkeypatch)
    assert service_main(["--fetch"]) == 0
    assert (calls.fetched, calls.served) == ([], 1)
    calls = ServeCalls(monkeypatch)
    assert service_main([]) == 0  # without --fetch, nothing is fetched
    assert (calls.fetched, calls.served) == ([], 1)
