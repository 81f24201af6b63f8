"""The pieces every job's command line shares: its parser, argparse types for counts, config files and
endpoints, ``--set``, and the one-line refusal with exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlparse


def job_parser(description: str | None, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
               ) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the job's docstring as written (its examples keep their lines)."""
    return parser_class(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.FIELD=VALUE`` (repeatable), into ``overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")


def count_argument(text: str) -> int:
    """An argparse type: a whole number >= 1 (``--limit``, ``--workers``, ``--batch-size`` ...)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a whole number >= 1")
    return value


def config_file_argument(path: str) -> str:
    """An argparse type for ``--config``: a file of text (a missing one is named by ``load_config``)."""
    try:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                handle.read(1 << 16)
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise argparse.ArgumentTypeError(f"{path!r} cannot be read ({reason}); allowed: a run config YAML "
                                         "file") from None
    return path


def endpoint_url_argument(text: str) -> str:
    """An argparse type for ``--s3-endpoint-url``: ``http(s)://host[:port]``."""
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: http(s)://host[:port]")
    return text


def fail(error: Exception | str) -> int:
    """A mistake in a flag, a config or an input: one line naming it on stderr, no traceback; exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2
