"""Output folders that never cost the user a file.

[`check_output_dir`] refuses, before anything is written, an output folder that would destroy or mix with the user's
files; [`staged_output`] writes results into a temporary sibling folder and moves them into place only once complete,
so that an interrupted run never leaves a half-written model where a good one was.

    output_dir = check_output_dir(args.output_dir, inputs=[args.train_dir], source_model=args.model_name_or_path)
    with staged_output(output_dir) as staging:
        model.save_pretrained(staging)
    # `output_dir` now holds the model; an exception inside the block leaves `output_dir` as it was

Staging folders are named `.<name>.hivit-mae-staging-<host>-<pid>-<random>` next to the output folder and carry a
marker file; leftovers of a killed process (same host, process gone) are removed by the next [`staged_output`] for the
same folder. Nothing else is ever deleted.
"""

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

from .cli import UserError

PathLike = Union[str, os.PathLike]

STAGING_TAG = ".hivit-mae-staging-"
STAGING_MARKER = ".hivit-mae-staging"


def _resolve(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    output_dir: Optional[PathLike],
    *,
    inputs: Iterable[Optional[PathLike]] = (),
    source_model: Optional[PathLike] = None,
    must_be_empty: bool = False,
    allow_existing: bool = False,
    flag: str = "--output_dir",
    allow_flag: str = "--overwrite_output_dir",
) -> Path:
    """Check an output folder before anything is written and return its real path (a symlink is followed, so that
    the link stays a link).

    Refused with a [`UserError`]: an empty name (an unset shell variable), the current directory, the home directory
    or one of their parents, a folder that is or contains one of `inputs` (data folders, checkpoint files) or the
    `source_model` folder, a folder inside an input folder, a dangling symlink, a file, a folder that cannot be
    written; and, with `must_be_empty`, a non-empty folder unless `allow_existing` (the user passed `allow_flag`).
    """
    if output_dir is None or not str(output_dir).strip():
        raise UserError(f"{flag} is empty (an unset shell variable?); give the folder to write to", usage=True)
    given = Path(output_dir).expanduser()
    if given.is_symlink() and not given.exists():
        raise UserError(f"{flag} {output_dir} is a symlink to {os.readlink(given)}, which does not exist")
    folder = _resolve(given)
    cwd, home = _resolve(Path.cwd()), _resolve(Path.home())
    if _contains(folder, cwd):
        where = "the current directory" if folder == cwd else "a parent of the current directory"
        raise UserError(f"{flag} {output_dir} is {where}; give a new or empty folder", usage=True)
    if _contains(folder, home) or folder == Path(folder.anchor):
        raise UserError(f"{flag} {output_dir} is your home directory, one of its parents or the root", usage=True)
    named = [("the source model", source_model)] + [("an input", path) for path in inputs]
    for role, path in named:
        if path is None or not str(path).strip() or not Path(path).expanduser().exists():
            continue
        source = _resolve(Path(path))
        if _contains(folder, source):
            what = "is" if folder == source else "contains"
            raise UserError(f"{flag} {output_dir} {what} {role} ({path}); write somewhere else", usage=True)
        if role == "an input" and source.is_dir() and _contains(source, folder):
            raise UserError(
                f"{flag} {output_dir} is inside an input folder ({path}): what is written there would be read as "
                "input; write somewhere else",
                usage=True,
            )
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {output_dir} is a file, not a folder")
    if must_be_empty and not allow_existing and folder.is_dir():
        entries = sorted(entry.name for entry in folder.iterdir() if STAGING_TAG not in entry.name)
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise UserError(
                f"{flag} {output_dir} is not empty ({shown}); choose a new folder, or pass {allow_flag} to write "
                "into it anyway"
            )
    writable = folder
    while not writable.exists():
        writable = writable.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output_dir}: {writable} is not writable")
    return folder


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(output_dir: PathLike) -> list[Path]:
    """Remove the staging folders of `output_dir` left by killed processes of this host (only folders with our name
    pattern and marker whose process is gone); returns what was removed."""
    folder = _resolve(Path(output_dir))
    pattern = re.compile(re.escape(f".{folder.name}{STAGING_TAG}{socket.gethostname()}-") + r"(\d+)-")
    removed = []
    if not folder.parent.is_dir():
        return removed
    for entry in folder.parent.iterdir():
        match = pattern.match(entry.name)
        if (
            match
            and entry.is_dir()
            and not entry.is_symlink()
            and (entry / STAGING_MARKER).is_file()
            and not _process_alive(int(match.group(1)))
        ):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _move_into(staging: Path, folder: Path):
    """Move the entries of `staging` into `folder`; each replaces an entry of the same name (a folder entry is swapped
    through a name in the staging folder, so that no moment lacks it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        if entry.name == STAGING_MARKER:
            continue
        target = folder / entry.name
        if target.is_dir() and not target.is_symlink():
            old = staging / f"{STAGING_MARKER}-replaced-{entry.name}"
            target.rename(old)
            entry.rename(target)
        else:
            os.replace(entry, target)


def _new_staging(folder: Path) -> Path:
    prefix = f".{folder.name}{STAGING_TAG}{socket.gethostname()}-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    # mkdtemp makes a private (0700) folder; once renamed into place it should be as readable as any new folder.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    (staging / STAGING_MARKER).touch()
    return staging


@contextlib.contextmanager
def staged_output(output_dir: PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a new, empty staging folder next to `output_dir`; when the block ends without an exception its contents
    move into place, otherwise it is deleted and `output_dir` is left as it was.

    Into place means: if `output_dir` does not exist, the staging folder is renamed to it (one atomic step);
    otherwise each file written replaces the file of the same name in `output_dir` and other files stay, unless
    `replace=True` (only when the user asked to overwrite), which swaps the whole folder. A symlinked `output_dir`
    stays a symlink: the folder it points to is written.
    """
    folder = _resolve(Path(output_dir))
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(folder)
    staging = _new_staging(folder)
    trash = None
    try:
        yield staging
        if folder.is_dir() and not replace:
            _move_into(staging, folder)
        else:
            if folder.is_dir():
                # The old folder moves into a marked staging folder first: a kill here leaves only our leftovers.
                trash = _new_staging(folder)
                folder.rename(trash / "replaced")
            (staging / STAGING_MARKER).unlink()
            staging.rename(folder)
    finally:
        for leftover in (staging, trash):
            if leftover is not None and leftover.exists() and leftover != folder:
                shutil.rmtree(leftover, ignore_errors=True)
