"""One declarative schema per config file, and everything derived from it.

A config file (the agent's ``agent.toml``, the coordinator service's
``coordinator.toml``) is described once, as a :class:`Schema`: its :class:`Section`
tables, and in each the :class:`Key` entries with their name, how a value is read
from the file, default, help text, example value and the command-line flag that
overrides it. Everything else is derived from that description, so a key exists in
exactly one place:

* the set of known keys, and the "did you mean" hint for an unknown one;
* reading a source (the file, or the flags) into dotted keys with paths made
  absolute (:meth:`Schema.merge`), a flag beating the file and the file beating the
  default, and the message for a missing required key;
* the flag of each key (:meth:`Schema.flags`), which the command lines use to name
  the source of a bad value, and how they declare it (:meth:`Key.flag_type`,
  :meth:`Key.flag_help`, :attr:`Key.repeatable`);
* the defaults of the typed config dataclasses (:meth:`Schema.default`);
* the commented example file (:meth:`Schema.render_example`), shipped as package
  data and written out by ``fedge-agent init`` and ``fedge coordinator init``.

Workflow of a config module (:mod:`edge_agent.config.agent`,
:mod:`coordinator.service.config`):

1. :func:`load_config_file` reads the TOML file (a regular file of at most
   :data:`MAX_CONFIG_BYTES`) into a dict; syntax errors name the file and the line.
2. :meth:`Schema.merge` checks both sources against the schema and merges them into
   :class:`Sources`: merged values by dotted key, each remembering the file or flag
   it came from (:meth:`Sources.where` prefixes messages with it).
3. The config module builds its frozen dataclasses from :meth:`Sources.section` and
   :meth:`Sources.get`; the dataclasses check every value (the typed readers of
   :mod:`edge_agent.config.values`) and raise ``FieldError`` naming the key, which
   the module prefixes with :meth:`Sources.where`.

The example files are generated and checked in (a test fails when one differs from
its schema). After changing a schema, regenerate them with::

    python -m edge_agent.config.schema --write
    python -m edge_agent.config.schema --write coordinator.service.config_schema:SERVICE_SCHEMA

(``--check`` instead of ``--write`` reports a stale file with exit status 1.) The
first names no schema and means ``edge_agent.config.agent_schema:AGENT_SCHEMA``.
"""

from __future__ import annotations

import difflib
import importlib
import re
import textwrap
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from compress.fileio import read_bounded
from edge_agent.config.values import FieldError, kind_of, to_array, to_path
from edge_agent.errors import ConfigError

__all__ = [
    "MAX_CONFIG_BYTES",
    "Key",
    "Reader",
    "Schema",
    "Section",
    "Sources",
    "load_config_file",
    "toml_value",
]

MAX_CONFIG_BYTES = 1024 * 1024
"""Largest config file :func:`load_config_file` reads."""

WIDTH = 88
"""Longest line of a rendered example file."""

_SENTENCE_END = re.compile(r"(?<=\S)\.(?:\s|$)")

Reader = Literal["value", "path", "paths", "array"]
"""How a key's value is read from a source before the config dataclasses check it:
``value`` as it is, ``path`` as an absolute :class:`~pathlib.Path` (relative to the
file's directory, or to the working directory for a flag), ``paths`` as a tuple of
them, ``array`` as a tuple of its items."""


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a config file.

    Attributes:
        name: The key's name inside its section (``keepalive_s``).
        help: What it does, for the example file (wrapped there; a blank line
            separates paragraphs). The default or "Required." is appended.
        default: The value when no source gives one; the config dataclasses take
            their defaults from here.
        default_doc: How the example file states the default, when the value alone
            does not say it (``"the system's CAs"``); ``""`` states none.
        example: The value shown in the example file; None shows the default.
        commented: Show the example line commented out (an optional key whose
            example is not the default).
        required: A source must give it (checked by :meth:`Sources.require`).
        read: How a value is read from a source (see :data:`Reader`).
        flag: The command-line flag that overrides it, or None.
        metavar: What the flag takes, for messages (``PATH``).
    """

    name: str
    help: str
    default: Any = None
    default_doc: str | None = None
    example: Any = None
    commented: bool = False
    required: bool = False
    read: Reader = "value"
    flag: str | None = None
    metavar: str = ""

    def summary(self) -> str:
        """The help's first sentence and the default."""
        first = _SENTENCE_END.split(self.help.strip(), maxsplit=1)[0]
        return f"{first}.{_default_sentence(self)}"

    # The command lines (``fedge-agent run``, ``fedge coordinator serve``) declare the
    # flag of a key from these three, so a flag is described only here.

    @property
    def repeatable(self) -> bool:
        """Its flag may be given more than once, the values making a list."""
        return self.read in ("paths", "array")

    def flag_type(self) -> type:
        """The type of one value of its flag.

        :class:`~pathlib.Path` for a path, the default's type for a number, ``bool``
        for a switch (a flag that takes no value), else ``str``.
        """
        if self.read in ("path", "paths"):
            return Path
        if isinstance(self.default, bool | int | float):
            return type(self.default)
        return str

    def flag_help(self) -> str:
        """Its flag's ``--help`` line: the :meth:`summary`, and whether it repeats."""
        note = " Repeatable; replaces the file's list." if self.repeatable else ""
        return f"{self.summary()}{note}"


@dataclass(frozen=True, slots=True)
class Section:
    """One table of a config file (``name`` ``""``: the keys above the first table).

    Attributes:
        name: The table's name.
        keys: Its keys, in the example file's order.
        help: A paragraph under the table's header in the example file, or ``""``.
    """

    name: str
    keys: tuple[Key, ...]
    help: str = ""


@dataclass(frozen=True, slots=True)
class Schema:
    """The description of one config file.

    Attributes:
        title: The example file's opening comment (wrapped, ``# `` prepended).
        sections: The top-level keys (the section named ``""``) and the tables.
        example_package: The package that ships the example file.
        example_name: The example file's name in that package.
        replace_together: Groups of dotted keys an override replaces as a whole: a
            flag giving any key of a group drops the file's values of all of them
            (a password source, a choice of broker).
        keys: Every key by its dotted name (``broker.url``), in the file's order;
            derived from ``sections``.

    Raises:
        ValueError: a key or a flag declared twice.
    """

    title: str
    sections: tuple[Section, ...]
    example_package: str
    example_name: str
    replace_together: tuple[tuple[str, ...], ...] = ()
    keys: dict[str, Key] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = {_dotted(s.name, k.name): k for s in self.sections for k in s.keys}
        flags = [k.flag for k in keys.values() if k.flag]
        if len(keys) != sum(len(s.keys) for s in self.sections) or len(set(flags)) != len(flags):
            raise ValueError("a schema declares each key, and each flag, once")
        object.__setattr__(self, "keys", keys)

    # ------------------------------------------------------------------ derived facts

    def default(self, key: str) -> Any:
        """The default of a dotted key (for a dataclass field's default)."""
        return self.keys[key].default

    def flags(self) -> dict[str, str]:
        """``{dotted key: flag}`` of every key a flag overrides."""
        return {name: key.flag for name, key in self.keys.items() if key.flag}

    def _section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def _hint(self, section: str, name: str) -> str:
        """What an unknown key ``name`` in ``section`` was probably meant to be."""
        homes = [s.name for s in self.sections if s.name != section and _has(s, name)]
        if homes:
            home = homes[0]
            move = f"put it under [{home}]" if home else "move it above the first [section] header"
            return f" (did you mean {_dotted(home, name)}? {move})"
        here = self._section(section)
        candidates = [k.name for k in here.keys] if here is not None else []
        if not section:
            candidates += [s.name for s in self.sections if s.name]
        close = difflib.get_close_matches(name, candidates, n=1)
        if close:
            return f" (did you mean {_dotted(section, close[0])}?)"
        return f" (known keys: {', '.join(_dotted(section, c) for c in candidates)})"

    # ------------------------------------------------------------------ reading

    def flatten(
        self, values: Mapping[str, Any], label: Callable[[str], str], base: Path
    ) -> dict[str, Any]:
        """One source as ``{dotted key: value}``, each value read as its key says.

        Args:
            values: The source in the file's layout (top-level keys and tables).
            label: Names the source of a dotted key in messages.
            base: Directory relative paths are relative to.

        Raises:
            ConfigError: an unknown key (with a hint), a table that is not one, or a
                value its reader refuses; the message starts with ``label(key)``.
        """
        flat: dict[str, Any] = {}
        for name, value in values.items():
            table = self._section(name) if name else None
            if table is not None:
                if not isinstance(value, Mapping):
                    raise FieldError(
                        name, f"{label(name)}: [{name}] must be a table, got {kind_of(value)}"
                    )
                entries = [(name, sub, item) for sub, item in value.items()]
            else:
                entries = [("", name, value)]
            for section, sub, item in entries:
                dotted = _dotted(section, sub)
                if dotted not in self.keys:
                    raise FieldError(
                        dotted,
                        f"{label(dotted)}: unknown key {dotted}{self._hint(section, sub)}",
                    )
                try:
                    flat[dotted] = _read(self.keys[dotted].read, dotted, item, base)
                except FieldError as exc:
                    raise FieldError(dotted, f"{label(dotted)}: {exc}") from None
        return flat

    def merge(
        self,
        file_values: Mapping[str, Any],
        overrides: Mapping[str, Any],
        *,
        base_dir: Path,
        file_label: str | None = None,
        override_labels: Mapping[str, str] | None = None,
    ) -> Sources:
        """Check a file's values and the overrides, and merge them (an override wins).

        Args:
            file_values: The file's contents (:func:`load_config_file`), or ``{}``.
            overrides: Values from the command line and the environment, in the
                file's layout.
            base_dir: Directory relative paths in ``file_values`` are relative to;
                those in ``overrides`` are relative to the working directory.
            file_label: How to name the file in messages (its path); None without one.
            override_labels: How to name each override, by dotted key
                (``{"broker.url": "--broker"}``); unnamed ones are "override".

        Returns:
            The merged values, each remembering its source.

        Raises:
            ConfigError: an unknown key, a table that is not one, or a value its
                reader refuses (a path that is not a non-empty string, ...).
        """
        flags = dict(override_labels or {})
        file_name = file_label or "config file"

        def flag(key: str) -> str:
            return flags.get(key, "override")

        from_file = self.flatten(file_values, lambda _key: file_name, Path(base_dir))
        from_flags = self.flatten(overrides, flag, Path.cwd())
        for group in self.replace_together:
            if any(key in from_flags for key in group):
                for key in group:
                    from_file.pop(key, None)
        origins = dict.fromkeys(from_file, file_name)
        origins.update({key: flag(key) for key in from_flags})
        return Sources(self, {**from_file, **from_flags}, origins, file_label, flags)

    # ------------------------------------------------------------------ the example file

    def render_example(self) -> str:
        """The commented example file: every key, what it does, its default.

        Each key is a paragraph: its help (with the default or "Required.") as
        ``#`` comments, then ``name = example`` (commented out when the key says so).
        """
        lines = _comment(self.title)
        for section in self.sections:
            if section.name:
                lines += ["", f"[{section.name}]"]
                if section.help:
                    lines += [*_comment(section.help), ""]
            for index, key in enumerate(section.keys):
                if index or not section.name:
                    lines.append("")
                lines += _comment(f"{key.help}{_default_sentence(key)}")
                value = key.example if key.example is not None else key.default
                lines.append(f"{'# ' if key.commented else ''}{key.name} = {toml_value(value)}")
        return "\n".join(lines) + "\n"

    def example_text(self) -> str:
        """The example file as shipped in :attr:`example_package` (what ``init`` writes)."""
        from importlib import resources  # noqa: PLC0415 - only init reads it; agent RSS

        return (resources.files(self.example_package) / self.example_name).read_text("utf-8")

    def example_path(self) -> Path:
        """Where the shipped example file is in the source tree (for ``--write``)."""
        from importlib import resources  # noqa: PLC0415 - as above

        return Path(str(resources.files(self.example_package) / self.example_name))


class Sources:
    """A config's merged values, remembering the file or flag each came from.

    Args:
        schema: The schema the values were checked against.
        values: Merged values by dotted key (paths already absolute).
        origins: The label of each value's source, by dotted key.
        file_label: How the file is named in messages, or None without one.
        flags: The label (flag) of each override, by dotted key.
    """

    def __init__(
        self,
        schema: Schema,
        values: dict[str, Any],
        origins: dict[str, str],
        file_label: str | None,
        flags: dict[str, str],
    ) -> None:
        self.schema = schema
        self.values = values
        self.origins = origins
        self.file_label = file_label
        self.flags = flags

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str) -> Any:
        """The value of a dotted key, or its default from the schema."""
        return self.values.get(key, self.schema.keys[key].default)

    def where(self, key: str | None) -> str:
        """``"<file or flag>: "`` for a key some source gave, else ``""``.

        ``trust.keys[0]`` is named by the source of ``trust.keys``.
        """
        origin = self.origins.get((key or "").partition("[")[0])
        return f"{origin}: " if origin else ""

    def require(self, key: str) -> Any:
        """The value of a required key.

        Raises:
            FieldError: no source gave it; the message says how to.
        """
        if key in self.values:
            return self.values[key]
        ways = []
        if key in self.flags:
            ways.append(f"pass {self.flags[key]} {self.schema.keys[key].metavar}".rstrip())
        ways.append(f"set {key} in {self.file_label or 'a config file (--config)'}")
        raise FieldError(key, f"missing {key}: {' or '.join(ways)}")

    def section(self, name: str, *, skip: Sequence[str] = ()) -> dict[str, Any]:
        """The given values of one table, by their names in it (``skip``: names left out)."""
        return {
            key.partition(".")[2]: value
            for key, value in self.values.items()
            if key.startswith(f"{name}.") and key.partition(".")[2] not in skip
        }


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a config file (TOML).

    Args:
        path: The file; a regular file of at most :data:`MAX_CONFIG_BYTES`.

    Returns:
        The parsed tables, unchecked (hand them to :meth:`Schema.merge`).

    Raises:
        ConfigError: the file is missing, not a regular file, unreadable, too large,
            not UTF-8, or not valid TOML (the message names the file and the line).
    """
    path = Path(path)
    data = read_bounded(path, max_bytes=MAX_CONFIG_BYTES, error=ConfigError, what="config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message reads "Invalid value (at line 3, column 7)".
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def toml_value(value: object) -> str:
    """A value as TOML: strings, paths, booleans, numbers and arrays of them.

    A float with an integral value is written as an integer (``1``, not ``1.0``):
    every seconds or number key of the schemas accepts one.

    Raises:
        TypeError: a value of another type.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list | tuple):
        return f"[{', '.join(toml_value(item) for item in value)}]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _dotted(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _has(section: Section, name: str) -> bool:
    return any(key.name == name for key in section.keys)


def _read(reader: Reader, key: str, value: object, base: Path) -> object:
    if reader == "path":
        return to_path(key, value, base)
    if reader == "paths":
        items = enumerate(to_array(key, value))
        return tuple(to_path(f"{key}[{i}]", item, base) for i, item in items)
    if reader == "array":
        return tuple(to_array(key, value))
    return value


def _default_sentence(key: Key) -> str:
    if key.required:
        return " Required."
    if key.default_doc is not None:
        return f" Default: {key.default_doc}." if key.default_doc else ""
    if key.default is None or key.default in ((), ""):
        return " Default: none."
    return f" Default: {toml_value(key.default)}."


def _comment(text: str) -> list[str]:
    """Help text as ``#`` lines, each paragraph wrapped, a ``#`` line between them."""
    lines: list[str] = []
    for index, paragraph in enumerate(text.strip().split("\n\n")):
        if index:
            lines.append("#")
        lines += textwrap.wrap(
            " ".join(paragraph.split()),
            width=WIDTH,
            initial_indent="# ",
            subsequent_indent="# ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return lines


# --------------------------------------------------------------------------- regenerating

DEFAULT_SCHEMA = "edge_agent.config.agent_schema:AGENT_SCHEMA"


def _load(reference: str) -> Schema:
    module, _, name = reference.partition(":")
    schema: Schema = getattr(importlib.import_module(module), name)
    return schema


def _stale(schemas: Sequence[Schema]) -> Iterator[tuple[Schema, str]]:
    for schema in schemas:
        text = schema.render_example()
        path = schema.example_path()
        if not path.is_file() or path.read_text("utf-8") != text:
            yield schema, text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.config.schema --write|--check [MODULE:NAME ...]``."""
    import argparse  # noqa: PLC0415 - the tool's, kept off the agent's start-up

    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.config.schema",
        description="Regenerate (--write) or check (--check) the example config files.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write stale example files")
    mode.add_argument("--check", action="store_true", help="exit 1 if one is stale")
    parser.add_argument(
        "schemas", nargs="*", default=[DEFAULT_SCHEMA], metavar="MODULE:NAME",
        help=f"the schemas (default {DEFAULT_SCHEMA})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    stale = list(_stale([_load(reference) for reference in args.schemas]))
    for schema, text in stale:
        if args.write:
            schema.example_path().write_text(text, "utf-8")
            print(f"wrote {schema.example_path()}")
        else:
            print(f"stale: {schema.example_path()}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
