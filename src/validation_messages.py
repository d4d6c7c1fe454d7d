"""Pydantic validation errors as one line a user can act on: the key, the value, what is allowed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def describe_error(error: dict[str, Any], raw: Any, root: type[BaseModel]) -> str:
    """One pydantic error of `root.model_validate(raw)` as `key = value: what is wrong (allowed: ...)`."""
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "literal_error" and error["loc"][-1:] == ("[key]",):  # a dict key outside its Literal
        allowed = str(error.get("ctx", {}).get("expected", "")).replace("'", "")
        return f"unknown key '{key.removesuffix('.[key]')}'" + (f"; allowed here: {allowed}" if allowed else "")
    if error["type"] == "extra_forbidden":
        section = _lookup_section(root, error["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        return f"unknown key '{key}'" + (f"; allowed here: {allowed}" if allowed else "")
    value = _lookup(raw, error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] in _BOUND_ERRORS:
        section = _lookup_section(root, error["loc"][:-1])
        field = section.model_fields.get(str(error["loc"][-1])) if section else None
        if field is not None:
            msg += f" (allowed: {_allowed_range(field.metadata)})"
    return f"{key} = {value!r}: {msg}"


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _allowed_range(metadata: list[Any]) -> str:
    """`Field(gt=0, lt=1)` -> '0 < value < 1', `Field(gt=0)` -> 'value > 0', for messages."""
    low = high = None
    for m in metadata:
        for attr, op in (("gt", "<"), ("ge", "<=")):
            if getattr(m, attr, None) is not None:
                low = (getattr(m, attr), op)
        for attr, op in (("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                high = (op, getattr(m, attr))
    if low and high:
        return f"{low[0]} {low[1]} value {high[0]} {high[1]}"
    if low:
        return f"value {low[1].replace('<', '>')} {low[0]}"
    return f"value {high[0]} {high[1]}" if high else "see params.yaml"


def _lookup_section(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return raw
