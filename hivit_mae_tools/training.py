"""Trainer plumbing shared by the training scripts: argument parsing with one-line usage errors, logging, the
learning rate scaled by the batch, the output-folder rules of a training run, and resuming from the newest complete
checkpoint."""

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from .cli import UserError, raise_usage_errors
from .outputs import check_output_dir

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written into a checkpoint folder after everything the Trainer saves there (by every process) is on disk.
COMPLETE_MARKER = "checkpoint_complete.json"
# transformers 5 dropped `TrainingArguments.overwrite_output_dir`; the scripts keep the flag on every version.
_HAS_OVERWRITE = "overwrite_output_dir" in TrainingArguments.__dataclass_fields__


@dataclass
class OutputArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into a non-empty --output_dir (files of the same name are replaced; nothing else is "
            "deleted)."
        },
    )


def parse_training_args(dataclass_types: tuple, args: list[str]) -> tuple:
    """Parse `args` into `dataclass_types` (the last one `TrainingArguments`) with HfArgumentParser. Bad arguments
    raise a usage [`UserError`]; `training_args.overwrite_output_dir` exists on every transformers version."""
    types = tuple(dataclass_types) + (() if _HAS_OVERWRITE else (OutputArguments,))
    parser = raise_usage_errors(HfArgumentParser(types))
    try:
        parsed = parser.parse_args_into_dataclasses(args=args)
    except ValueError as error:
        if isinstance(error, UserError):
            raise
        raise UserError(str(error).replace("by the HfArgumentParser", "(unknown arguments)"), usage=True) from error
    if not _HAS_OVERWRITE:
        parsed[len(dataclass_types) - 1].overwrite_output_dir = parsed[-1].overwrite_output_dir
        parsed = parsed[:-1]
    return tuple(parsed)


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger):
    """Log `script_logger`'s and this package's INFO lines to stdout on the main process (WARNING on the others), and
    only warnings of datasets and transformers."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = logging.INFO if training_args.should_log else logging.WARNING
    for each in (script_logger, logging.getLogger(__package__)):
        each.setLevel(level)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    transformers.utils.logging.set_verbosity(logging.WARNING)


def scale_learning_rate(
    training_args: TrainingArguments, user_args: list[str], base_learning_rate: float, per_images: int
) -> int:
    """Set the learning rate to `base_learning_rate * total batch / per_images`, as mmpretrain's `auto_scale_lr` (and
    MAE's `blr`) do, unless `user_args` give `--learning_rate`. Returns the total batch: per-device batch x gradient
    accumulation x processes."""
    total_batch = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    if not any(arg == "--learning_rate" or arg.startswith("--learning_rate=") for arg in user_args):
        training_args.learning_rate = base_learning_rate * total_batch / per_images
    return total_batch


# -------------------------------------------------------------------------------------------------- checkpoints
class CheckpointCompleteCallback(TrainerCallback):
    """Marks each checkpoint complete once every process has written its part: a checkpoint folder without the marker
    was interrupted while saving."""

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and folder.is_dir():
            (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": state.global_step}))


def _checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders of `output_dir`, newest (highest step) first."""
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def is_complete_checkpoint(folder: Path, markers_expected: bool = True) -> bool:
    """Whether `folder` holds everything the Trainer writes: our marker; or, for checkpoints written without it
    (`markers_expected=False`), a readable `trainer_state.json`, which the Trainer writes after the weights, optimizer,
    scheduler and RNG states."""
    if (folder / COMPLETE_MARKER).is_file():
        return True
    if markers_expected:
        return False
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def resolve_resume(training_args: TrainingArguments) -> Optional[str]:
    """The checkpoint folder to resume from. `--resume_from_checkpoint latest` (or `true` / `last`) means the newest
    complete checkpoint in `--output_dir`; incomplete ones (a process killed while saving) are skipped and named.
    A path must be a complete checkpoint folder."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    if resume.lower() in ("true", "latest", "last"):
        output_dir = Path(training_args.output_dir)
        if not output_dir.is_dir():
            raise UserError(f"--resume_from_checkpoint {resume}: no checkpoint in {output_dir} (it does not exist)")
        checkpoints = _checkpoints(output_dir)
        markers = any((path / COMPLETE_MARKER).is_file() for path in checkpoints)
        complete = [path for path in checkpoints if is_complete_checkpoint(path, markers)]
        if not complete:
            found = f" (incomplete: {', '.join(p.name for p in checkpoints)})" if checkpoints else ""
            raise UserError(f"--resume_from_checkpoint {resume}: no complete checkpoint in {output_dir}{found}")
        skipped = checkpoints[: checkpoints.index(complete[0])]
        if skipped:
            logger.warning(
                "Skipping %s: interrupted while saving (incomplete); the run will write it again",
                ", ".join(path.name for path in skipped),
            )
        logger.warning("Resuming from %s, the newest complete checkpoint", complete[0])
        return str(complete[0])
    folder = Path(resume)
    if not folder.is_dir():
        raise UserError(f"--resume_from_checkpoint {resume} is not a folder")
    markers = any((path / COMPLETE_MARKER).is_file() for path in _checkpoints(folder.parent))
    if not is_complete_checkpoint(folder, markers):
        raise UserError(f"--resume_from_checkpoint {resume} is incomplete (interrupted while saving)")
    logger.warning("Resuming from %s", folder)
    return resume


def check_training_output(
    training_args: TrainingArguments, resume: Optional[str], inputs=(), source_model: Optional[str] = None
) -> Path:
    """Check `--output_dir` before anything is written (see [`check_output_dir`]). It must be new or empty unless
    this run resumes a checkpoint inside it or `--overwrite_output_dir` is given; even then, checkpoints of an earlier
    run are refused when this run saves checkpoints, since the Trainer's rotation (`--save_total_limit`) would delete
    them and same-step checkpoints would be overwritten. `inputs` are the data folders; `resume` counts as one when it
    lies outside the output folder."""
    output_dir = training_args.output_dir
    resolved = Path(output_dir).resolve() if output_dir else None
    resumes_here = resume is not None and resolved is not None and resolved in Path(resume).resolve().parents
    folder = check_output_dir(
        output_dir,
        inputs=[*inputs, None if resumes_here else resume],
        source_model=source_model,
        must_be_empty=not resumes_here,
        allow_existing=training_args.overwrite_output_dir,
    )
    saves = str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no"
    if not resumes_here and saves and folder.is_dir():
        earlier = [path.name for path in _checkpoints(folder)]
        if earlier:
            raise UserError(
                f"--output_dir {output_dir} holds checkpoints of an earlier run ({', '.join(earlier[:3])}), which "
                "this run's checkpoint rotation would delete: resume it with --resume_from_checkpoint latest, or "
                "choose a new folder"
            )
    # Every process checks before any of them writes (the main process writes first).
    PartialState().wait_for_everyone()
    return folder


def finish_processes():
    """End a training script's work in every process together: wait for all (the main process moves the final model
    into place last), then close the process group. A process that exits while another still writes can abort in
    the group's teardown ("terminate called without an active exception")."""
    PartialState().wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
