"""What every ram-edge command line shares: exit codes, ``--version``, ``--verbose`` / ``--quiet`` and the
logging set-up (library code reports through ``logging``; the CLIs decide what reaches the terminal).

Pure Python: imported by ``ram-export`` (before torch), ``ram-tag``, ``ram-vocab`` and ``ram-serve``.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK = 0
EXIT_FAILED = 1  # some inputs failed, or verification failed
EXIT_USAGE = 2  # bad arguments or bad input (bundle, checkpoint, files)
EXIT_INTERRUPTED = 130


def version_string(prog: str) -> str:
    from ram_edge import __version__

    return f"{prog} (ram-edge) {__version__}"


def add_common_flags(parser: argparse.ArgumentParser, prog: str) -> None:
    """``--version``, ``-v/--verbose`` and ``-q/--quiet`` (mutually exclusive)."""
    parser.add_argument("--version", action="version", version=version_string(prog))
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-v", "--verbose", action="store_true", help="also print debug details (logging DEBUG)")
    chatter.add_argument("-q", "--quiet", action="store_true", help="print only errors: no progress bar, no summary")


def configure_logging(args: argparse.Namespace, prog: str) -> None:
    """Route the ``ram_edge`` loggers to stderr: INFO by default, DEBUG with --verbose, ERROR with --quiet.
    Only ram-edge's own loggers are touched (records still propagate to the root logger, which a command
    line leaves without handlers), so an application embedding the library keeps its set-up."""
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.ERROR if getattr(args, "quiet", False) \
        else logging.INFO
    logger = logging.getLogger("ram_edge")
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, "_ram_edge_cli", False)]:
        logger.removeHandler(handler)  # one CLI handler, on the current stderr (tests swap it)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    handler._ram_edge_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
