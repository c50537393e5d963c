"""What the command-line scripts share: one-line errors, exit codes, quiet libraries."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .errors import UserError


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


def quiet_libraries() -> None:
    """Keep diffusers/transformers/datasets from printing load progress and advice on every run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
