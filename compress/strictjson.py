"""Strict JSON: canonical encoding and validated decoding of untrusted JSON objects.

Manifests (this package) and protocol headers (``edge_agent.protocol``) are JSON that
arrives from the network. Both go through here so there is one definition of "strict":

* :func:`canonical_bytes` is the one byte encoding that is signed: keys sorted, no
  whitespace, UTF-8, no NaN or infinity.
* :func:`loads_strict` parses bytes and rejects invalid UTF-8, duplicate keys, NaN and
  infinity constants, nesting deeper than a bound, and a top level that is not an
  object. Callers check sizes *before* calling it.
* :class:`FieldReader` reads typed fields out of the parsed object: each accessor checks
  type and range (``bool`` is not an ``int``; floats are finite; strings are bounded and
  may have to match a pattern) and raises the caller's error type with the field's
  path in the message. Unknown keys are left alone, so newer senders can add fields.

Every function takes the error class to raise, so each package keeps its own tree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

JsonObject = dict[str, Any]

DEFAULT_MAX_DEPTH = 16


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The canonical encoding of a JSON object (sorted keys, compact, UTF-8).

    Raises:
        ValueError: the object holds NaN or infinity.
        TypeError: the object holds something JSON cannot represent.
    """
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


_MAX_INT_DIGITS = 40
# Tokens that matter for nesting depth: a string literal (its closing quote optional,
# so a match never fails and is never retried from a later quote: one linear pass)
# or a bracket. Everything else is skipped.
_DEPTH_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def check_depth(text: str, error: type[Exception], *, what: str, max_depth: int) -> None:
    """Reject JSON text whose brackets (outside strings) nest deeper than ``max_depth``.

    Runs in one linear pass whatever the text, before any recursive parser sees it.

    Raises:
        error: the text nests too deeply.
    """
    depth = 0
    for match in _DEPTH_TOKEN_RE.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > max_depth:
                raise error(f"{what} nests deeper than {max_depth} levels")
        elif token in ("]", "}"):
            depth -= 1


def loads_strict(
    data: bytes, error: type[Exception], *, what: str, max_depth: int = DEFAULT_MAX_DEPTH
) -> JsonObject:
    """Parse ``data`` as exactly one JSON object, strictly.

    Rejected: invalid UTF-8; nesting deeper than ``max_depth`` (counted on the raw text
    in one linear pass, before the recursive parser runs, so no input can exhaust the
    stack); anything but one object spanning all of ``data`` (no surrounding
    whitespace or trailing data); duplicate keys; ``NaN``/``Infinity`` constants and
    literals that overflow to infinity; integer literals over 40 digits; lone UTF-16
    surrogates in keys or strings (they could never be re-encoded).

    Args:
        data: the raw bytes; their size must already have been checked.
        error: the exception class to raise.
        what: a name for messages ("manifest", "header").
        max_depth: the deepest nesting accepted.

    Raises:
        error: for every reason above, with ``what`` in the message.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 at byte {exc.start}") from None
    check_depth(text, error, what=what, max_depth=max_depth)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
        obj: JsonObject = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"duplicate key {key[:80]!r} in {what}")
            obj[key] = value
        return obj

    def no_constants(name: str) -> Any:
        raise error(f"non-finite number {name} in {what}")

    def finite_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise error(f"number {literal[:40]} in {what} overflows to infinity")
        return value

    def bounded_int(literal: str) -> int:
        if len(literal.lstrip("-")) > _MAX_INT_DIGITS:
            raise error(f"integer literal longer than {_MAX_INT_DIGITS} digits in {what}")
        return int(literal)

    decoder = json.JSONDecoder(
        object_pairs_hook=no_duplicates,
        parse_constant=no_constants,
        parse_float=finite_float,
        parse_int=bounded_int,
        strict=True,
    )
    try:
        value, end = decoder.raw_decode(text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, error):
            raise
        # JSONDecodeError is a ValueError; RecursionError is a second line of defence.
        raise error(f"{what} is not valid JSON: {exc}") from None
    if end != len(text):
        raise error(f"trailing data after the {what} object")
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON object, got {type(value).__name__}")
    _check_strings(value, error, what)
    return value


def _check_strings(value: Any, error: type[Exception], what: str) -> None:
    """Reject lone surrogates (from ``\\ud800``-style escapes) in keys and strings."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        texts: list[str] = []
        if isinstance(item, str):
            texts = [item]
        elif isinstance(item, dict):
            texts = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise error(f"lone surrogate in a {what} string") from None


_MISSING = object()


class FieldReader:
    """Typed, bounded access to the fields of an untrusted JSON object.

    Example::

        r = FieldReader(obj, ManifestError, "manifest")
        name = r.text("name", pattern=NAME_RE, max_len=64)
        version = r.integer("version", lo=1)
    """

    def __init__(self, obj: Mapping[str, Any], error: type[Exception], path: str) -> None:
        self._obj = obj
        self._error = error
        self._path = path

    def _fail(self, key: str, problem: str) -> Exception:
        return self._error(f"{self._path}.{key}: {problem}")

    def _get(self, key: str, optional: bool) -> Any:
        value = self._obj.get(key, _MISSING)
        if value is _MISSING and not optional:
            raise self._fail(key, "missing")
        return value

    def has(self, key: str) -> bool:
        """True if ``key`` is present (even if null)."""
        return key in self._obj

    def text(
        self,
        key: str,
        *,
        max_len: int = 256,
        pattern: re.Pattern[str] | None = None,
        choices: tuple[str, ...] | None = None,
    ) -> str:
        """A required string, bounded, optionally matching ``pattern`` or ``choices``."""
        value = self._get(key, optional=False)
        return self._check_str(key, value, max_len, pattern, choices)

    def opt_text(
        self, key: str, *, max_len: int = 256, pattern: re.Pattern[str] | None = None
    ) -> str | None:
        """An optional string (absent or null gives None)."""
        value = self._get(key, optional=True)
        if value is _MISSING or value is None:
            return None
        return self._check_str(key, value, max_len, pattern, None)

    def _check_str(
        self,
        key: str,
        value: Any,
        max_len: int,
        pattern: re.Pattern[str] | None,
        choices: tuple[str, ...] | None,
    ) -> str:
        if not isinstance(value, str):
            raise self._fail(key, f"expected a string, got {type(value).__name__}")
        if len(value) > max_len:
            raise self._fail(key, f"longer than {max_len} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise self._fail(key, f"{value[:64]!r} does not match {pattern.pattern}")
        if choices is not None and value not in choices:
            raise self._fail(key, f"{value[:64]!r} is not one of {', '.join(choices)}")
        return value

    def integer(self, key: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int:
        """A required integer in ``[lo, hi]`` (booleans are rejected)."""
        value = self._get(key, optional=False)
        return self._check_int(key, value, lo, hi)

    def opt_integer(self, key: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int | None:
        """An optional integer in ``[lo, hi]``."""
        value = self._get(key, optional=True)
        if value is _MISSING or value is None:
            return None
        return self._check_int(key, value, lo, hi)

    def _check_int(self, key: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self._fail(key, f"{value} is outside [{lo}, {hi}]")
        return value

    def number(self, key: str, *, lo: float = -math.inf, hi: float = math.inf) -> float:
        """A required finite number in ``[lo, hi]``; integers are accepted."""
        value = self._get(key, optional=False)
        return self.check_number(key, value, lo, hi)

    def opt_number(self, key: str, *, lo: float = -math.inf, hi: float = math.inf) -> float | None:
        """An optional finite number in ``[lo, hi]`` (absent or null gives None)."""
        value = self._get(key, optional=True)
        if value is _MISSING or value is None:
            return None
        return self.check_number(key, value, lo, hi)

    def check_number(self, key: str, value: Any, lo: float, hi: float) -> float:
        """Validate one number found under ``key`` (used for list elements too)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"expected a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number) or not lo <= number <= hi:
            raise self._fail(key, f"{value} is outside [{lo}, {hi}]")
        return number

    def boolean(self, key: str) -> bool:
        """A required boolean."""
        value = self._get(key, optional=False)
        if not isinstance(value, bool):
            raise self._fail(key, f"expected true or false, got {type(value).__name__}")
        return value

    def items(self, key: str, *, max_len: int, optional: bool = False) -> list[Any]:
        """A list of at most ``max_len`` elements (absent and optional gives [])."""
        value = self._get(key, optional=optional)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            raise self._fail(key, f"expected a list, got {type(value).__name__}")
        if len(value) > max_len:
            raise self._fail(key, f"more than {max_len} elements")
        return value

    def texts(
        self,
        key: str,
        *,
        max_len: int,
        max_item_len: int = 256,
        pattern: re.Pattern[str] | None = None,
        optional: bool = False,
    ) -> list[str]:
        """A bounded list of bounded strings."""
        items = self.items(key, max_len=max_len, optional=optional)
        return [
            self._check_str(f"{key}[{i}]", item, max_item_len, pattern, None)
            for i, item in enumerate(items)
        ]

    def obj(self, key: str, *, optional: bool = False) -> FieldReader | None:
        """A nested object as a reader (None when optional and absent or null)."""
        value = self._get(key, optional=optional)
        if value is _MISSING or (optional and value is None):
            return None
        return self.wrap(key, value)

    def req_obj(self, key: str) -> FieldReader:
        """A required nested object as a reader."""
        reader = self.obj(key)
        assert reader is not None  # obj() raises for a missing required key
        return reader

    def wrap(self, key: str, value: Any) -> FieldReader:
        """A reader for ``value`` found under ``key`` (an element of a list, say)."""
        if not isinstance(value, dict):
            raise self._fail(key, f"expected an object, got {type(value).__name__}")
        return FieldReader(value, self._error, f"{self._path}.{key}")

    def keys(self) -> list[str]:
        """The object's keys."""
        return list(self._obj)

    def raw(self, key: str) -> Any:
        """The raw value under ``key`` (None if absent); the caller validates it."""
        return self._obj.get(key)

    def fail(self, key: str, problem: str) -> Exception:
        """An error of the reader's type about ``key``, for checks done by the caller."""
        return self._fail(key, problem)
