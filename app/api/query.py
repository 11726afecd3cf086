"""Query parameters shared by the FastAPI routes and the fast path, declared once.

A route's signature takes ``Annotated[int, TOP_K.query()] = TOP_K.default``; the fast path
parses the same parameter with ``TOP_K.parse(params)``: the same name, default, bounds and
message either way, and the OpenAPI document describes both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import Query

from app.serving.errors import InvalidParameter
from app.serving.request_rules import MAX_K

TRUE = {"true", "1", "yes", "on", "t", "y"}
FALSE = {"false", "0", "no", "off", "f", "n"}
# what the OpenAPI document's "integer" means: ASCII digits (int() would also take "1_0", " 5"
# and non-ASCII digits)
INTEGER = re.compile(r"[+-]?[0-9]+")


def _last(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


@dataclass(frozen=True, slots=True)
class IntParam:
    name: str
    default: int
    minimum: int
    maximum: int | None
    description: str

    def query(self) -> Any:
        return Query(ge=self.minimum, le=self.maximum, description=self.description)

    def parse(self, params: dict[str, list[str]]) -> int:
        raw = _last(params, self.name)
        if raw is None:
            return self.default
        if not INTEGER.fullmatch(raw):
            raise InvalidParameter(f"{self.name}: Input should be a valid integer")
        value = int(raw)
        if value < self.minimum:
            raise InvalidParameter(f"{self.name}: Input should be greater than or equal to "
                                   f"{self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidParameter(f"{self.name}: Input should be less than or equal to "
                                   f"{self.maximum}")
        return value


@dataclass(frozen=True, slots=True)
class BoolParam:
    name: str
    default: bool
    description: str

    def query(self) -> Any:
        return Query(description=self.description)

    def parse(self, params: dict[str, list[str]]) -> bool:
        raw = _last(params, self.name)
        if raw is None:
            return self.default
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise InvalidParameter(f"{self.name}: Input should be a valid boolean")


TOP_K = IntParam("top_k", 5, 1, None, "labels per image (1..classes)")
EMBEDDING = BoolParam("embedding", False, "add each image's feature vector")
EXPLAIN = BoolParam("explain", False, "add each image's class activation map of its top label "
                    "(cam: label, width, height, values row-major in [0, 1], over the input)")
NORMALIZE = BoolParam("normalize", False, "scale each vector to unit length")
K = IntParam("k", 10, 1, MAX_K, f"neighbours per image (1..{MAX_K})")
