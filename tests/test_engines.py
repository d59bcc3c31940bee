"""The engines: the same maps from each, `auto` resolved as documented, derived files verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import model.engines as model_engines
from model.device import CPU, Device
from model.engines import (
    ENGINES,
    MIXED_MODELS,
    Arithmetic,
    EngineOptions,
    cpu_arithmetic,
    cpu_features,
    float32_cpu_engine,
    int8_pays,
    openvino_engine,
    openvino_files,
    prepare_engines,
    resolve_engine,
)
from model.engines.mnn_engine import engine_file, record_file
from model.postprocess import finish_on_cpu, to_levels
from model.preprocess import preprocess
from model.segmenter import Segmenter
from model.weights import WeightsError
from weights.__main__ import main as weights_cli

from .conftest import load_rgb, weights_file


@pytest.mark.parametrize("engine", ["mnn", "openvino"])
@pytest.mark.parametrize("name", ["u2netp", "u2net"])
def test_float32_engines_agree_with_pytorch(
    name: str, engine: str, reference_images: list[Path]
) -> None:
    """Winograd (MNN) and OpenVINO's float32 against PyTorch's direct convolution (oneDNN),
    float32 all, on real photos.

    Measured over the 18 reference photos (AVX-512 CPU; the same with oneDNN held to AVX2):
    MNN's fused map max difference 1.3e-3 (U2NET) / 5.7e-4 (U2NETP), mean at most 8.7e-6; the
    final 8-bit maps differ by one level on at most 0.23% of pixels. OpenVINO's (AVX-512 CPU
    with AMX, and held to AVX2): max 2.5e-5, mean at most 2.6e-7, one level on at most 0.34% of
    the pixels of the photos tested here (1.6% of the worst of all 18, still one level at most).
    The bounds give 3x or more headroom; a wrong tensor or layout gives differences of 0.1 and
    more.
    """
    weights = weights_file(name)
    ours = Segmenter(name, weights, device="cpu", engine="torch")
    other = Segmenter(name, weights, device="cpu", engine=engine, precision="float32")
    assert (other.dtype, other.precision, other.arithmetic) == (
        "float32",
        "faithful",
        "float32",
    )
    for path in reference_images[::4]:
        image = load_rgb(path)
        x = preprocess([image], ours.spec)
        a, b = ours.forward(x), other.forward(x)
        assert b.shape == a.shape
        assert b.dtype == np.float32
        diff = np.abs(a - b)
        assert diff.max() <= 0.01, f"{path.name}: max {diff.max():.2e}"
        assert diff.mean() <= 1e-4, f"{path.name}: mean {diff.mean():.2e}"
        size = (image.shape[0], image.shape[1])
        answer_a, answer_b = (
            finish_on_cpu(to_levels(m)[0], size, probability=True, threshold=0.5).astype(int)
            for m in (a, b)
        )
        levels = np.abs(answer_a - answer_b)
        assert levels.max() <= 2
        assert (levels > 0).mean() < 0.01


def test_mnn_runs_batches(u2netp_weights: Path, reference_images: list[Path]) -> None:
    """A batch gives each image the map it gets alone (batch 1 is the CPU default, but the
    setting allows more)."""
    seg = Segmenter("u2netp", u2netp_weights, device="cpu", engine="mnn")
    x = preprocess([load_rgb(p) for p in reference_images[:3]], seg.spec)
    together = seg.forward(x)
    assert together.shape == (3, 1, 320, 320)
    for i in range(3):
        # MNN picks its Winograd tiling by shape, so a batch rounds differently from a single
        # image: measured 6.0e-4 at most, within the engine-agreement bounds above.
        diff = np.abs(together[i : i + 1] - seg.forward(x[i : i + 1]))
        assert diff.max() <= 0.01
        assert diff.mean() <= 1e-4


def test_auto_picks_the_cpus_float32_engine_and_torch_elsewhere() -> None:
    cpu, cuda = CPU, Device("cuda")
    assert resolve_engine("auto", cpu, "float32") == float32_cpu_engine(*cpu_features())
    assert resolve_engine("auto", cpu, "float32", "float32", "u2net") == float32_cpu_engine(
        *cpu_features()
    )
    assert float32_cpu_engine("GenuineIntel", frozenset({"avx2", "avx512f"})) == "openvino"
    assert float32_cpu_engine("GenuineIntel", frozenset({"avx2"})) == "mnn"
    assert float32_cpu_engine("AuthenticAMD", frozenset({"avx2", "avx512f"})) == "mnn"
    assert float32_cpu_engine("", frozenset()) == "mnn"  # no /proc/cpuinfo, or not x86
    assert resolve_engine("auto", cpu, "bfloat16") == "torch"
    assert resolve_engine("auto", cuda, "float16") == "torch"
    assert resolve_engine("torch", cpu, "float32") == "torch"
    with pytest.raises(ValueError, match="engine must be"):
        resolve_engine("tensorrt", cpu, "float32")


AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"})
VNNI = frozenset({"avx2", "avx512f", "avx512_vnni"})  # Intel Cascade Lake on, AMD Zen 4 on
AVX512 = frozenset({"avx2", "avx512f"})  # Skylake-SP: AVX-512 without int8 dot products
AVX2 = frozenset({"avx2", "avx_vnni"})  # a client CPU's 256-bit VNNI is not measured


def test_the_cpu_rule_is_a_function_of_its_features() -> None:
    """``faithful`` runs the mixed model for a model that has one where int8 pays (VNNI or AMX),
    float32 elsewhere; ``fast`` is int8 and ``float32`` float32 on every CPU."""
    assert [int8_pays(f) for f in (AMX, VNNI, AVX512, AVX2, frozenset())] == [
        True,
        True,
        False,
        False,
        False,
    ]
    for flags in (AMX, VNNI, AVX512, AVX2):
        for model in ("u2net", "u2netp"):
            mixed = model in MIXED_MODELS and int8_pays(flags)
            assert cpu_arithmetic(model, "faithful", flags) == ("mixed" if mixed else "float32")
            assert cpu_arithmetic(model, "fast", flags) == "int8"
            assert cpu_arithmetic(model, "float32", flags) == "float32"
    assert cpu_arithmetic(None, "faithful", AMX) == "float32"
    assert set(MIXED_MODELS) == set(openvino_files.KEEP_MIXED)


def test_precision_picks_the_engine_and_is_reported(u2netp_weights: Path) -> None:
    cpu, cuda = CPU, Device("cuda")
    assert resolve_engine("auto", cpu, "float32", "fast") == "openvino"
    assert resolve_engine("auto", cpu, "float32", "faithful") == float32_cpu_engine(*cpu_features())
    mixed = cpu_arithmetic("u2net", "faithful", cpu_features()[1]) == "mixed"
    assert resolve_engine("auto", cpu, "float32", "faithful", "u2net") == (
        "openvino" if mixed else float32_cpu_engine(*cpu_features())
    )
    assert resolve_engine("auto", cuda, "float16", "fast") == "torch"
    with pytest.raises(ValueError, match="precision must be"):
        resolve_engine("auto", cpu, "float32", "quick")
    fast = Segmenter("u2netp", u2netp_weights, device="cpu", precision="fast")
    assert (fast.engine.name, fast.dtype, fast.precision) == ("openvino", "int8", "fast")
    assert fast.arithmetic == "int8+float32 (9 layers)"  # the head and two stage2d layers
    forced = Segmenter("u2netp", u2netp_weights, engine="openvino", precision="float32")
    assert (forced.dtype, forced.precision, forced.arithmetic) == (
        "float32",
        "faithful",
        "float32",
    )
    faithful = Segmenter("u2netp", u2netp_weights, device="cpu", precision="faithful")
    assert (faithful.engine.name, faithful.dtype, faithful.precision) == (
        float32_cpu_engine(*cpu_features()),
        "float32",
        "faithful",
    )
    explicit = Segmenter("u2netp", u2netp_weights, engine="openvino", precision="faithful")
    assert (explicit.engine.name, explicit.dtype, explicit.precision) == (
        "openvino",
        "float32",
        "faithful",
    )
    # What is reported is what runs: an explicit engine wins over the precision.
    assert Segmenter("u2netp", u2netp_weights, engine="mnn", precision="fast").precision == (
        "faithful"
    )
    with pytest.raises(ValueError, match="precision must be"):
        Segmenter("u2netp", u2netp_weights, precision="int8")


@pytest.mark.parametrize("precision", ["fast", "float32"])
def test_openvino_runs_batches(
    u2netp_weights: Path, reference_images: list[Path], precision: str
) -> None:
    seg = Segmenter("u2netp", u2netp_weights, device="cpu", engine="openvino", precision=precision)
    x = preprocess([load_rgb(p) for p in reference_images[:3]], seg.spec)
    together = seg.forward(x)
    assert together.shape == (3, 1, 320, 320)
    assert together.dtype == np.float32
    for i in range(3):
        # Each batch size is its own compiled model. Measured: identical (0.0) with AMX and with
        # the plugin held to AVX2; the bounds allow what a differently blocked kernel could do.
        diff = np.abs(together[i : i + 1] - seg.forward(x[i : i + 1]))
        assert diff.max() <= 0.01
        assert diff.mean() <= 1e-4


def test_mnn_refuses_what_it_cannot_do(u2netp_weights: Path) -> None:
    with pytest.raises(ValueError, match="float32"):
        Segmenter("u2netp", u2netp_weights, device="cpu", dtype="bfloat16", engine="mnn")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the U2NETP weights with every engine's file made from it by the CLI."""
    folder = tmp_path_factory.mktemp("prepared")
    weights = folder / "u2netp.safetensors"
    shutil.copy(weights_file("u2netp"), weights)
    assert weights_cli(["prepare", "--model", "u2netp", str(weights)]) == 0
    return weights


def test_int8_model_is_deterministic(prepared: Path) -> None:
    """The same weights and calibration photos make the same int8 files, byte for byte: the
    fixture's were made afresh, the weights folder's by `python -m weights fetch`, on this CPU.
    (Across instruction sets the float statistics may round differently: README, Faithfulness.)"""
    made = json.loads(openvino_files.record_file(prepared).read_text())
    fetched = json.loads(openvino_files.record_file(weights_file("u2netp")).read_text())
    if made["made_on"] != fetched["made_on"]:
        pytest.skip(f"the weights folder's file was made on {fetched['made_on']}")
    assert (made["xml_sha256"], made["bin_sha256"]) == (
        fetched["xml_sha256"],
        fetched["bin_sha256"],
    )
    assert made["calibration_sha256"] == openvino_files.calibration_sha256()
    assert made["keep_float"] == list(openvino_files.KEEP_FLOAT["u2netp"])


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_loads_prepared_weights(engine: str, prepared: Path) -> None:
    seg = Segmenter("u2netp", prepared, device="cpu", engine=engine)
    (m,) = seg.predict([np.full((40, 60, 3), 128, np.uint8)])
    assert m.shape == (40, 60)
    assert seg.engine.name == engine


def test_prepare_is_idempotent(prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = engine_file(prepared).stat().st_mtime_ns
    caplog.set_level("INFO")
    int8_before = openvino_files.engine_files(prepared)[1].stat().st_mtime_ns
    f32_before = openvino_files.engine_files(prepared, "float32")[1].stat().st_mtime_ns
    assert prepare_engines(prepared, "u2netp") == [
        engine_file(prepared),
        openvino_files.engine_files(prepared, "float32")[0],
        openvino_files.engine_files(prepared)[0],
    ]
    assert engine_file(prepared).stat().st_mtime_ns == before
    assert openvino_files.engine_files(prepared)[1].stat().st_mtime_ns == int8_before
    assert openvino_files.engine_files(prepared, "float32")[1].stat().st_mtime_ns == f32_before
    assert "converting" not in caplog.text
    assert "quantizing" not in caplog.text


def _damaged_copy(prepared: Path, folder: Path) -> Path:
    openvino = [
        path
        for kind in ("int8", "float32", "mixed")
        for path in (
            *openvino_files.engine_files(prepared, kind),
            openvino_files.record_file(prepared, kind),
        )
        if path.is_file()
    ]
    for path in (prepared, engine_file(prepared), record_file(prepared), *openvino):
        shutil.copy(path, folder / path.name)
    return folder / prepared.name


def test_missing_engine_file_is_refused_with_the_command(prepared: Path, tmp_path: Path) -> None:
    weights = _damaged_copy(prepared, tmp_path)
    engine_file(weights).unlink()
    with pytest.raises(WeightsError) as exc:
        Segmenter("u2netp", weights, device="cpu", engine="mnn")
    message = str(exc.value)
    assert str(engine_file(weights)) in message
    assert f"python -m weights prepare --model u2netp {weights}" in message


def test_corrupt_engine_file_is_refused(prepared: Path, tmp_path: Path) -> None:
    weights = _damaged_copy(prepared, tmp_path)
    path = engine_file(weights)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="is corrupt"):
        Segmenter("u2netp", weights, device="cpu", engine="mnn")
    # `prepare` repairs it.
    assert weights_cli(["prepare", "--model", "u2netp", str(weights)]) == 0
    Segmenter("u2netp", weights, device="cpu", engine="mnn")


def test_engine_file_of_other_weights_is_refused(prepared: Path, tmp_path: Path) -> None:
    weights = _damaged_copy(prepared, tmp_path)
    record = json.loads(record_file(weights).read_text())
    record["weights_sha256"] = "0" * 64
    record_file(weights).write_text(json.dumps(record))
    with pytest.raises(WeightsError, match="made from other weights"):
        Segmenter("u2netp", weights, device="cpu", engine="mnn")


# The precision that loads each OpenVINO file on every CPU (the mixed one only where the rule
# chooses it: tested apart, on U2NET).
PRECISION_OF: dict[Arithmetic, str] = {"int8": "fast", "float32": "float32"}


@pytest.mark.parametrize(("kind", "part"), [("int8", 0), ("int8", 1), ("float32", 1)])
def test_damaged_openvino_file_is_refused_and_prepare_repairs_it(
    prepared: Path, tmp_path: Path, kind: Arithmetic, part: int
) -> None:
    """A flipped byte in the graph (.xml) or the constants (.bin) is found by its digest."""
    precision = PRECISION_OF[kind]
    weights = _damaged_copy(prepared, tmp_path)
    path = openvino_files.engine_files(weights, kind)[part]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="is corrupt") as exc:
        Segmenter("u2netp", weights, device="cpu", engine="openvino", precision=precision)
    assert f"python -m weights prepare --model u2netp {weights}" in str(exc.value)
    if part == 1:  # `prepare` repairs it (once for int8: quantizing takes a minute)
        assert weights_cli(["prepare", "--model", "u2netp", str(weights)]) == 0
        seg = Segmenter("u2netp", weights, device="cpu", engine="openvino", precision=precision)
        assert seg.engine.name == "openvino"


@pytest.mark.parametrize(
    ("kind", "key", "value", "message"),
    [
        ("int8", "weights_sha256", "0" * 64, "made from other weights"),
        ("int8", "calibration_sha256", "0" * 64, "calibrated on other photos"),
        ("int8", "quantizer", {"openvino": "2020.1", "nncf": "1.0"}, "was made by"),
        ("int8", "format", "u2serve-openvino-int8-v0", "not a u2netp"),
        ("float32", "weights_sha256", "0" * 64, "made from other weights"),
        ("float32", "converter", {"openvino": "2020.1"}, "was made by"),
        ("float32", "format", "u2serve-openvino-int8-v1", "not a u2netp"),
    ],
)
def test_stale_openvino_file_is_refused(
    prepared: Path, tmp_path: Path, kind: Arithmetic, key: str, value: object, message: str
) -> None:
    """Its record names the weights, the converter, the recipe and for int8 the calibration set
    it was made from; any of them other than now makes the file stale."""
    precision = PRECISION_OF[kind]
    weights = _damaged_copy(prepared, tmp_path)
    record_path = openvino_files.record_file(weights, kind)
    record = json.loads(record_path.read_text())
    record[key] = value
    record_path.write_text(json.dumps(record))
    with pytest.raises(WeightsError, match=message):
        Segmenter("u2netp", weights, device="cpu", engine="openvino", precision=precision)


@pytest.mark.parametrize("kind", ["int8", "float32"])
def test_missing_openvino_record_is_refused(
    prepared: Path, tmp_path: Path, kind: Arithmetic
) -> None:
    precision = PRECISION_OF[kind]
    weights = _damaged_copy(prepared, tmp_path)
    openvino_files.record_file(weights, kind).unlink()
    with pytest.raises(WeightsError, match="missing or not a u2netp"):
        Segmenter("u2netp", weights, device="cpu", engine="openvino", precision=precision)


def test_openvino_refuses_a_gpu(u2netp_weights: Path) -> None:
    with pytest.raises(ValueError, match="runs on the CPU"):
        openvino_engine.load(u2netp_weights, "u2netp", EngineOptions(Device("cuda"), "float16"))


# Two units of U2NETP kept in float32 for the mixed model's tests: a convolution and a quantizer
# before an addition (whichever models have a mixed model of their own, the mechanism is tested
# on the small one).
TEST_KEEP = (
    "/stage1/rebnconvin/conv_s1/Conv/WithoutBiases",
    "/stage1/rebnconvin/relu_s1/Relu/fq_output_0",
)


@pytest.fixture
def u2netp_mixed(monkeypatch: pytest.MonkeyPatch) -> None:
    """U2NETP has a mixed model keeping :data:`TEST_KEEP`, and the OpenVINO engine sees a CPU
    where the rule chooses it, whatever this one is."""
    monkeypatch.setattr(openvino_files, "KEEP_MIXED", {"u2netp": TEST_KEEP})
    monkeypatch.setattr(model_engines, "MIXED_MODELS", frozenset({"u2netp"}))
    monkeypatch.setattr(openvino_engine, "cpu_features", lambda: ("GenuineIntel", VNNI))


@pytest.fixture(scope="module")
def mixed_prepared(prepared: Path) -> Path:
    """The prepared U2NETP with its mixed model made by `prepare` (the one quantization of the
    mixed tests: about a minute)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openvino_files, "KEEP_MIXED", {"u2netp": TEST_KEEP})
        assert weights_cli(["prepare", "--model", "u2netp", str(prepared)]) == 0
    assert openvino_files.record_file(prepared, "mixed").is_file()
    return prepared


@pytest.mark.usefixtures("u2netp_mixed")
def test_mixed_model_is_its_own_network(mixed_prepared: Path) -> None:
    """``faithful`` on OpenVINO runs the mixed model where the rule says so; it reports what it
    keeps in float32, and its identity (which keys cached maps) is neither int8's nor float32's."""
    weights = mixed_prepared
    mixed = Segmenter("u2netp", weights, engine="openvino", precision="faithful")
    assert (mixed.dtype, mixed.precision) == ("int8", "faithful")
    assert mixed.arithmetic == "int8+float32 (8 layers)"  # the head and one convolution
    fast = Segmenter("u2netp", weights, engine="openvino", precision="fast")
    float32 = Segmenter("u2netp", weights, engine="openvino", precision="float32")
    assert (fast.precision, fast.arithmetic) == ("fast", "int8+float32 (9 layers)")
    assert len({mixed.identity, fast.identity, float32.identity}) == 3
    record = json.loads(openvino_files.record_file(weights, "mixed").read_text())
    assert record["keep_float"] == [*openvino_files.HEAD, *TEST_KEEP]
    assert record["calibration_sha256"] == openvino_files.calibration_sha256()
    x = preprocess([np.full((64, 64, 3), 100, np.uint8)], mixed.spec)
    assert mixed.forward(x).shape == (1, 1, 320, 320)


@pytest.mark.usefixtures("u2netp_mixed")
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("keep_float", list(openvino_files.HEAD), "keeps other layers in float32"),
        ("calibration_sha256", "0" * 64, "calibrated on other photos"),
        ("weights_sha256", "0" * 64, "made from other weights"),
        ("quantizer", {"openvino": "2020.1", "nncf": "1.0"}, "was made by"),
        ("format", "u2serve-openvino-int8-v1", "not a u2netp"),
    ],
)
def test_stale_mixed_file_is_refused(
    mixed_prepared: Path, tmp_path: Path, key: str, value: object, message: str
) -> None:
    """The mixed file's record names what int8's does and the layers kept in float32: another
    list in this code (a new ranking) makes the file stale too."""
    weights = _damaged_copy(mixed_prepared, tmp_path)
    record_path = openvino_files.record_file(weights, "mixed")
    record = json.loads(record_path.read_text())
    record[key] = value
    record_path.write_text(json.dumps(record))
    with pytest.raises(WeightsError, match=message):
        Segmenter("u2netp", weights, engine="openvino", precision="faithful")


@pytest.mark.usefixtures("u2netp_mixed")
@pytest.mark.parametrize("part", [0, 1])
def test_damaged_mixed_file_is_refused(mixed_prepared: Path, tmp_path: Path, part: int) -> None:
    weights = _damaged_copy(mixed_prepared, tmp_path)
    path = openvino_files.engine_files(weights, "mixed")[part]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="is corrupt"):
        Segmenter("u2netp", weights, engine="openvino", precision="faithful")
