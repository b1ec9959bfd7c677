"""Reading the project's YAML files with errors that name the file and the line.

Booleans follow YAML 1.2 (only ``true``/``false``): under YAML 1.1 a
category value ``no`` or ``yes`` in a schema would silently turn into a
boolean. Validation errors from pydantic are mapped back through the YAML node
tree to the line that holds the bad value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from consortium.errors import ConsortiumError

Model = TypeVar("Model", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a 1-based line number."""
    line = None if node is None else node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
        if node is None:
            return line
        line = node.start_mark.line + 1
    return line


def read_text(path: str | Path, error: type[ConsortiumError], what: str) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} '{p}' does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} '{p}' ({exc}): check its permissions and encoding") from None


def duplicates(values: list[str]) -> list[str]:
    """The values that appear more than once, sorted: for validators of names that must be unique."""
    return sorted({v for v in values if values.count(v) > 1})


def parse_yaml(text: str, source: str, error: type[ConsortiumError]) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the plain data of a YAML text."""
    try:
        return yaml.compose(text, Loader=_Loader), yaml.load(text, Loader=_Loader)  # noqa: S506 (safe loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source} line {mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}: malformed YAML ({problem}): fix the syntax there") from None


def validate(
    model: type[Model],
    raw: Any,
    tree: yaml.Node | None,
    source: str,
    error: type[ConsortiumError],
    fix: str,
    default_loc: tuple[Any, ...] = (),
) -> Model:
    """``model.model_validate(raw)``; the first problem becomes ``error`` naming line, field and bad value."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"]) or default_loc
        field = ".".join(str(part) for part in loc) or "top level"
        msg = err["msg"].removeprefix("Value error, ")
        found = f" (found {err['input']!r})" if loc and not isinstance(err.get("input"), (dict, list)) else ""
        raise error(f"{source} line {line_of(tree, loc)}: {field}: {msg}{found}: {fix}") from None
