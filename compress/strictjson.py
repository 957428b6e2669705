"""Strict JSON: canonical encoding and validated decoding of untrusted JSON objects.

Manifests and signature lists (this package) and protocol message headers
(``edge_agent.protocol``) are JSON that arrives from the network. All of them go
through here so there is one definition of "strict":

* :func:`canonical_bytes` is the one byte encoding that is signed: keys sorted, no
  whitespace, UTF-8, no NaN or infinity. :func:`encode_canonical` and
  :func:`decode_canonical` apply it to documents (manifests, key sets, signature
  lists): decoding refuses every other spelling of the same content.
* :func:`loads_strict` parses bytes and rejects invalid UTF-8, duplicate keys, NaN and
  infinity constants, nesting deeper than a bound, and a top level that is not an
  object. Callers check sizes *before* calling it.
* The ``check_*`` functions validate one value and name its path in any error: type
  and range (``bool`` is not an ``int``; numbers are finite; strings are bounded and
  may have to match a pattern or be one of a few choices; lists and objects are
  bounded).
* :class:`FieldReader` applies them to the fields of a parsed object (manifest
  fields, message ``data``), to list elements (:meth:`FieldReader.each`) and to the
  values of objects used as mappings (:meth:`FieldReader.mapping`). Unknown keys are
  left alone, so newer senders can add fields.

Every function takes the error class to raise, so each package keeps its own tree;
size overruns may raise a second class (``over``), as the protocol's
``MessageTooLargeError`` does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

JsonObject = dict[str, Any]
T = TypeVar("T")

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


def encode_canonical(obj: Mapping[str, Any], error: type[Exception], *, what: str) -> bytes:
    """:func:`canonical_bytes`, with anything JSON cannot hold raised as ``error``.

    Raises:
        error: the object holds NaN, infinity, or a value JSON cannot represent.
    """
    try:
        return canonical_bytes(obj)
    except (TypeError, ValueError) as exc:
        raise error(f"{what} cannot be encoded: {exc}") from exc


def decode_canonical(
    data: bytes,
    error: type[Exception],
    *,
    what: str,
    max_bytes: int,
    build: Callable[[JsonObject], T],
    encode: Callable[[T], bytes],
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> T:
    """Decode a document that has exactly one byte encoding, and refuse any other.

    The size is checked first, then :func:`loads_strict` parses the bytes, ``build``
    turns the object into a value (validating it), and ``encode`` of that value must
    give back ``data`` byte for byte: so a signed document has one identity.

    Raises:
        error: too large, not strict JSON, or not in canonical form; and whatever
            ``build`` raises.
    """
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes, max is {max_bytes}")
    value = build(loads_strict(data, error, what=what, max_depth=max_depth))
    if encode(value) != data:
        raise error(f"{what} is not in canonical form")
    return value


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


MAX_INT64 = 2**63 - 1
"""The default upper bound of integer fields."""


def check_int(
    value: Any,
    path: str,
    error: type[Exception],
    *,
    lo: int = 0,
    hi: int = MAX_INT64,
    limit: int | None = None,
    over: type[Exception] | None = None,
) -> int:
    """An integer in ``[lo, hi]`` (bool is not one); above ``limit`` raises ``over``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{path}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise error(f"{path}: {value} is outside [{lo}, {hi}]")
    if limit is not None and value > limit:
        raise (over or error)(f"{path}: {value} exceeds the limit {limit}")
    return value


def check_number(
    value: Any,
    path: str,
    error: type[Exception],
    *,
    lo: float = 0.0,
    hi: float = math.inf,
    max_int: int | None = None,
) -> float:
    """A finite number in ``[lo, hi]``; an integer is accepted if within ``max_int``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{path}: expected a number, got {type(value).__name__}")
    if max_int is not None and isinstance(value, int) and abs(value) > max_int:
        raise error(f"{path}: integer too large for a number field")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise error(f"{path}: {value} is outside [{lo}, {hi}]")
    return number


def check_bool(value: Any, path: str, error: type[Exception]) -> bool:
    """A boolean."""
    if not isinstance(value, bool):
        raise error(f"{path}: expected true or false, got {type(value).__name__}")
    return value


def check_str(
    value: Any,
    path: str,
    error: type[Exception],
    *,
    max_len: int = 256,
    pattern: re.Pattern[str] | None = None,
    choices: tuple[str, ...] | None = None,
    over: type[Exception] | None = None,
) -> str:
    """A string of at most ``max_len`` characters, matching ``pattern`` or ``choices``.

    Free text (no pattern, no choices) that is too long raises ``over``; a string
    that must match is merely malformed when too long, and raises ``error``.
    """
    if not isinstance(value, str):
        raise error(f"{path}: expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        free = pattern is None and choices is None
        raise ((over or error) if free else error)(f"{path}: longer than {max_len} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise error(f"{path}: {value[:64]!r} does not match {pattern.pattern}")
    if choices is not None and value not in choices:
        raise error(f"{path}: {value[:64]!r} is not one of {', '.join(choices)}")
    return value


def check_list(
    value: Any,
    path: str,
    error: type[Exception],
    *,
    max_len: int,
    min_len: int = 0,
    over: type[Exception] | None = None,
) -> list[Any]:
    """A list of ``min_len`` to ``max_len`` elements; more than ``max_len`` raises ``over``."""
    if not isinstance(value, list):
        raise error(f"{path}: expected a list, got {type(value).__name__}")
    if len(value) > max_len:
        raise (over or error)(f"{path}: {len(value)} elements, more than {max_len}")
    if len(value) < min_len:
        raise error(f"{path}: fewer than {min_len} elements")
    return value


def check_object(
    value: Any,
    path: str,
    error: type[Exception],
    *,
    max_len: int | None = None,
    key_pattern: re.Pattern[str] | None = None,
    over: type[Exception] | None = None,
) -> dict[str, Any]:
    """An object of at most ``max_len`` entries (else ``over``), keys matching ``key_pattern``."""
    if not isinstance(value, dict):
        raise error(f"{path}: expected an object, got {type(value).__name__}")
    if max_len is not None and len(value) > max_len:
        raise (over or error)(f"{path}: {len(value)} entries, more than {max_len}")
    for key in value if key_pattern is not None else ():
        check_str(key, f"{path} key", error, pattern=key_pattern)
    return value


_MISSING = object()


class FieldReader:
    """Typed, bounded access to the fields of an untrusted JSON object.

    Each accessor applies the matching ``check_*`` function to the value under a key.
    ``error`` is raised for every problem except size overruns (too many elements
    or entries, free text too long, an integer over its ``limit``), which raise
    ``over`` (default: ``error``). ``max_int`` bounds integers everywhere (default:
    :data:`MAX_INT64` in integer fields, none in number fields).

    Example::

        r = FieldReader(obj, ManifestError, "manifest")
        name = r.text("name", pattern=NAME_RE, max_len=64)
        version = r.integer("version", lo=1)
    """

    def __init__(
        self,
        obj: Mapping[str, Any],
        error: type[Exception],
        path: str,
        *,
        over: type[Exception] | None = None,
        max_int: int | None = None,
    ) -> None:
        self._obj = obj
        self._error = error
        self._over = over or error
        self._max_int = max_int
        self._path = path

    def _at(self, key: str) -> str:
        return f"{self._path}.{key}"

    def _get(self, key: str, optional: bool) -> Any:
        value = self._obj.get(key, _MISSING)
        if value is _MISSING and not optional:
            raise self.fail(key, "missing")
        return value

    def _child(self, obj: Mapping[str, Any], path: str) -> FieldReader:
        return FieldReader(obj, self._error, path, over=self._over, max_int=self._max_int)

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
        return check_str(
            self._get(key, optional=False),
            self._at(key),
            self._error,
            max_len=max_len,
            pattern=pattern,
            choices=choices,
            over=self._over,
        )

    def opt_text(
        self, key: str, *, max_len: int = 256, pattern: re.Pattern[str] | None = None
    ) -> str | None:
        """An optional string (absent or null gives None)."""
        return None if self.raw(key) is None else self.text(key, max_len=max_len, pattern=pattern)

    def integer(
        self, key: str, *, lo: int = 0, hi: int | None = None, limit: int | None = None
    ) -> int:
        """A required integer in ``[lo, hi]``, ``hi`` defaulting to the largest allowed."""
        value = self._get(key, optional=False)
        top = hi if hi is not None else self._max_int or MAX_INT64
        return check_int(
            value, self._at(key), self._error, lo=lo, hi=top, limit=limit, over=self._over
        )

    def opt_integer(self, key: str, *, lo: int = 0, hi: int | None = None) -> int | None:
        """An optional integer in ``[lo, hi]`` (absent or null gives None)."""
        return None if self.raw(key) is None else self.integer(key, lo=lo, hi=hi)

    def number(self, key: str, *, lo: float = 0.0, hi: float = math.inf) -> float:
        """A required finite number in ``[lo, hi]``; integers are accepted."""
        return self.check_number(key, self._get(key, optional=False), lo, hi)

    def check_number(self, key: str, value: Any, lo: float, hi: float) -> float:
        """Validate one number found under ``key`` (used for list elements too)."""
        return check_number(value, self._at(key), self._error, lo=lo, hi=hi, max_int=self._max_int)

    def boolean(self, key: str) -> bool:
        """A required boolean."""
        return check_bool(self._get(key, optional=False), self._at(key), self._error)

    def items(
        self, key: str, *, max_len: int, min_len: int = 0, optional: bool = False
    ) -> list[Any]:
        """A list of ``min_len`` to ``max_len`` elements (absent and optional gives [])."""
        value = self._get(key, optional=optional)
        if value is _MISSING:
            return []
        return check_list(
            value, self._at(key), self._error, max_len=max_len, min_len=min_len, over=self._over
        )

    def each(
        self,
        key: str,
        read: Callable[[FieldReader, str], T],
        *,
        max_len: int,
        min_len: int = 0,
        optional: bool = False,
    ) -> list[T]:
        """Read each element of a bounded list as ``read(reader, "key[i]")``."""
        items = self.items(key, max_len=max_len, min_len=min_len, optional=optional)
        elements = self._child({f"{key}[{i}]": item for i, item in enumerate(items)}, self._path)
        return [read(elements, f"{key}[{i}]") for i in range(len(items))]

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
        return self.each(
            key,
            lambda r, k: r.text(k, max_len=max_item_len, pattern=pattern),
            max_len=max_len,
            optional=optional,
        )

    def obj(self, key: str, *, optional: bool = False) -> FieldReader | None:
        """A nested object as a reader (None when optional and absent or null)."""
        value = self._get(key, optional=optional)
        if value is _MISSING or (optional and value is None):
            return None
        return self.wrap(key, value)

    def req_obj(self, key: str) -> FieldReader:
        """A required nested object as a reader."""
        return self.wrap(key, self._get(key, optional=False))

    def mapping(
        self,
        key: str,
        read: Callable[[FieldReader, str], T],
        *,
        max_len: int,
        key_pattern: re.Pattern[str] | None = None,
    ) -> dict[str, T]:
        """A required object used as a mapping, each value read as ``read(reader, key)``."""
        value = self._get(key, optional=False)
        entries = self.wrap(key, value, max_len=max_len, key_pattern=key_pattern)
        return {name: read(entries, name) for name in value}

    def wrap(
        self,
        key: str,
        value: Any,
        *,
        max_len: int | None = None,
        key_pattern: re.Pattern[str] | None = None,
    ) -> FieldReader:
        """A reader for ``value`` found under ``key`` (an element of a list, say)."""
        path = self._at(key)
        checked = check_object(
            value, path, self._error, max_len=max_len, key_pattern=key_pattern, over=self._over
        )
        return self._child(checked, path)

    def keys(self) -> list[str]:
        """The object's keys."""
        return list(self._obj)

    def raw(self, key: str) -> Any:
        """The raw value under ``key`` (None if absent); the caller validates it."""
        return self._obj.get(key)

    def fail(self, key: str, problem: str) -> Exception:
        """An error of the reader's type about ``key``, for checks done by the caller."""
        return self._error(f"{self._at(key)}: {problem}")
