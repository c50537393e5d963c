"""What the command-line scripts share: one-line errors, exit codes, quiet libraries."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from latentgen.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports mistakes as a UserError (one line) instead of usage + message."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        raise UserError(f"{self.prog}: {message}")


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a command-line `main`, turning user mistakes into one line and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            print(f"error: the disk is full while writing {err.filename or 'output'}; nothing partial was kept",
                  file=sys.stderr)
            return 1
        raise
    return 0


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to `sys.stderr` as it is at each message (a caller may have redirected it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass


def quiet_libraries() -> None:
    """Keep diffusers/transformers/datasets from printing load progress and advice on every run; our own
    warnings (latentgen logger) print as one `warning: ...` line each."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ours = logging.getLogger("latentgen")
    if not ours.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.WARNING)
        ours.propagate = False
    for name in ("diffusers", "transformers", "datasets", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
