"""Parsing ``APP_GROUP[/FUNCTION[/INSTANCE]]`` targets: the multi-tenant list is data, not code."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from opensearch_tasks.settings import KNOWN_FUNCTIONS


class TargetError(ValueError):
    """A target string that cannot be parsed; the message says what a valid one looks like."""


@dataclass(frozen=True)
class TargetSpec:
    app_group: str
    function_name: str | None = None
    instance_name: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.app_group, self.function_name, self.instance_name) if p)


def parse_target(text: str) -> TargetSpec:
    """``app/ctr/ctr_v2`` -> TargetSpec. A ``/`` inside a name is written ``%2F``."""
    raw = str(text).strip()
    parts = raw.split("/")
    if not raw or len(parts) > 3 or any(not p.strip() for p in parts):
        raise TargetError(
            f"invalid target {text!r}: expected APP_GROUP[/FUNCTION[/INSTANCE]] "
            "(write a '/' inside a name as %2F)"
        )
    names = [unquote(p.strip()) for p in parts]
    if any(name in (".", "..") for name in names):
        raise TargetError(f"invalid target {text!r}: '.' and '..' cannot be sent as names in a URL path")
    if len(names) >= 2 and names[1] not in KNOWN_FUNCTIONS:
        raise TargetError(
            f"invalid target {text!r}: unknown function {names[1]!r}; "
            f"expected one of {', '.join(KNOWN_FUNCTIONS)}"
        )
    return TargetSpec(*names)


def parse_targets(texts: Iterable[str] | str) -> list[TargetSpec]:
    if isinstance(texts, str):
        texts = [t for t in texts.replace(",", " ").split() if t]
    specs = [parse_target(t) for t in texts]
    if not specs:
        raise TargetError("no targets: pass --target APP_GROUP[/FUNCTION[/INSTANCE]]")
    return list(dict.fromkeys(specs))
