"""The base of every contract model, and parsing that names each problem in one line.

Contract models are strict (no "17" for 17, no true for 1), refuse unknown fields, accept only finite
numbers, and are frozen: data is checked once where it enters a process and trusted from then on.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)

# An error names at most this many problems, and shows at most this much of each bad value.
MAX_PROBLEMS = 5
MAX_VALUE_CHARS = 80


class ContractModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class ContractError(ValueError):
    """Data that does not fit its contract; the message names where and what, e.g.
    "describe request: regions.0.box: the box lies outside the image"."""


def parse(model: type[M], data: Any, what: str) -> M:
    """`data` as a `model`; ContractError naming every problem (the first MAX_PROBLEMS) otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = [_problem(entry, model) for entry in error.errors(include_url=False)]
        more = len(problems) - MAX_PROBLEMS
        text = "; ".join(problems[:MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
        raise ContractError(f"{what}: {text}") from None


def _problem(entry: dict, model: type[BaseModel]) -> str:
    where = ".".join(str(part) for part in entry["loc"])
    message = entry["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if entry["type"] == "extra_forbidden":
        known = _field_names(model, entry["loc"][:-1])
        if known:
            message = f"unknown field (known: {', '.join(known)})"
    if not where and entry["type"].endswith("_type"):  # the whole object has the wrong type
        shown = f" (got {type(entry.get('input')).__name__})"
    elif entry["type"] in ("missing", "extra_forbidden") or not where:  # nothing to show, or the whole object
        shown = ""
    else:
        value = repr(entry.get("input"))
        shown = f" (got {value[:MAX_VALUE_CHARS]}{'…' if len(value) > MAX_VALUE_CHARS else ''})"
    return f"{where}: {message}{shown}" if where else f"{message}{shown}"


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    """The fields of the model found at `path` inside `model` (list indices skipped); [] if none is."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            args = [a for c in candidates for a in getattr(c, "__args__", ())]
            nested = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            return []
        model = nested
    return [field.alias or name for name, field in model.model_fields.items()]
