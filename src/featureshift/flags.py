"""A settings field's command-line flag, declared on the field itself.

TrainConfig and RenderSettings mark each field a command takes with `flag(default, help)`;
the command line builds its options from those fields (cli_fields.py), so a default and the
words about it are written once, beside the field, and `--help` shows the default the
code uses.
"""
from __future__ import annotations

import dataclasses
from typing import Any

FLAG = "flag"  # the key of a field's Flag in its metadata


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field appears on the command line (--name-with-dashes)."""

    help: str
    default_text: str | None = None  # the default in words, where its value alone would not say it
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    type: type | None = None  # the value's type where the default (None) does not say it
    path: str | None = None  # "file" or "folder": the value names one
    short: str | None = None  # a one-letter alias, e.g. "-q"
    switch: bool = False  # a bare --name that turns it on, instead of --name/--no-name


def flag(default: Any, help: str, **how: Any) -> Any:
    """A dataclass field with DEFAULT that a command line offers as a flag (see Flag for HOW)."""
    return dataclasses.field(default=default, metadata={FLAG: Flag(help, **how)})


def flagged_fields(cls) -> list[dataclasses.Field]:
    """The fields of the dataclass CLS that carry a flag, in declaration order."""
    return [f for f in dataclasses.fields(cls) if FLAG in f.metadata]


def default_words(field: dataclasses.Field) -> str | None:
    """The field's default as --help shows it: its own words, else its value (on/off for a switch,
    numbers as written); None when the default is unset and says nothing."""
    spec: Flag = field.metadata[FLAG]
    if spec.default_text is not None:
        return spec.default_text
    value = field.default
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
