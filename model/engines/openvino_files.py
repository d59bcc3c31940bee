"""The OpenVINO engine's model files, derived from the verified weights and checked before use.

The fused network is written as an ONNX graph (:mod:`model.engines.onnx_graph`, no PyTorch) and
read by ``openvino.convert_model`` (whose graph keeps the biases apart from the convolutions,
which NNCF's bias correction needs; ``Core.read_model``'s does not, and the maps were twice as
far from the authors').
:func:`to_float32` saves it as it is (``<weights>.f32.xml`` and ``.f32.bin``); :func:`to_int8`
quantizes it with NNCF's post-training ``quantize`` on the calibration photos in
``model/calibration`` (never the photos the parity tests measure) into ``<weights>.int8.xml`` and
``.int8.bin``: weights int8 per output channel, activations int8 per tensor, the layers in
:data:`KEEP_FLOAT` in float32. The mixed model (``<weights>.mixed.xml`` and
``.bin``) is the same quantization with the head in float32, then the layers of
:data:`KEEP_MIXED` returned to float32 by editing the graph (:func:`with_float`). A record beside
each pair (``.f32.json``, ``.int8.json``, ``.mixed.json``) names the weights digest, the
converter's versions, for int8 and mixed the calibration set's digest and the layers kept in
float, and both files' SHA-256; :func:`check` checks them all before the engine
(:mod:`model.engines.openvino_engine`) loads a file, so a stale, truncated or swapped file is
refused like a bad weights file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.engines import Arithmetic, cpu_features, file_sha256, prepare_hint
from model.engines.onnx_graph import write_onnx
from model.preprocess import prepare as prepare_input
from model.weights import SPECS, WeightsError, verified_digest

__all__ = [
    "CALIBRATION",
    "HEAD",
    "KEEP_FLOAT",
    "KEEP_MIXED",
    "calibration_inputs",
    "calibration_photos",
    "calibration_sha256",
    "check",
    "engine_files",
    "float_units",
    "instruction_set",
    "prepare",
    "quantize_in_memory",
    "record_file",
    "record_of",
    "to_float32",
    "to_int8",
    "with_float",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Kind:
    """One of the engine's model files, by the arithmetic it runs."""

    suffix: str  # the files' middle suffix: <weights>.<suffix>.xml/.bin/.json
    name: str  # in messages
    # The recipe below (calibration variants, NNCF's arguments; for float32, the conversion),
    # versioned: a change to it makes every recorded file stale, as a change of weights or
    # calibration photos does. v2: from the ONNX graph model.engines.onnx_graph writes (v1:
    # PyTorch's export of the same network).
    format: str
    verb: str  # what making it is called in the log
    made_by: str  # the record's key for the versions of the packages that made it
    packages: tuple[str, ...]

    def versions(self) -> dict[str, str]:
        """The installed versions of the packages that make this kind of file. One that is not
        installed is left out: a runtime without the converters (the CPU image's) runs the file
        the pinned ones made, checked by its digests."""
        out = {}
        for name in self.packages:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return out


_KINDS: dict[Arithmetic, _Kind] = {
    "int8": _Kind(
        "int8", "int8", "u2serve-openvino-int8-v2", "quantizing", "quantizer", ("openvino", "nncf")
    ),
    "float32": _Kind(
        "f32", "float32", "u2serve-openvino-f32-v2", "converting", "converter", ("openvino",)
    ),
    # NNCF's quantize with the head in float (as int8's for U2NET), then the layers of
    # KEEP_MIXED returned to float32 by with_float (v2 as int8's).
    "mixed": _Kind(
        "mixed",
        "mixed int8/float32",
        "u2serve-openvino-mixed-v2",
        "quantizing (mixed)",
        "quantizer",
        ("openvino", "nncf"),
    ),
}
CALIBRATION = Path(__file__).resolve().parents[1] / "calibration"

# Convolutions kept in float32. The seven one-channel head convolutions (side maps 1-6 and the
# fusion) carry the map itself; quantized, the min-max scaling after them magnifies their
# rounding (U2NET, everything else int8: mean MAE 0.00134 against 0.00151 with them quantized,
# worst IoU 0.979 against 0.976). Their FLOPs: 0.15% of U2NET's, 0.4% of U2NETP's.
HEAD = (*(f"/side{i}/Conv/WithoutBiases" for i in range(1, 7)), "/outconv/Conv/WithoutBiases")
KEEP_FLOAT: dict[str, tuple[str, ...]] = {
    "u2net": HEAD,
    # U2NETP's 16-channel layers leave rounding less room to average out: with only the head in
    # float its maps were useless (mean MAE 0.081, worst IoU 0.37). NNCF's accuracy-controlled
    # ranking (`python -m bench.sensitivity --model u2netp`) put these two first by far: kept in
    # float, the drop in agreement with float32 fell from 0.112 to 0.034, and the next twenty
    # it reverted only to 0.018. The two are 2.5% of U2NETP's FLOPs.
    "u2netp": (
        *HEAD,
        "/stage2d/rebnconv1d/conv_s1/Conv/WithoutBiases",
        "/stage2d/rebnconv2/conv_s1/Conv/WithoutBiases",
    ),
}

# The mixed model (what ``faithful`` runs on CPUs where int8 pays, model.engines.cpu_arithmetic):
# int8 with the head in float32 as above, and then these layers returned to float32, the most
# harmful first by the measured ranking in bench/sensitivity/<model>.json (`python -m
# bench.sensitivity --model MODEL`), as many as it takes to meet the faithful bounds. Empty: no
# model met them at a speed worth having (model.engines.MIXED_MODELS says why).
KEEP_MIXED: dict[str, tuple[str, ...]] = {}


def engine_files(weights: Path, kind: Arithmetic = "int8") -> tuple[Path, Path]:
    """An OpenVINO model: its graph (``.int8.xml``, ``.f32.xml``, ``.mixed.xml``) and its
    constants (``.bin``)."""
    suffix = _KINDS[kind].suffix
    return weights.with_suffix(f".{suffix}.xml"), weights.with_suffix(f".{suffix}.bin")


def record_file(weights: Path, kind: Arithmetic = "int8") -> Path:
    return weights.with_suffix(f".{_KINDS[kind].suffix}.json")


def calibration_photos() -> list[Path]:
    return sorted(p for p in CALIBRATION.iterdir() if p.suffix == ".jpg")


def calibration_sha256() -> str:
    """A digest of the calibration photos (names and bytes)."""
    h = hashlib.sha256()
    for path in calibration_photos():
        h.update(f"{path.name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _variants(image: np.ndarray) -> list[np.ndarray]:
    """Each photo (``H×W×3``) as it is, mirrored, and three crops (the middle and two corners,
    3/4 of each side): the subject at other scales and places, as uploads have it."""
    h, w = image.shape[:2]
    ch, cw = h * 3 // 4, w * 3 // 4
    return [
        image,
        image[:, ::-1],
        image[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw],
        image[:ch, :cw],
        image[h - ch :, w - cw :][:, ::-1],
    ]


def calibration_inputs(model: str) -> list[np.ndarray]:
    """The network's inputs for calibration, ``1×3×S×S`` float32 each, through the service's own
    preprocessing."""
    out = []
    for path in calibration_photos():
        with Image.open(path) as im:
            image = np.array(im.convert("RGB"))
        for variant in _variants(image):
            out.append(np.stack([prepare_input(np.ascontiguousarray(variant), SPECS[model])]))
    return out


def instruction_set() -> str:
    """The widest x86 instruction set the kernels may use here (and a cap, if one is set): the
    float statistics the quantizer gathers may round differently from one to another."""
    flags = cpu_features()[1]
    levels = (
        ("amx", "amx_int8"),
        ("avx512_vnni", "avx512_vnni"),
        ("avx512", "avx512f"),
        ("avx2", "avx2"),
    )
    found = next((name for name, flag in levels if flag in flags), platform.machine())
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{found}, capped at {cap}" if cap else found


def _float_model(weights: Path, model: str) -> Any:
    """The fused network as OpenVINO's float32 graph."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="u2serve-openvino-") as tmp:
        onnx_path = Path(tmp) / f"{model}.onnx"
        write_onnx(weights, model, onnx_path)
        return ov.convert_model(onnx_path)


def quantize_in_memory(float_model: Any, model: str, keep_float: Sequence[str]) -> Any:
    """NNCF's post-training quantization of the float32 graph on the calibration inputs, the
    convolutions in ``keep_float`` left out."""
    import nncf

    inputs = calibration_inputs(model)
    return nncf.quantize(
        float_model,
        nncf.Dataset(inputs),
        subset_size=len(inputs),
        ignored_scope=nncf.IgnoredScope(names=list(keep_float)),
    )


# Operations that move int8 values without arithmetic on them: a quantizer before one of these
# quantizes the convolution after it.
_PASS_THROUGH = frozenset({"Concat", "MaxPool", "Interpolate"})


def with_float(quantized: Any, float_model: Any, names: Sequence[str]) -> Any:
    """A copy of a quantized graph with the operations ``names`` in float32 again, made by
    editing the graph: for a convolution, its weights and bias from the float32 graph (NNCF's
    bias correction compensated its own rounding, which is gone) and its input taken from
    before the FakeQuantize nodes that feed it, directly or through concatenations, pooling and
    resizing; for a FakeQuantize (one before an addition, say), the quantizer removed. This is
    how the mixed model is made from the int8 one, and how ``python -m bench.sensitivity``
    measures each layer: seconds a layer, not a quantization."""
    model = quantized.clone()
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    float_ops = {op.get_friendly_name(): op for op in float_model.get_ordered_ops()}
    for name in names:
        op = ops[name]
        if op.get_type_name() == "FakeQuantize":
            for target in list(op.output(0).get_target_inputs()):
                target.replace_source_output(op.input_value(0))
            continue
        float_conv = float_ops[name]
        _float_input(op.input(0))
        op.input(1).replace_source_output(float_conv.input_value(1))
        # The bias: the Add after the convolution, its constant from the float32 graph.
        for target in op.output(0).get_target_inputs():
            add = target.get_node()
            float_add = float_ops.get(add.get_friendly_name())
            if add.get_type_name() != "Add" or float_add is None:
                continue
            for i in range(2):
                if add.input_value(i).get_node().get_type_name() == "Constant":
                    add.input(i).replace_source_output(float_add.input_value(i))
    model.validate_nodes_and_infer_types()
    return model


def _float_input(port: Any) -> None:
    """Rewire ``port`` (and the inputs of the pass-through operations above it) to take the
    values from before their FakeQuantize."""
    source = port.get_source_output().get_node()
    if source.get_type_name() == "FakeQuantize":
        port.replace_source_output(source.input_value(0))
        _float_input(port)  # a concatenation's output may be quantized, and its inputs too
    elif source.get_type_name() in _PASS_THROUGH:
        for upstream in source.inputs():
            _float_input(upstream)


def float_units(quantized: Any) -> list[str]:
    """What a mixed model can keep in float: every int8 convolution, and every quantizer that
    feeds something other than a convolution or a pass-through operation (additions)."""
    units = []
    for op in quantized.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Convolution":
            if "fq_weights" in op.input_value(1).get_node().get_friendly_name():
                units.append(op.get_friendly_name())
        elif kind == "FakeQuantize":
            consumers = {t.get_node().get_type_name() for t in op.output(0).get_target_inputs()}
            if consumers - _PASS_THROUGH - {"Convolution", "ShapeOf"}:
                units.append(op.get_friendly_name())
    return units


def _quantize(weights: Path, model: str, out: Path, kind: str, *keep: str) -> None:
    """Convert, quantize with ``keep`` in float32 (for ``mixed``: the head, then return the rest
    of ``keep`` to float32 by :func:`with_float`) and save to ``out`` (``.xml``, with its
    ``.bin``); run in a child."""
    import openvino as ov

    float_model = _float_model(weights, model)
    if kind == "mixed":
        quantized = quantize_in_memory(float_model, model, HEAD)
        quantized = with_float(quantized, float_model, [n for n in keep if n not in HEAD])
    else:
        quantized = quantize_in_memory(float_model, model, keep)
    # Float layers stay float32 in the file (save_model would halve them to float16).
    ov.save_model(quantized, out, compress_to_fp16=False)


def to_int8(weights: Path, model: str, xml: Path, kind: Arithmetic = "int8") -> tuple[str, str]:
    """Quantize verified weights to an OpenVINO int8 model at ``xml`` (and its ``.bin``), or
    for ``kind="mixed"`` to the mixed model; return both files' SHA-256."""
    keep = _keep_float(model, kind)
    with tempfile.TemporaryDirectory(prefix=f"u2serve-{kind}-") as tmp:
        part = Path(tmp) / xml.name
        # In a child process, as MNN's converter is: NNCF's progress output and any crash stay
        # there, and NNCF_CI turns off NNCF's usage reports, which it would otherwise try to send.
        env = {**os.environ, "NNCF_CI": "1"}
        code = (
            "import sys; from pathlib import Path; from model.engines.openvino_files import "
            "_quantize; _quantize(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), "
            "*sys.argv[4:])"
        )
        # The layers kept in float go by name, so that the child makes what this process chose.
        done = subprocess.run(
            [sys.executable, "-c", code, str(weights), model, str(part), kind, *keep],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        bin_part = part.with_suffix(".bin")
        if done.returncode != 0 or not part.is_file() or not bin_part.is_file():
            raise WeightsError(
                f"quantizing {weights} failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return _install(part, xml)


def to_float32(weights: Path, model: str, xml: Path) -> tuple[str, str]:
    """Convert verified weights to an OpenVINO float32 model at ``xml`` (and its ``.bin``);
    return both files' SHA-256."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="u2serve-f32-") as tmp:
        part = Path(tmp) / xml.name
        # float32 in the file too (save_model would halve the constants to float16).
        ov.save_model(_float_model(weights, model), part, compress_to_fp16=False)
        return _install(part, xml)


def _install(part: Path, xml: Path) -> tuple[str, str]:
    """Move a saved model (``part`` and its ``.bin``) to ``xml``; return both files' SHA-256."""
    bin_part = part.with_suffix(".bin")
    xml.parent.mkdir(parents=True, exist_ok=True)
    digests = file_sha256(part), file_sha256(bin_part)
    # The temporary folder may be on another file system: move, then rename in place. The graph
    # last, so that a graph is never there without its constants.
    for src, dst in ((bin_part, xml.with_suffix(".bin")), (part, xml)):
        staged = dst.with_suffix(dst.suffix + ".part")
        shutil.move(src, staged)
        staged.replace(dst)
    return digests


def record_of(weights: Path, kind: Arithmetic = "int8") -> dict[str, Any]:
    """The record beside a model file (empty where there is none): its digests, what made it."""
    try:
        record = json.loads(record_file(weights, kind).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _keep_float(model: str, kind: Arithmetic) -> list[str]:
    """What the model file of this kind keeps in float32, by name (none for float32's)."""
    if kind == "mixed":
        return [*HEAD, *KEEP_MIXED[model]]
    return list(KEEP_FLOAT[model]) if kind == "int8" else []


def check(weights: Path, model: str, weights_sha256: str, kind: Arithmetic) -> Path:
    """The engine's model of this kind for these weights, verified; :class:`WeightsError`
    otherwise."""
    (xml, bin_), hint = engine_files(weights, kind), prepare_hint(weights, model)
    made = _KINDS[kind]
    what, fmt = f"{made.name} model file", made.format
    for path in (xml, bin_):
        if not path.is_file():
            raise WeightsError(f"{what} {path} not found. {hint}")
    record = record_of(weights, kind)
    if record.get("format") != fmt or record.get("model") != model:
        raise WeightsError(
            f"{record_file(weights, kind)} is missing or not a {model} {fmt} record. {hint}"
        )
    if record.get("weights_sha256") != weights_sha256:
        raise WeightsError(
            f"{what} {xml} was made from other weights (tensors "
            f"{record.get('weights_sha256')}, expected {weights_sha256}). {hint}"
        )
    if kind != "float32":
        calibration = calibration_sha256()
        if record.get("calibration_sha256") != calibration:
            raise WeightsError(
                f"{what} {xml} was calibrated on other photos (calibration set "
                f"{record.get('calibration_sha256')}, now {calibration}). {hint}"
            )
    if kind == "mixed" and record.get("keep_float") != _keep_float(model, kind):
        # The layers kept in float are this code's choice: another list is another model.
        raise WeightsError(
            f"{what} {xml} keeps other layers in float32 than this version chooses. {hint}"
        )
    versions, made_by = made.versions(), record.get(made.made_by)
    if not isinstance(made_by, dict) or {k: made_by.get(k) for k in versions} != versions:
        raise WeightsError(
            f"{what} {xml} was made by {made_by}, not the installed {versions}. {hint}"
        )
    for path, key in ((xml, "xml_sha256"), (bin_, "bin_sha256")):
        digest = file_sha256(path)
        if digest != record.get(key):
            raise WeightsError(
                f"{what} {path} is corrupt: SHA-256 {digest}, expected {record.get(key)}. {hint}"
            )
    return xml


def prepare(weights: Path, model: str) -> list[Path]:
    """Make ``<weights>.f32.xml``/``.bin``, ``<weights>.int8.xml``/``.bin`` and, for a model in
    :data:`KEEP_MIXED`, ``<weights>.mixed.xml``/``.bin``, and their records, unless verified ones
    are there."""
    weights_sha256 = verified_digest(weights, model)
    kinds: list[Arithmetic] = ["float32", "int8"]
    if model in KEEP_MIXED:
        kinds.append("mixed")
    made = [_prepare(weights, model, weights_sha256, kind) for kind in kinds]
    # The cascade's rule (``auto``) was measured for this int8 model: recorded beside it.
    from model.engines.cascade_rule import write_rule

    write_rule(weights, model, record_of(weights, "int8"))
    return made


def _prepare(weights: Path, model: str, weights_sha256: str, kind: Arithmetic) -> Path:
    try:
        return check(weights, model, weights_sha256, kind)
    except WeightsError as exc:
        log.info("%s; %s", exc.args[0].split(". ")[0], _KINDS[kind].verb)
    xml, _ = engine_files(weights, kind)
    made = _KINDS[kind]
    record: dict[str, Any] = {
        "format": made.format,
        "model": model,
        "weights_sha256": weights_sha256,
        made.made_by: made.versions(),
    }
    if kind == "float32":
        xml_sha256, bin_sha256 = to_float32(weights, model, xml)
    else:
        xml_sha256, bin_sha256 = to_int8(weights, model, xml, kind)
        record |= {
            "calibration_sha256": calibration_sha256(),
            "keep_float": _keep_float(model, kind),
            "made_on": instruction_set(),
        }
    record |= {"xml_sha256": xml_sha256, "bin_sha256": bin_sha256}
    path = record_file(weights, kind)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(record, indent=2) + "\n")
    part.replace(path)
    log.info("%s: wrote %s (SHA-256 %s, %s)", model, xml, xml_sha256, bin_sha256)
    return xml
