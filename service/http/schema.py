"""The OpenAPI document of the routes that :class:`service.http.app.App` answers itself
(``POST /segment``, remove.bg's and rembg's APIs), generated from what already says it once:
each parameter from its pydantic model (:class:`~service.params.SegmentParams`, the compat APIs'
own) or its type, each JSON answer from the type of what its writer builds, and around them a
small declaration of each answer (status, description, media types, example, headers).

Those routes are declared out of FastAPI's document (``include_in_schema=False``): what they take
follows the settings (the loaded models, URL input), where FastAPI documents a route the same in
every app that includes it. :func:`document` writes their operations into each app's document,
in the routes' order; FastAPI keeps writing the rest (the probes, ``/metrics``).

A schema is pydantic's, with three changes that make it read as a document (:func:`_clean`): no
``title`` (pydantic's is the field's name again, "Bg Color" for ``bg_color``), definitions
inlined where they are used (no answer's type is recursive), and no ``null`` default (a
parameter left out is ``None``). A choice of one value is an ``enum`` of one, as of two or more,
where pydantic writes a ``const``: the page builds its menus from ``enum``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi.routing import APIRoute
from pydantic import BaseModel, HttpUrl, TypeAdapter, UrlConstraints
from starlette.routing import BaseRoute

from service.url.fetch import MAX_URL_LENGTH

__all__ = [
    "Answer",
    "Body",
    "Errors",
    "Fields",
    "Media",
    "Offer",
    "Operation",
    "Param",
    "Url",
    "choice",
    "document",
    "param",
    "params",
    "responses",
    "schema_of",
]

JsonSchema = dict[str, Any]
# An http(s) URL that the service fetches (service.url.fetch refuses a longer one).
Url = Annotated[HttpUrl, UrlConstraints(max_length=MAX_URL_LENGTH)]

# Keywords whose values are data, not schemas: left as they are.
_DATA = frozenset({"default", "enum", "const", "example", "examples"})


def _clean(node: Any, defs: Mapping[str, Any]) -> Any:
    """pydantic's JSON Schema as the document writes it (the module's docstring says how)."""
    if isinstance(node, list):
        return [_clean(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rpartition("/")[2]]
        return _clean({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    out: JsonSchema = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _clean(prop, defs) for name, prop in value.items()}
        elif key == "const" and "enum" not in node:
            out["enum"] = [value]
        elif key in _DATA:
            out[key] = value
        else:
            out[key] = _clean(value, defs)
    return out


def schema_of(kind: Any) -> JsonSchema:
    """The JSON Schema of a type (a model, a ``TypedDict``, ``Annotated[str, Field(...)]``)."""
    raw = TypeAdapter(kind).json_schema()
    cleaned: JsonSchema = _clean(raw, raw.get("$defs", {}))
    return cleaned


@dataclass(frozen=True)
class Offer:
    """What a service's settings put in its document: the models it loaded (the first its
    default), and whether it fetches images by URL."""

    models: Sequence[str]
    url_input: bool


@dataclass(frozen=True)
class Param:
    """A parameter, a form's field or an answer's header: its schema is made from a type
    (:func:`param`) or a parameter model's field (:func:`params`), never written out."""

    name: str
    schema: Mapping[str, Any]
    description: str = ""
    required: bool = False


def param(name: str, kind: Any, description: str = "", *, required: bool = False) -> Param:
    """A parameter (a field, a header) of type ``kind``."""
    return Param(name, schema_of(kind), description, required)


def params(model: type[BaseModel], *, omit: Collection[str] = ()) -> list[Param]:
    """A parameter model's fields, in its order, but those in ``omit``."""
    doc = schema_of(model)
    required = set(doc.get("required", ()))
    return [
        Param(
            name,
            {k: v for k, v in prop.items() if k != "description"},
            prop.get("description", ""),
            name in required,
        )
        for name, prop in doc["properties"].items()
        if name not in omit
    ]


def choice(p: Param, values: Sequence[str]) -> Param:
    """``p`` narrowed to ``values``, the first its default: a ``model`` of the loaded ones."""
    return Param(p.name, schema_of(Literal[tuple(values)]) | {"default": values[0]}, p.description)


@dataclass(frozen=True)
class Media:
    """A body of one media type: its schema (None: any bytes of that type) and an example."""

    schema: Mapping[str, Any] | None = None
    example: Any = None


@dataclass(frozen=True)
class Fields:
    """A form's fields (multipart, form-encoded, or a JSON object's): no others; ``required``,
    and exactly one of ``one_of`` where it names any."""

    fields: Sequence[Param]
    required: Sequence[str] = ()
    one_of: Sequence[str] = ()


@dataclass(frozen=True)
class Body:
    """A request's body, by media type."""

    content: Mapping[str, Fields | Media]
    description: str = ""
    required: bool = True


@dataclass(frozen=True)
class Answer:
    """One status of an operation: what it means, its bodies by media type, its headers."""

    description: str
    content: Mapping[str, Media] = field(default_factory=dict)
    headers: Sequence[Param] = ()


@dataclass(frozen=True)
class Errors:
    """An API's error body, which every error answer of its operations is (JSON)."""

    schema: Mapping[str, Any]
    example: Any = None

    def __call__(self, description: str) -> Answer:
        """An error answer that means ``description``."""
        return Answer(description, {"application/json": Media(self.schema, self.example)})


@dataclass(frozen=True)
class Operation:
    """A method on a path, as the document describes it."""

    method: Literal["get", "post"]
    path: str
    operation_id: str
    summary: str
    answers: Mapping[int, Answer]
    tags: Sequence[str] = ()
    description: str = ""
    query: Sequence[Param] = ()
    headers: Sequence[Param] = ()
    body: Body | None = None


# -- writing the document -------------------------------------------------------------------------


def _parameter(p: Param, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "in": where, "required": p.required}
    if p.description:
        out["description"] = p.description
    return out | {"schema": copy.deepcopy(dict(p.schema))}


def _property(p: Param) -> JsonSchema:
    prop = copy.deepcopy(dict(p.schema))
    if p.description:
        prop["description"] = p.description
    return prop


def _form(form: Fields) -> JsonSchema:
    out: JsonSchema = {"type": "object", "additionalProperties": False}
    out["properties"] = {p.name: _property(p) for p in form.fields}
    # Exactly one of one is that one, required.
    required = [*form.required, *(form.one_of if len(form.one_of) == 1 else ())]
    if required:
        out["required"] = required
    if len(form.one_of) > 1:
        out["oneOf"] = [{"required": [name]} for name in form.one_of]
    return out


def _media(media: Media) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if media.schema is not None:
        out["schema"] = copy.deepcopy(dict(media.schema))
    if media.example is not None:
        out["example"] = copy.deepcopy(media.example)
    return out


def _answer(answer: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    if answer.headers:
        out["headers"] = {
            h.name: {"description": h.description, "schema": copy.deepcopy(dict(h.schema))}
            for h in answer.headers
        }
    if answer.content:
        out["content"] = {kind: _media(m) for kind, m in answer.content.items()}
    return out


def responses(answers: Mapping[int, Answer]) -> dict[int | str, dict[str, Any]]:
    """``answers`` as FastAPI's ``responses`` of a route it documents itself."""
    return {status: _answer(answer) for status, answer in sorted(answers.items())}


def _body(body: Body) -> dict[str, Any]:
    out: dict[str, Any] = {"required": body.required}
    if body.description:
        out["description"] = body.description
    out["content"] = {
        kind: {"schema": _form(spec)} if isinstance(spec, Fields) else _media(spec)
        for kind, spec in body.content.items()
    }
    return out


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if op.tags:
        out["tags"] = list(op.tags)
    out["summary"] = op.summary
    if op.description:
        out["description"] = op.description
    out["operationId"] = op.operation_id
    parameters = [
        *(_parameter(p, "query") for p in op.query),
        *(_parameter(p, "header") for p in op.headers),
    ]
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = _body(op.body)
    out["responses"] = {str(status): _answer(a) for status, a in sorted(op.answers.items())}
    return out


def document(
    schema: dict[str, Any], routes: Iterable[BaseRoute], operations: Iterable[Operation]
) -> dict[str, Any]:
    """FastAPI's ``schema`` with ``operations`` written in, each under one of ``routes`` (a
    route that serves it must be there); their paths in the routes' order, as FastAPI orders
    its own, and any other path of FastAPI's after them."""
    api_routes = [r for r in routes if isinstance(r, APIRoute)]
    served = {(r.path, method.lower()) for r in api_routes for method in r.methods or ()}
    ours: dict[str, dict[str, Any]] = {}
    for op in operations:
        if (op.path, op.method) not in served:
            raise ValueError(f"{op.method.upper()} {op.path} is documented but not routed")
        ours.setdefault(op.path, {})[op.method] = _operation(op)
    paths: dict[str, Any] = {}
    for route in api_routes:
        item = {**schema["paths"].get(route.path, {}), **ours.get(route.path, {})}
        if item:
            paths[route.path] = item
    paths |= {path: item for path, item in schema["paths"].items() if path not in paths}
    return schema | {"paths": paths}
