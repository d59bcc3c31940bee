"""``service/http/multipart.py`` against python-multipart's parser (the one Starlette runs), on the
bodies clients send, and its refusals of bodies that are not multipart."""

from __future__ import annotations

import httpx
import pytest
from python_multipart.multipart import MultipartParser, parse_options_header

from service.http.multipart import MalformedMultipart, boundary_of, parse_multipart


def reference(body: bytes, boundary: bytes) -> list[tuple[str, str | None, bytes]]:
    """The parts as python-multipart's callbacks report them."""
    parts: list[tuple[str, str | None, bytes]] = []
    state: dict[str, object] = {}

    def on_part_begin() -> None:
        state.update(headers={}, data=bytearray(), field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] = bytes(state["field"]) + data[start:end]  # type: ignore[operator, arg-type]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] = bytes(state["value"]) + data[start:end]  # type: ignore[operator, arg-type]

    def on_header_end() -> None:
        headers: dict[bytes, bytes] = state["headers"]  # type: ignore[assignment]
        headers[bytes(state["field"]).lower()] = bytes(state["value"])  # type: ignore[arg-type]
        state.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]  # type: ignore[operator]

    def on_part_end() -> None:
        headers: dict[bytes, bytes] = state["headers"]  # type: ignore[assignment]
        _, options = parse_options_header(headers[b"content-disposition"])
        filename = options.get(b"filename")
        parts.append(
            (
                options[b"name"].decode(),
                None if filename is None else filename.decode(),
                bytes(state["data"]),  # type: ignore[arg-type]
            )
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    parser.write(body)
    parser.finalize()
    return parts


def encoded(data: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, bytes]:
    """A body as httpx sends it; with fields alone (which httpx would form-encode), as a
    browser's form with no file sends them."""
    if files:
        request = httpx.Request("POST", "http://t/segment", data=data, files=files)
        return request.read(), boundary_of(request.headers["content-type"])
    boundary = b"----formboundary7MA4YWxkTrZu0gW"
    body = b"".join(
        b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (boundary, k.encode(), v.encode())
        for k, v in data.items()
    )
    return body + b"--%s--\r\n" % boundary, boundary


PHOTO = bytes(range(256)) * 300 + b"\r\n--not-the-boundary\r\n" + b"\r\n" * 3


@pytest.mark.parametrize(
    ("data", "files"),
    [
        ({}, {"image": ("photo.jpg", PHOTO, "image/jpeg")}),
        ({"output": "cutout", "bg_color": "#ffffff"}, {"image": ("p", PHOTO, "image/png")}),
        ({"url": "https://example.com/a.jpg", "output": "mask"}, {}),
        ({"image_id": "a" * 22, "crop_margin": "10%"}, {}),
        ({"note": "été ☃"}, {"image": ('we"ird né.jpg', b"", "application/octet-stream")}),
    ],
)
def test_the_parts_are_python_multiparts(
    data: dict[str, str], files: dict[str, tuple[str, bytes, str]]
) -> None:
    body, boundary = encoded(data, files)
    ours = [(p.name, p.filename, p.data) for p in parse_multipart(body, boundary, max_parts=24)]
    assert ours == reference(body, boundary)


def test_a_preamble_and_an_epilogue_are_ignored() -> None:
    body, boundary = encoded({"output": "mask"}, {"image": ("p.jpg", PHOTO, "image/jpeg")})
    framed = b"a preamble\r\n" + body + b"\r\nan epilogue"
    parts = parse_multipart(framed, boundary, max_parts=24)
    assert [(p.name, p.data) for p in parts] == [("output", b"mask"), ("image", PHOTO)]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "does not begin with its boundary"),
        (b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\nvalue", "closing boundary"),
        (b"--b\r\nContent-Disposition: form-data; name=x\r\nvalue--b--", "headers do not end"),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nv\r\n--b--", "no name"),
        (b"--b\r\nContent-Type: text/plain\r\n\r\nv\r\n--b--", "Content-Disposition"),
        (b"--b\r\nno colon here\r\n\r\nv\r\n--b--", "'Name: value'"),
        (b"--bjunk\r\n\r\nv\r\n--b--", "line break"),
        (b"--b\r\n\r\nv\r\n--b--", "Content-Disposition"),
    ],
)
def test_what_is_not_multipart_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(MalformedMultipart, match=why):
        parse_multipart(body, b"b", max_parts=24)


def test_parts_beyond_the_most_are_refused() -> None:
    body, boundary = encoded({f"f{i}": "x" for i in range(5)}, {})
    assert len(parse_multipart(body, boundary, max_parts=5)) == 5
    with pytest.raises(MalformedMultipart, match="more than 4 parts"):
        parse_multipart(body, boundary, max_parts=4)


@pytest.mark.parametrize("ctype", ["multipart/form-data", "multipart/form-data; boundary="])
def test_a_content_type_without_a_boundary_is_refused(ctype: str) -> None:
    with pytest.raises(MalformedMultipart, match="no boundary"):
        boundary_of(ctype)
