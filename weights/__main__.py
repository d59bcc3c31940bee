"""``python -m weights``: fetch, convert and verify weights files, and make the engines' model
files derived from them."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model.engines import prepare_engines
from model.weights import (
    SPECS,
    WeightsError,
    default_weights_dir,
    load_state_dict,
    strip_tensors,
)
from weights.convert import from_onnx, from_pth, save_weights
from weights.fetch import fetch, file_md5


def _parser() -> argparse.ArgumentParser:
    """The command's arguments: one subcommand each for fetch, convert, prepare, strip and
    verify."""
    parser = argparse.ArgumentParser(prog="python -m weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sorted(SPECS)

    p = sub.add_parser("fetch", help="download, verify and convert the released weights")
    p.add_argument(
        "models",
        nargs="*",
        choices=[*models, []],
        default=["u2net"],
        metavar="MODEL",
        help=f"one or more of {', '.join(models)} (default: u2net)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to keep them (default: $U2SERVE_WEIGHTS_DIR or ~/.cache/u2serve)",
    )
    p.add_argument("--force", action="store_true", help="download and convert again")

    p = sub.add_parser("convert", help="convert an official .pth (or a released .onnx) file")
    p.add_argument("source", type=Path)
    p.add_argument("--model", choices=models, required=True)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output .safetensors (default: <dir>/<model>.safetensors)",
    )

    p = sub.add_parser(
        "prepare", help="make the engines' model files for a weights file (e.g. <w>.mnn)"
    )
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--model", choices=models, required=True)

    p = sub.add_parser(
        "strip",
        help="keep a verified weights file's record alone, without its tensors (what a CPU "
        "host needs beside the engines' files: the CPU image's)",
    )
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--model", choices=models, required=True)

    p = sub.add_parser("verify", help="check weights files without loading a model")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--model", choices=models, required=True)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "fetch":
            for name in dict.fromkeys(args.models):
                fetch(name, args.dir or default_weights_dir(), force=args.force)
        elif args.command == "convert":
            out = args.out or default_weights_dir() / f"{args.model}.safetensors"
            if args.source.suffix == ".onnx":
                state = from_onnx(args.source, args.model)
            else:
                state = from_pth(args.source, args.model)
            digest = save_weights(
                state, out, args.model, source=args.source.name, source_md5=file_md5(args.source)
            )
            logging.getLogger("weights").info("wrote %s (tensors SHA-256 %s)", out, digest)
            prepare_engines(out, args.model)
        elif args.command == "prepare":
            for path in args.paths:
                prepare_engines(path, args.model)
        elif args.command == "strip":
            for path in args.paths:
                strip_tensors(path, args.model)
        else:
            for path in args.paths:
                load_state_dict(path, args.model)
                print(f"{path}: OK")
    except (WeightsError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
