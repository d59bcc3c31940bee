"""The ``u2serve`` command: ``serve`` (the HTTP service), ``fetch`` (the weights) and ``segment``
(files and folders, in-process or sent to a running service with ``--server``, with a progress
bar).

``segment``'s options are generated from ``SegmentParams`` (the parameters of ``POST /segment``)
and from the model settings, so a parameter or setting added there appears here by itself, with
the same validation; a flag wins over its ``U2SERVE_*`` variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Union, get_args, get_origin

from pydantic import ValidationError

from service.errors import InvalidParameter
from service.params import SegmentParams, parse_params
from service.settings import Settings

if TYPE_CHECKING:
    from u2serve.folder import Step

__all__ = ["main"]

log = logging.getLogger("u2serve")

# The settings that choose and run the model in-process, offered as flags when they exist.
_SETTING_FLAGS = (
    "model",
    "precision",
    "engine",
    "weights",
    "weights_dir",
    "device",
    "require_gpu",
    "dtype",
    "channels_last",
    "max_batch_size",
    "threads",
    "codec_threads",
    "max_pixels",
    "cache_map_bytes",
    "log_level",
)
# What a --server run still reads of the settings: the model it asks for, and its own logging.
_REMOTE_SETTINGS = frozenset({"model", "log_level"})
# Exit statuses beyond 0/1/2: interrupted by the user, like a shell's 128 + SIGINT.
_INTERRUPTED = 130


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _option(
    parser: argparse._ActionsContainer, name: str, dest: str, annotation: Any, help: str
) -> None:
    kind = _unwrap(annotation)
    # argparse formats help with %: a literal one (e.g. "10%") must be doubled.
    kwargs: dict[str, Any] = {"dest": dest, "default": None, "help": help.replace("%", "%%")}
    if get_origin(kind) is Literal:
        kwargs["choices"] = [str(c) for c in get_args(kind)]
    elif kind is bool:
        # --flag / --no-flag; a value after it would swallow the INPUT that follows.
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["metavar"] = name.upper()
    parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _describe(schema: dict[str, Any]) -> str:
    bits = [schema.get("description", "")]
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None or hi is not None:
        bits.append(f"in [{'' if lo is None else lo}, {'' if hi is None else hi}]")
    if schema.get("default") is not None:
        bits.append(f"default: {json.dumps(schema['default'])}")
    return "; ".join(b for b in bits if b)


def _param_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parameters, as for POST /segment")
    schema = SegmentParams.model_json_schema()["properties"]
    for name, info in SegmentParams.model_fields.items():
        _option(group, name, f"param_{name}", info.annotation, _describe(schema.get(name, {})))


def _setting_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each flag wins over its U2SERVE_* variable)")
    schema = Settings.model_json_schema()["properties"]
    for name in _SETTING_FLAGS:
        info = Settings.model_fields.get(name)
        if info is None:
            continue
        text = _describe({k: v for k, v in schema.get(name, {}).items() if k != "default"})
        env = f"U2SERVE_{name.upper()}"
        help = f"{text}; overrides ${env}" if text else f"overrides ${env}"
        _option(group, name, f"setting_{name}", info.annotation, help)


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser, and ``segment``'s (whose usage its errors print)."""
    parser = argparse.ArgumentParser(
        prog="u2serve",
        description="U²-Net salient-object segmentation: the HTTP service, its weights, and "
        "folders of photos in-process.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the HTTP service (as `python -m service`)", add_help=False)
    sub.add_parser("fetch", help="fetch and verify weights (as `python -m weights fetch`)")
    p = sub.add_parser(
        "segment",
        help="segment image files and folders, in-process or by a running service",
        description="Segment image files and folders with the model in-process, or with "
        "--server by a running service; outputs are what POST /segment answers for the same "
        "parameters. Files already done are skipped.",
        allow_abbrev=False,
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument(
        "-o",
        "--out-dir",
        type=Path,
        required=True,
        help="where outputs go; a folder's images keep their relative paths there",
    )
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders")
    p.add_argument("--overwrite", action="store_true", help="redo files whose output exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    remote = p.add_argument_group("a running service instead of the model in-process")
    remote.add_argument(
        "--server",
        metavar="URL",
        help="send the photos to the service at URL (e.g. http://gpu-host:8000), which runs "
        "them with its own model settings; --model asks for one of its models; its API key, if "
        "it has one, from $U2SERVE_API_KEY",
    )
    remote.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="with --server: requests in flight (default: twice the service's batch size, at "
        "least 4)",
    )
    _param_options(p)
    _setting_options(p)
    return parser, p


def _given(args: argparse.Namespace, prefix: str, names: Iterable[str]) -> dict[str, str]:
    """The options given on the command line, as the strings an environment or query has."""
    given = {}
    for name in names:
        value = getattr(args, prefix + name, None)
        if value is not None:
            given[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return given


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    overrides = _given(args, "setting_", _SETTING_FLAGS)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "_".join(str(x) for x in err["loc"])
            where = f"--{name.replace('_', '-')}" if name in overrides else ""
            where += (" / " if where else "") + f"U2SERVE_{name.upper()}"
            problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        parser.error("invalid setting " + "; ".join(problems))


def _params(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SegmentParams:
    try:
        return parse_params(_given(args, "param_", SegmentParams.model_fields))
    except InvalidParameter as exc:
        parser.error(exc.message)


def _interrupt(signum: int, frame: types.FrameType | None) -> NoReturn:
    """SIGTERM stops a run as Ctrl-C does."""
    raise KeyboardInterrupt


def _step(
    args: argparse.Namespace, parser: argparse.ArgumentParser, settings: Settings
) -> Step | None:
    """The run's per-image step: the service at ``--server``, or the model loaded here (None
    with the reason printed when it cannot be loaded)."""
    if args.server is not None:
        from u2serve import Client
        from u2serve.folder import Remote

        model = settings.model if "model" in settings.model_fields_set else None
        key = settings.api_key.get_secret_value() if settings.api_key else None
        try:
            client = Client(args.server, key)
        except ValueError as exc:
            parser.error(f"--server: {exc}")
        return Remote(client, args.concurrency, model)

    from model.weights import WeightsError
    from service.core.cache.memory import MemoryMapCache
    from service.core.service import batch_size, load_segmenter
    from u2serve.folder import InProcess

    try:
        segmenter = load_segmenter(settings)
    except (WeightsError, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return InProcess(
        segmenter,
        max_pixels=settings.max_pixels,
        batch_size=batch_size(settings, segmenter),
        threads=settings.codec_threads,
        cache=MemoryMapCache(settings.cache_map_bytes),
    )


def _check_remote(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """With --server the service's settings decide how its model runs: such flags are refused
    rather than silently ignored."""
    if args.server is None:
        if args.concurrency is not None:
            parser.error("--concurrency: only with --server")
        return
    local = sorted(set(_given(args, "setting_", _SETTING_FLAGS)) - _REMOTE_SETTINGS)
    if local:
        flags = ", ".join("--" + name.replace("_", "-") for name in local)
        parser.error(
            f"{flags}: how the model runs here; with --server the service's settings decide"
        )
    if args.concurrency is not None and args.concurrency < 1:
        parser.error(f"--concurrency: at least 1, not {args.concurrency}")


def _segment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from u2serve.errors import U2ServeError
    from u2serve.folder import Summary, outstanding, plan, segment_files

    params = _params(args, parser)
    _check_remote(args, parser)
    settings = _settings(args, parser)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level != "debug":
        # httpx reports every request of a --server run at INFO: the bar would drown in them.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in Settings.unknown_variables(os.environ):
        log.warning("%s is not a setting and is ignored", name)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    summary = Summary()
    step, status = None, 0
    try:
        tasks = plan(args.inputs, args.out_dir, recursive=args.recursive, summary=summary)
        todo = outstanding(tasks, params, summary, overwrite=args.overwrite)
        for path, reason in summary.failed:
            print(f"failed: {path}: {reason}", file=sys.stderr)
        if todo:
            step = _step(args, parser, settings)
            if step is None:
                return 1
            try:
                segment_files(step, todo, params, summary, progress=not args.quiet)
            except U2ServeError as exc:  # the service's refusal of the whole run
                print(f"error: {exc}", file=sys.stderr)
                status = 1
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if step is not None:
            step.close()
    print(summary.line(), file=sys.stderr)
    if summary.interrupted:
        return _INTERRUPTED
    return 1 if summary.failed else status


def main(argv: list[str] | None = None) -> int:
    """``u2serve``; returns the exit status: 0, 1 if anything failed, 2 for bad usage, 130 if
    interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # serve and fetch are the existing commands, their arguments passed through unchanged.
    if argv[:1] == ["serve"]:
        from service.__main__ import main as serve

        return serve(argv[1:])
    if argv[:1] == ["fetch"]:
        from weights.__main__ import main as weights

        return weights(["fetch", *argv[1:]])
    parser, segment = _parsers()
    args = parser.parse_args(argv)
    return _segment(args, segment)


if __name__ == "__main__":
    sys.exit(main())
