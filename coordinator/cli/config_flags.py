"""A config file's flags as Typer options, derived from its schema.

A key of a config file that a command-line flag overrides says so in its schema
(:class:`~edge_agent.config.schema.Key`: ``flag``, ``metavar``, help text, how its
value is read). :func:`with_config_flags` declares those flags as options of a Typer
command, so a flag is written in one place, the schema, as ``fedge-agent run``'s are
(:mod:`edge_agent.cli`). ``fedge coordinator serve`` uses it with the service's
schema (:data:`~coordinator.service.config_schema.SERVICE_SCHEMA`).

How a key becomes an option (the option's parameter is the flag's name in
snake case: ``--embedded-broker-port`` -> ``embedded_broker_port``):

* its help is :meth:`~edge_agent.config.schema.Key.flag_help` (the key's summary,
  with its default), its metavar the key's; no default is shown, since a flag
  given nowhere leaves the file's value, or the key's default, in place;
* its type is :meth:`~edge_agent.config.schema.Key.flag_type`. A path refuses an
  existing directory, or, when its metavar is ``DIR``, an existing file. A switch
  (a ``bool`` key) takes no value: ``--embedded-broker`` alone means true;
* a :attr:`~edge_agent.config.schema.Key.repeatable` key's flag may be given
  several times.

The decorated command receives, as its first parameter, the flags' values by
dotted key (``{"broker.url": "mqtt://h", "trust.keys": (Path("k.pub"),), ...}``):
None for a flag not given (and for a switch left off), a tuple for a repeatable
one, ready to merge over the file with
:meth:`~edge_agent.config.schema.Schema.merge`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Concatenate, ParamSpec

import typer

from coordinator.cli.options import adding_options
from edge_agent.config.schema import Key, Schema

__all__ = ["ConfigFlags", "config_options", "parameter_name", "with_config_flags"]

ConfigFlags = dict[str, Any]
"""The flags' values by dotted key (None: not given)."""

_P = ParamSpec("_P")


def parameter_name(flag: str) -> str:
    """The Python parameter of a flag: ``--embedded-broker-port`` -> ``embedded_broker_port``."""
    return flag.lstrip("-").replace("-", "_")


def _option(key: Key, flag: str) -> Any:
    """The Typer option of a key's flag."""
    kind = key.flag_type()
    checks: dict[str, Any] = {}
    if kind is Path:
        checks = {"file_okay": False} if key.metavar == "DIR" else {"dir_okay": False}
    if kind is bool:
        return typer.Option(flag, help=key.flag_help())
    return typer.Option(
        flag, show_default=False, metavar=key.metavar or None, help=key.flag_help(), **checks
    )


def _annotation(key: Key) -> Any:
    """The parameter's type: ``bool`` for a switch, else an optional value or list."""
    kind = key.flag_type()
    if kind is bool:
        return bool
    return (types.GenericAlias(list, (kind,)) if key.repeatable else kind) | None


def config_options(schema: Schema) -> tuple[tuple[str, Any, Any], ...]:
    """``(parameter name, annotation, default)`` of the option of every flag of ``schema``.

    Raises:
        TypeError: a switch (a ``bool`` key) whose default is true: its flag could
            not change anything.
    """
    declared = []
    for key in schema.keys.values():
        if key.flag is None:
            continue
        if key.flag_type() is bool and key.default:
            raise TypeError(f"{key.flag} would switch on {key.name}, which is on by default")
        default = False if key.flag_type() is bool else None
        declared.append(
            (parameter_name(key.flag), Annotated[_annotation(key), _option(key, key.flag)], default)
        )
    return tuple(declared)


def _value(key: Key, value: Any) -> Any:
    """A parsed option's value as the schema reads it (None: not given)."""
    if key.flag_type() is bool:
        return True if value else None
    if key.repeatable:
        return tuple(value) if value else None
    return value


def with_config_flags(
    schema: Schema,
) -> Callable[[Callable[Concatenate[ConfigFlags, _P], None]], Callable[_P, None]]:
    """A decorator adding the flag of every key of ``schema`` to a Typer command.

    The command's first parameter receives the flags' values by dotted key
    (:data:`ConfigFlags`); its other parameters are its own options (``--config``).

    Raises:
        TypeError: a switch whose default is true (see :func:`config_options`), or
            (when decorating) a command parameter named like a flag.
    """
    keys = {
        parameter_name(key.flag): (dotted, key)
        for dotted, key in schema.keys.items()
        if key.flag is not None
    }

    def build(values: dict[str, Any]) -> ConfigFlags:
        return {dotted: _value(key, values[name]) for name, (dotted, key) in keys.items()}

    return adding_options(config_options(schema), build)
