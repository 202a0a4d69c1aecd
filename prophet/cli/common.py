"""What every ``prophet-bench`` subcommand shares: the parser that reports instead of exiting, value parsers,
the ``--out`` check made before any work, and the record written at the end."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from prophet.errors import ConfigError, ProphetError

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


class UsageError(ProphetError):
    """A command-line value is malformed."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors become one line and exit code 2 through `prophet.cli.main` (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_tokens(text: str) -> int:
    """``32768``, ``128k`` (131072) or ``1m`` (1048576) -> tokens."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive token count such as 32768, 128k or 1m")
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low`` (``--layers 0`` means nothing, so it is refused
    rather than read as 'all')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: give {'at least 1' if low == 1 else f'{low} or more'}")
        return value

    return parse


positive, non_negative = at_least(1), at_least(0)


def names(text: str) -> tuple[str, ...]:
    """A comma list (``lru,prophet``) -> its non-empty names."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="also write the JSON record to this file (checked before the run)")


def check_out(path: str | None) -> Path | None:
    """Make sure ``--out`` can be written before any long work: its folder is made, the file is not a folder,
    and the folder is writable."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name such as {out / 'result.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot make its folder ({exc.strerror}); give a writable place") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out {path}: not writable; give a writable place")
    return out


def emit(record: dict[str, Any], out: Path | None) -> None:
    """The record as the last stdout line, and in ``out`` when given."""
    line = json.dumps(record)
    if out is not None:
        out.write_text(line + "\n")
    print(line)
