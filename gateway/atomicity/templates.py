"""Path and body templates for gateway-made calls: `/orders/{path.id}`, `{response.body.id}`, `{token}`.

A placeholder names a dotted path into a context of request, response, snapshot and path parameters.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.\-]+)\}")
_MISSING = object()


class TemplateError(Exception):
    """A placeholder whose value is not in the context (e.g. the response had no such field)."""


def lookup(context: dict[str, Any], dotted: str) -> Any:
    value: Any = context
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part, value.get(part.lower(), _MISSING))
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = _MISSING
        if value is _MISSING:
            raise TemplateError(f"{{{dotted}}} is not available")
    return value


def render_path(template: str, context: dict[str, Any]) -> str:
    """Substitute placeholders, each percent-encoded as one path segment."""
    return _PLACEHOLDER.sub(lambda m: quote(str(lookup(context, m.group(1))), safe=""), template)


def render_body(template: Any, context: dict[str, Any]) -> Any:
    """Render a JSON body template; a string that is exactly one placeholder keeps the value's type."""
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template)
        if whole:
            return lookup(context, whole.group(1))
        return _PLACEHOLDER.sub(lambda m: str(lookup(context, m.group(1))), template)
    if isinstance(template, dict):
        return {key: render_body(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [render_body(value, context) for value in template]
    return template


def match_path(template: str, path: str) -> dict[str, str] | None:
    """Match `/orders/{id}` against a concrete path; returns the parameters or None."""
    pattern = "".join(
        f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") and part.endswith("}") else re.escape(part)
        for part in re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", template)
    )
    found = re.fullmatch(pattern, path.rstrip("/") or "/")
    return None if found is None else found.groupdict()
