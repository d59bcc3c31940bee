"""``multipart/form-data`` bodies (RFC 7578), parsed in one pass over the bytes already read.

The body is in memory already (read within the byte limit, ``service/http/upload.py``), so its parts
are found with ``bytes.find``, in C, and the image part is one slice of it: no parser callback per
chunk, no spooled temporary file (Starlette's form parser rolls a file part over 1 MiB to disk
and reads it back through a thread). Part headers are read with python-multipart's own
``parse_options_header``, as Starlette reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

__all__ = ["MalformedMultipart", "Part", "boundary_of", "parse_multipart"]

_CRLF = b"\r\n"


class MalformedMultipart(ValueError):
    """The body is not a well-formed multipart body; the message says where."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # present (even empty) for a file part
    data: bytes


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise MalformedMultipart("the content type has no boundary (1 to 200 characters)")
    return boundary


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(_CRLF) if block else ():
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise MalformedMultipart(f"a part header is not 'Name: value': {line[:80]!r}")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


def _part(headers: dict[str, str], data: bytes) -> Part:
    disposition, options = parse_options_header(headers.get("content-disposition", ""))
    if disposition.lower() != b"form-data":
        raise MalformedMultipart("a part has no 'Content-Disposition: form-data' header")
    name = options.get(b"name")
    if name is None:
        raise MalformedMultipart("a part's Content-Disposition has no name")
    filename = options.get(b"filename")
    return Part(
        name.decode("utf-8", "replace"),
        None if filename is None else filename.decode("utf-8", "replace"),
        data,
    )


def parse_multipart(body: bytes, boundary: bytes, *, max_parts: int) -> list[Part]:
    """Every part of ``body``, in order; at most ``max_parts`` of them."""
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble, ignored, ends with a line break before the first delimiter
        found = body.find(_CRLF + delimiter)
        if found < 0:
            raise MalformedMultipart("the body does not begin with its boundary")
        pos = found + 2 + len(delimiter)
    separator = _CRLF + delimiter
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter; what follows is an epilogue
        line_end = body.find(_CRLF, pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise MalformedMultipart("a boundary is not followed by a line break")
        start = line_end + 2
        if body.startswith(_CRLF, start):
            block, content = b"", start + 2  # a part without headers
        else:
            head_end = body.find(_CRLF + _CRLF, start)
            if head_end < 0:
                raise MalformedMultipart("a part's headers do not end")
            block, content = body[start:head_end], head_end + 4
        end = body.find(separator, content)
        if end < 0:
            raise MalformedMultipart("the body ends before its closing boundary")
        if len(parts) == max_parts:
            raise MalformedMultipart(f"more than {max_parts} parts")
        parts.append(_part(_headers(block), body[content:end]))
        pos = end + len(separator)
