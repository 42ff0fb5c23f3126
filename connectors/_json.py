"""JSON for the sinks that write it: orjson, with pydantic models nested in other values."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["json_default"]


def json_default(value: Any) -> Any:
    """orjson's ``default=``: a pydantic model as ``model_dump(mode="json")`` gives it."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
