"""Path and body templates for gateway-made calls: `/orders/{path.id}`, `{response.body.id}`, `{token}`.

A placeholder names a dotted path into a context of request, response, snapshot and path parameters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.\-]+)\}")
_TOKEN = re.compile(r"\{([^{}]*)\}|[{}]")
"""A `{...}` without braces inside, or a stray brace."""
_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
"""A placeholder's dotted name; everything it accepts `_PLACEHOLDER` renders."""
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A match path's parameter name: it becomes a regex group name."""
_MISSING = object()


class TemplateError(Exception):
    """A placeholder whose value is not in the context, or (at config load) a malformed template."""


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
    found = compile_path_pattern(template).fullmatch(path.rstrip("/") or "/")
    return None if found is None else found.groupdict()


@functools.lru_cache(maxsize=1024)
def compile_path_pattern(template: str) -> re.Pattern[str]:
    """A match path such as `/orders/{id}` as a regex; TemplateError says what is wrong with it."""
    if not template.startswith("/"):
        raise TemplateError(f"a match path must start with /, got {template!r}")
    seen: set[str] = set()
    for name in placeholders(template):
        if not _PARAM.fullmatch(name):
            raise TemplateError(
                f"{{{name}}} in a match path must be a simple name such as {{id}} "
                "(letters, digits and _, not starting with a digit)"
            )
        if name in seen:
            raise TemplateError(f"{{{name}}} appears twice in {template!r}; name each parameter once")
        seen.add(name)
    pattern = "".join(
        f"(?P<{part[1:-1]}>[^/]+)" if index % 2 else re.escape(part)
        for index, part in enumerate(re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", template))
    )
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TemplateError(f"{template!r} does not compile as a match path: {exc}") from None


def path_params(template: str) -> tuple[str, ...]:
    """The parameter names of a match path, in order; TemplateError if it is malformed."""
    return tuple(compile_path_pattern(template).groupindex)


def placeholders(template: str) -> list[str]:
    """The names of a string template's placeholders; TemplateError for a stray or malformed brace."""
    names = []
    for found in _TOKEN.finditer(template):
        if found.group(1) is None:
            raise TemplateError(
                f"stray {found.group()!r} at character {found.start() + 1} of {template!r}"
            )
        if not _NAME.fullmatch(found.group(1)):
            raise TemplateError(
                f"{found.group()!r} in {template!r} is not a placeholder "
                "(use {name} or {dotted.name}: letters, digits, _ and -)"
            )
        names.append(found.group(1))
    return names


def undo_names(params: Iterable[str], *, snapshot: bool) -> tuple[str, ...]:
    """What an undo template may name: the context `compensation.template_context` builds.

    `<name>` stands for one segment, `**` for any number (none too); `snapshot.*` only with a snapshot.
    """
    names = [f"path.{param}" for param in params]
    names += ["request.path", "request.body.**", "response.status", "response.headers.<name>"]
    names += ["response.body.**"]
    if snapshot:
        names += ["snapshot.status", "snapshot.body.**"]
    return tuple(names)


def check_template(template: Any, allowed: Iterable[str]) -> None:
    """Check a path or JSON body template at config load; TemplateError names the first bad placeholder.

    `allowed` holds names such as `token`, `response.headers.<name>` or `request.body.**`.
    """
    patterns = tuple(allowed)
    for where, text in _strings(template, ""):
        try:
            _check_names(text, patterns)
        except TemplateError as exc:
            raise TemplateError(f"at {where}: {exc}" if where else str(exc)) from None


def _strings(template: Any, where: str) -> Iterable[tuple[str, str]]:
    """Every string in a JSON template with where it is (`items.0.id`); keys are not templates."""
    if isinstance(template, str):
        yield where, template
    elif isinstance(template, dict):
        for key, value in template.items():
            yield from _strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(template, list):
        for index, value in enumerate(template):
            yield from _strings(value, f"{where}.{index}" if where else str(index))


def _check_names(text: str, patterns: tuple[str, ...]) -> None:
    for name in placeholders(text):
        if not any(_allows(pattern, name) for pattern in patterns):
            choices = ", ".join(f"{{{_describe(pattern)}}}" for pattern in patterns) or "none"
            raise TemplateError(f"{{{name}}} names nothing available here (allowed: {choices})")


def _allows(pattern: str, name: str) -> bool:
    wanted, parts = pattern.split("."), name.split(".")
    if wanted[-1] == "**":
        wanted.pop()
        parts = parts[: len(wanted)]
    return len(parts) == len(wanted) and all(map(_segment_allows, wanted, parts))


def _segment_allows(wanted: str, part: str) -> bool:
    """As `lookup` finds it: exactly or lower-cased; `<name>` is any one segment."""
    return wanted in (part, part.lower()) or (wanted.startswith("<") and wanted.endswith(">"))


def _describe(pattern: str) -> str:
    return pattern.replace(".**", "[.<field>...]")
