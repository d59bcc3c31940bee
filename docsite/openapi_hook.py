"""MkDocs hook: the OpenAPI document and its Swagger UI page, made at build time from the app's
own schema (``create_app(...).openapi()``, which loads no model), never copied by hand.

The page embeds the document, so it also works opened from disk, and uses Swagger UI's files as
``fastapi-offline`` ships them (what ``/docs`` serves), so nothing comes from a CDN. Swagger UI's
"Try it out" is off: a static site has no service behind it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

__all__ = ["FOLDER", "on_files", "openapi_document"]

# Where the reference lies in the site, beside the page that links to it (docs/http/openapi.md).
FOLDER = "http/openapi"
# The models the document lists for `model`: both, as a service started with
# U2SERVE_MODELS=u2net,u2netp lists them.
MODELS = "u2net,u2netp"

_SWAGGER_ASSETS = Path(str(package_files("fastapi_offline") / "static"))

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>u2serve – OpenAPI reference</title>
<link rel="icon" href="favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="swagger-ui-bundle.js"></script>
<script>
SwaggerUIBundle({
  spec: %(spec)s,
  dom_id: "#swagger-ui",
  deepLinking: true,
  supportedSubmitMethods: [],
  validatorUrl: null
});
</script>
</body>
</html>
"""


@contextmanager
def _without_service_environment() -> Iterator[None]:
    """The document is the defaults', whatever ``U2SERVE_*`` variables the builder has set."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("U2SERVE_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def openapi_document() -> dict[str, Any]:
    """The schema a service with the default settings and both models serves at
    ``/openapi.json``."""
    from service.http.app import create_app
    from service.settings import Settings

    with _without_service_environment():
        settings = Settings(models=MODELS)
    return create_app(settings).openapi()


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the document, its page and Swagger UI's files to the site, so that links to them are
    checked like any page's."""
    spec = openapi_document()
    text = json.dumps(spec, indent=2, ensure_ascii=False) + "\n"
    # `<` escaped so that no string of the document can close the script element.
    inline = json.dumps(spec, ensure_ascii=False).replace("<", "\\u003c")
    files.append(File.generated(config, f"{FOLDER}/openapi.json", content=text))
    files.append(File.generated(config, f"{FOLDER}/index.html", content=_PAGE % {"spec": inline}))
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        src = str(_SWAGGER_ASSETS / name)
        files.append(File.generated(config, f"{FOLDER}/{name}", abs_src_path=src))
    favicon = str(package_files("service.http") / "static" / "favicon.svg")
    files.append(File.generated(config, f"{FOLDER}/favicon.svg", abs_src_path=favicon))
    return files
