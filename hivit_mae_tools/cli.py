"""Command-line plumbing shared by every HiViT-MAE script: one `error: ...` line instead of a traceback.

A script keeps a `main(argv)` that raises on bad input and wraps it for the command line:

    def cli(argv=None) -> int:
        return run_cli(main, argv)

    if __name__ == "__main__":
        sys.exit(cli())

`run_cli` prints exactly one `error: <message>` line on stderr for a [`UserError`] (exit 2 when it is a usage error,
else 1) and for the `OSError` / `ValueError` a user's input causes (missing or unreadable files, bad values; exit 1).
`--debug` on the command line (or `HIVIT_MAE_DEBUG=1` in the environment) shows the traceback instead.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HIVIT_MAE_DEBUG"


class UserError(ValueError):
    """A mistake in the user's input, reported as one `error:` line; `usage=True` marks a bad argument (exit 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def raise_usage_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` raise a usage [`UserError`] instead of printing its (for Trainer scripts, 200-line) usage and
    exiting; `--help` still prints the help."""

    def error(message: str):
        raise UserError(f"{message} (see {parser.prog} --help)", usage=True)

    parser.error = error
    return parser


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if "Traceback (most recent call last)" in text:
        # Re-raised from a DataLoader worker: the message carries the worker's traceback; its last line is the error.
        text = text.strip().splitlines()[-1]
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _close_progress_bars():
    """Finish the progress bars an exception left open, so that the error starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove a bare `--debug` from `argv`. `--debug VALUE` is left alone: it is `TrainingArguments.debug`."""
    kept, debug = [], os.environ.get(DEBUG_ENV, "") not in ("", "0")
    for index, arg in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg == DEBUG_FLAG and (following is None or following.startswith("-")):
            debug = True
        else:
            kept.append(arg)
    return kept, debug


def run_cli(main: Callable[[list[str]], Any], argv: Optional[list[str]] = None) -> int:
    """Run `main(argv)` (default: the command line) and return the exit status: `main`'s own status when it returns
    an int, else 0; 1 or 2 with one `error:` line on stderr for user errors; 130 on Ctrl-C."""
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        status = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        print("error: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError, ValueError) as error:
        _close_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2 if getattr(error, "usage", False) else 1
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def looks_local(name_or_path: str) -> bool:
    """Whether `name_or_path` can only mean a local path, not a Hub id (`org/name` or `name`): it starts with `.`,
    `/` or `~`, has more than one separator or a backslash, or its first component is an existing local folder."""
    if name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or os.sep != "/" and os.sep in name_or_path:
        return True
    parts = name_or_path.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def check_model_path(name_or_path: str, flag: str = "--model_name_or_path") -> str:
    """Refuse at once a local-looking model path that does not exist (instead of 30 s of Hub retries ending in a
    connection error), a file given for a folder and a folder without `config.json`. Hub ids pass unchanged."""
    if not name_or_path.strip():
        raise UserError(f"{flag} is empty", usage=True)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {name_or_path}: the folder holds no config.json, so it is not a saved model")
        return str(path)
    if path.exists():
        raise UserError(f"{flag} {name_or_path} is a file; give the model's folder (with config.json)")
    if looks_local(name_or_path):
        raise UserError(f"{flag} {name_or_path}: no such local folder")
    return name_or_path
