"""Extraction to JSON for the rule-based model: a few sentence patterns, regexes per field.

Questions look like ``Extract the name and age as JSON from: Alice is 30 years old and lives
in Paris.`` or ``Return a JSON object with the keys name, email from: ...``. The answer holds
the asked fields first (``null`` when not found, under the name the question used), then
any other field found in the text, e.g. ``{"name": "Alice", "age": 30, "city": "Paris"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

__all__ = ["FIELDS", "extract", "parse_request"]

_NAME = r"[A-Z][a-z'-]+(?: [A-Z][a-z'-]+)?"
_PLACE = r"[A-Z][a-z]+(?: [A-Z][a-z]+)*"
_ORG = r"[A-Z][\w&]*(?: [A-Z][\w&]*)*"
_STOP = r"at|in|for|from|who|and|with|living|based|since"
_JOB = rf"[a-z]+(?: (?!(?:{_STOP})\b)[a-z]+)?"

#: canonical field -> regexes tried in order (group 1 is the value).
_PATTERNS: dict[str, tuple[str, ...]] = {
    "name": (
        rf"\b(?:[Mm]y name is|[Nn]ame is|named|called)\s+({_NAME})",
        rf"\bName:\s*({_NAME})",
        rf"^(?:Meet\s+)?({_NAME})(?=\s*(?:,|\(|\b(?:is|was|has|works|lives|can|will|moved|joined)\b))",
    ),
    "age": (
        r"\b(\d{1,3})[- ]years?[- ]old\b",
        r"\b[Aa]ge[sd]?\s*(?:of\s*|:\s*|is\s*)?(\d{1,3})\b",
        r"\bI am (\d{1,3})\b",
        rf"^{_NAME},\s*(\d{{1,3}})\s*,",
    ),
    "city": (
        rf"\blives? in\s+({_PLACE})",
        rf"\b(?:based|located|living|resides|residing|moved to|lives) in\s+({_PLACE})",
        rf"\bCity:\s*({_PLACE})",
        rf"\bfrom\s+({_PLACE})",
        rf"\bin\s+({_PLACE})",
    ),
    "country": (
        rf"\b(?:in|from)\s+{_PLACE},\s*({_PLACE})",
        rf"\bCountry:\s*({_PLACE})",
    ),
    "job": (
        rf"\bworks as an?\s+({_JOB})",
        rf"\bis an?\s+({_JOB})(?=\s+(?:{_STOP})\b|[.,;]|$)",
        r"\b(?:Job|Occupation|Profession):\s*([A-Za-z]+(?: [a-z]+)?)",
    ),
    "company": (
        rf"\b(?:works|working|employed) (?:at|for|by)\s+({_ORG})",
        rf"\bat\s+({_ORG})",
        rf"\bCompany:\s*({_ORG})",
    ),
    "email": (r"([\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,})",),
    "phone": (r"(\+?\d[\d ()-]{6,}\d)",),
    "quantity": (r"\b(\d+)\s+[a-z]+(?=\s+(?:at|for|priced|costing|@))",
                 r"\bQuantity:\s*(\d+)"),
    "product": (r"\b\d+\s+([a-z]+)(?=\s+(?:at|for|priced|costing|@))",
                r"\bProduct:\s*([\w ]+?)(?=[.;,]|$)"),
    "price": (r"\$\s*(\d+(?:\.\d+)?)",
              r"\b(\d+(?:\.\d+)?)\s*(?:dollars|euros|usd|eur)\b",
              r"\bPrice:\s*(\d+(?:\.\d+)?)"),
}
_COMPILED = {field: tuple(re.compile(p, re.MULTILINE) for p in patterns)
             for field, patterns in _PATTERNS.items()}
_TYPES: dict[str, Callable[[str], object]] = {"age": int, "quantity": int, "price": float}

FIELDS = tuple(_PATTERNS)
"""Canonical fields the model can extract, in output order."""

#: words a question may use -> canonical field.
ALIASES = {
    "name": "name", "person": "name", "age": "age", "city": "city", "town": "city",
    "location": "city", "country": "country", "job": "job", "occupation": "job",
    "profession": "job", "role": "job", "company": "company", "employer": "company",
    "organization": "company", "email": "email", "mail": "email", "phone": "phone",
    "telephone": "phone", "quantity": "quantity", "qty": "quantity", "product": "product",
    "item": "product", "price": "price", "cost": "price",
}

_REQUEST_RES = (
    re.compile(r"\bextract\s+(?:the\s+)?(?P<fields>.+?)\s+(?:as|in|into)\s+(?:an?\s+)?json"
               r"(?:\s+object)?(?:\s+(?:from|for|of))?\s*:?\s*(?P<src>.*)",
               re.IGNORECASE | re.DOTALL),
    re.compile(r"\bjson(?:\s+object)?\s+with\s+(?:the\s+)?(?:keys|fields)\s+(?P<fields>.+?)"
               r"\s+(?:from|for|of)\s*:?\s*(?P<src>.*)", re.IGNORECASE | re.DOTALL),
)
_FILLER = {"the", "a", "an", "and", "their", "his", "her", "its", "person's", "fields",
           "keys", "values", "number", "address", "of"}


def parse_request(text: str) -> tuple[list[str], str] | None:
    """``(asked field words, source text)`` for an extraction question, else ``None``."""
    for pattern in _REQUEST_RES:
        match = pattern.search(text)
        if match:
            words = re.split(r"[\s,;/]+", match.group("fields").lower().replace("e-mail", "email"))
            fields = [w.strip("'\"") for w in words if w and w not in _FILLER]
            return fields, match.group("src").strip()
    return None


def _find(field: str, source: str) -> object:
    for pattern in _COMPILED[field]:
        match = pattern.search(source)
        if match:
            value = match.group(1).strip()
            convert = _TYPES.get(field)
            return convert(value) if convert else value
    return None


_SWAPS = {"name": ["Alice", "Bob", "Carol", "Dave"], "city": ["Paris", "London", "Berlin"],
          "country": ["France", "Spain", "Italy"], "job": ["teacher", "doctor", "engineer"]}


def _spoil(result: dict[str, object], asked: list[str]) -> None:
    """Change one asked field in a plausible way: a number off by one, another name."""
    keys = [k for k in asked if result.get(k) is not None] or list(result)
    for key in keys:
        value = result[key]
        if isinstance(value, (int, float)):
            result[key] = value + 1
            return
    for key in keys:
        value = result[key]
        if isinstance(value, str):
            pool = _SWAPS.get(ALIASES.get(key, key), [])
            result[key] = next((v for v in pool if v != value), value[::-1].capitalize())
            return
    if keys:
        result[keys[0]] = "unknown"


def extract(fields: list[str], source: str, *, wrong: bool = False) -> str:
    """The JSON answer: asked fields (under the asked names) then others found."""
    result: dict[str, object] = {}
    asked: list[str] = []
    covered: set[str] = set()
    for word in fields:
        canonical = ALIASES.get(word) or ALIASES.get(word.rstrip("s"))
        asked.append(word)
        result[word] = _find(canonical, source) if canonical else None
        if canonical:
            covered.add(canonical)
    for field in FIELDS:
        if field not in covered:
            value = _find(field, source)
            if value is not None:
                result[field] = value
    if wrong:
        _spoil(result, asked)
    return json.dumps(result, ensure_ascii=False)
