"""schemathesis hooks for tests/test_openapi.py: what the tool cannot know about the service."""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.generation.meta import CoverageScenario

# A form's field is text, which the service reads into its declared type as it reads a query
# parameter (pydantic's rules, as FastAPI's and so rembg's): 0, 1, true and false are booleans.
# schemathesis knows it of the query and the path, and takes a form's 0 for a boolean as a value
# of the wrong type.
_BOOLEAN_TEXT = frozenset({"0", "1", "true", "false"})


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Drop "schema-violating request accepted" where the violation is a form's boolean field
    sent as text the service reads as a boolean; keep every other failure."""
    if not isinstance(failure, AcceptedNegativeData) or not isinstance(case.body, dict):
        return True
    data = case.meta.phase.data if case.meta is not None else None
    scenario = getattr(data, "scenario", None)
    field = re.fullmatch(r"/properties/([^/]+)/type", getattr(data, "location", None) or "")
    if scenario != CoverageScenario.INCORRECT_TYPE or field is None or field[1] not in case.body:
        return True
    body = case.operation.definition.raw.get("requestBody", {})
    media = body.get("content", {}).get(case.media_type or "", {})
    prop = media.get("schema", {}).get("properties", {}).get(field[1], {})
    return not (prop.get("type") == "boolean" and str(case.body[field[1]]).lower() in _BOOLEAN_TEXT)
