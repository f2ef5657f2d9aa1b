"""Checkpoints, resume and output safety for `navil finetune`: nothing a run writes is ever lost or half-written.

- `RunLock`: one run per output folder (an `fcntl` lock on `.navil.lock`, which holds the owner's pid; the kernel
  drops the lock when its process dies, even by `kill -9`, so a stale lock file never blocks a later run).
- `prepare_output_dir`: before the model loads, the folder is created and checked for writability; a folder holding
  files is refused unless `overwrite` (which empties it) or `resume`; its `navil_status.json` says "incomplete" until
  the final model is in place, so that loaders (`checks_navil.check_save_complete`) refuse it meanwhile.
- `check_free_space`: the space the final model and the kept checkpoints need, before step 1.
- `NaViLTrainer`: `transformers.Trainer` that writes each checkpoint under `.tmp-save/` and renames it into place
  once complete (weights, optimizer, scheduler, RNG, trainer state, processor, tokenizer, code and a stream's data
  position), keeps the newest `save_total_limit`, and stops with `NonFiniteError` naming the step at the
  first non-finite loss or gradient; no folder with a non-finite weight is ever written.
- `publish_final`: the final model goes to the output folder the same way.
"""

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer

from ..checks_navil import RUN_STATUS_FILE

LOCK_FILE = ".navil.lock"
WRITE_PROBE = ".navil-write-test-"
STAGING_DIR = ".tmp-save"  # checkpoints and the final model are written here, then renamed into place
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class OutputFolderError(OSError):
    """The output folder cannot take this run: not writable, too little space, not empty, or in use by another run."""


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, gradient or weight; the run stops before anything non-finite is saved."""


def write_status(folder: Path, complete: bool, **details) -> None:
    """Writes `navil_status.json` atomically (a temporary file renamed over it)."""
    temporary = Path(folder, f".{RUN_STATUS_FILE}.tmp")
    with open(temporary, "w") as file:
        json.dump({"complete": complete, **details}, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, Path(folder, RUN_STATUS_FILE))


def is_complete(folder: Path) -> bool:
    status = Path(folder, RUN_STATUS_FILE)
    try:
        return json.loads(status.read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


class RunLock:
    """An exclusive lock on `folder` for one run (`fcntl.flock` on `folder/.navil.lock`, which holds the pid).

    The kernel releases the lock when the process dies, so a lock file left by a killed run is taken over. Where
    `fcntl` is missing (Windows) the file is created exclusively and a file whose pid is no longer running is stale.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder, LOCK_FILE)
        self.descriptor = None

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid else "another process"

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            fcntl = None
        while True:
            flags = os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL)
            try:
                descriptor = os.open(self.path, flags, 0o644)
            except FileExistsError:  # no fcntl: a lock file exists; stale if its pid is gone
                if _pid_running(self.path.read_text().strip()):
                    raise self._in_use() from None
                self.path.unlink()
                continue
            if fcntl is not None:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as error:
                    os.close(descriptor)
                    if error.errno in (errno.EAGAIN, errno.EACCES):
                        raise self._in_use() from None
                    raise
                # the holder may have removed the file between our open and lock: lock the file now at the path
                if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(descriptor).st_ino:
                    os.close(descriptor)
                    continue
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            self.descriptor = descriptor
            return self

    def _in_use(self) -> OutputFolderError:
        return OutputFolderError(
            f"{self.path.parent} is in use by another training run ({self._holder()}); two runs into one folder would "
            "overwrite each other. Wait for it to finish, or choose another --output-dir."
        )

    def release(self) -> None:
        if self.descriptor is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.descriptor)  # closing drops the flock
            self.descriptor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def _pid_running(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_main_process() -> bool:
    """Rank 0 of a `torchrun` / `accelerate launch` run (or a single process): the one that prepares the folder."""
    return os.environ.get("RANK", "0") == "0"


def prepare_output_dir(
    output_dir, overwrite: bool = False, resume: bool = False, protected: tuple = ()
) -> Optional[RunLock]:
    """Creates and locks `output_dir` for a run and marks it incomplete; returns the `RunLock` (None on ranks other
    than 0, which write no run files). Refused with `OutputFolderError`: a folder that cannot be written, a folder
    holding files unless `overwrite` (its contents are deleted) or `resume`, a folder that holds or lies inside a path
    of `protected` (the model and data being read) with `overwrite`, and a folder locked by another run."""
    if overwrite and resume:
        raise ValueError("--overwrite deletes the run that --resume continues; pass one of them.")
    if not is_main_process():
        return None
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{WRITE_PROBE}{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink(missing_ok=True)
    except OSError as error:
        raise OutputFolderError(
            f"The output folder {folder} is not writable ({error.strerror or error}); choose a folder you can write to."
        ) from None
    lock = RunLock(folder).acquire()
    try:
        # what a run that stopped before its first checkpoint leaves (its status and staging folder) counts as empty
        leftovers = {LOCK_FILE, STAGING_DIR} | ({RUN_STATUS_FILE} if not is_complete(folder) else set())
        # (another run's writability probe may come and go while it waits for the lock)
        contents = [
            entry
            for entry in folder.iterdir()
            if entry.name not in leftovers and not entry.name.startswith(WRITE_PROBE)
        ]
        if contents and not resume and not overwrite:
            raise OutputFolderError(
                f"The output folder {folder} already holds {len(contents)} files or folders (e.g. {contents[0].name}); "
                "a new run would mix its files with them. Choose an empty folder, pass --overwrite to delete its "
                "contents, or --resume to continue the run saved there."
            )
        if contents and overwrite:
            resolved = folder.resolve()
            for path in protected:
                path = Path(path).resolve()
                if path == resolved or resolved in path.parents:
                    raise OutputFolderError(
                        f"--overwrite would delete {path}, which this run reads; choose another --output-dir."
                    )
            for entry in contents:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)  # a save interrupted by a killed run
        write_status(folder, complete=False)
    except BaseException:
        lock.release()
        raise
    return lock


def check_free_space(output_dir, needed_bytes: int) -> None:
    """Refuses to start when the output folder's file system has less than `needed_bytes` free."""
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OutputFolderError(
            f"The output folder {output_dir} has {free / 2**20:.1f} MiB free, but this run writes about "
            f"{needed_bytes / 2**20:.1f} MiB (the final model and the checkpoints it keeps). Free some space, choose "
            "another --output-dir, or keep fewer checkpoints (--save-total-limit)."
        )


def needed_space(model: torch.nn.Module, num_checkpoints: int) -> int:
    """Bytes of the final model plus `num_checkpoints` checkpoints (weights and AdamW's two moments of the trainable
    parameters), with 10 % to spare for the processor, code and trainer state."""
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    moments = sum(2 * 4 * parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return int(1.1 * (weights + num_checkpoints * (weights + moments)))


def checkpoints(output_dir) -> list[tuple[int, Path]]:
    """`(step, folder)` of the complete `checkpoint-N` folders in `output_dir`, oldest first."""
    found = []
    for entry in Path(output_dir).iterdir() if Path(output_dir).is_dir() else ():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir) -> Path:
    """The newest complete checkpoint of the run in `output_dir` (what `--resume` continues)."""
    found = checkpoints(output_dir)
    if not found:
        raise ValueError(
            f"--resume found no complete checkpoint-N folder in {output_dir}; the run saved none (checkpoints are "
            "written every --save-steps steps). Start it again without --resume."
        )
    return found[-1][1]


def _remove(folder: Path) -> None:
    """Deletes a folder so that no half-deleted copy keeps its name: renamed first, then removed."""
    doomed = folder.with_name(f".deleting-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def rotate_checkpoints(output_dir, save_total_limit: Optional[int]) -> None:
    """Keeps the newest `save_total_limit` complete checkpoints (all of them when None)."""
    if save_total_limit:
        for _, folder in checkpoints(output_dir)[:-save_total_limit]:
            _remove(folder)


def first_non_finite(named_tensors) -> Optional[str]:
    """The name of the first tensor of `(name, tensor)` pairs holding a NaN or an infinity, or None (one sync)."""
    names, flags = [], []
    for name, tensor in named_tensors:
        if tensor is not None:
            names.append(name)
            flags.append(tensor.detach().isfinite().all())
    if not flags:
        return None
    flags = torch.stack(flags)
    return None if bool(flags.all()) else names[int((~flags).nonzero()[0])]


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Raises `NonFiniteError` naming the first parameter with a NaN or infinite value."""
    name = first_non_finite(model.named_parameters())
    if name is not None:
        raise NonFiniteError(
            f"After step {step} the weight {name} holds NaN or infinite values, so it is not saved; the previous "
            "checkpoints are kept. Lower the learning rate (or clip gradients harder) and resume from one of them."
        )


def publish_final(output_dir, staging: Path, step: int) -> None:
    """Moves the final model from `staging` into `output_dir`, replacing the files of an earlier final model (but not
    the checkpoints), and marks the folder complete. Until then the folder's status says incomplete."""
    folder = Path(output_dir)
    write_status(folder, complete=False)
    kept = {LOCK_FILE, RUN_STATUS_FILE, STAGING_DIR}
    for entry in folder.iterdir():
        if entry.name not in kept and not CHECKPOINT_PATTERN.match(entry.name) and not entry.name.startswith("."):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in staging.iterdir():
        if entry.name != RUN_STATUS_FILE:
            os.replace(entry, folder / entry.name)
    shutil.rmtree(folder / STAGING_DIR)
    write_status(folder, complete=True, step=step)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class NaViLTrainer(Trainer):
    """`transformers.Trainer` whose checkpoints cannot be half-written, hold NaN, or lack what loading needs.

    Each checkpoint is written to `<output_dir>/.tmp-save/checkpoint-N` (marked incomplete), marked complete once
    written and renamed to `<output_dir>/checkpoint-N`; only then are old checkpoints beyond `save_total_limit` deleted. Pass the processor
    as `processing_class` so that each checkpoint holds it with its tokenizer (and chats on its own).

    Every training step checks its loss and gradients, and every save the weights: the first non-finite value
    raises `NonFiniteError` naming the step.

    Callbacks with a `save(folder, args, state)` method (`streaming.StreamingStateCallback`, which saves the data
    position of a stream, `data_state_rank{N}.json`) write into the staged checkpoint before it is marked complete.
    """

    # -- non-finite values --------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        step = self.state.global_step + 1
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(
                f"The loss of step {step} is {loss.item()}; the run stops (nothing of this step is saved, earlier "
                "checkpoints are kept). A NaN or infinite loss usually means a learning rate too high for these "
                "weights: lower it and resume from a checkpoint, or start again."
            )
        name = first_non_finite((name, parameter.grad) for name, parameter in model.named_parameters())
        if name is not None:
            raise NonFiniteError(
                f"The gradient of {name} at step {step} holds NaN or infinite values; the run stops (earlier "
                "checkpoints are kept). Lower the learning rate, or check the inputs of this step."
            )
        return loss

    # -- atomic checkpoints -------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_root", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        check_finite_weights(self.model, self.state.global_step)
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / STAGING_DIR / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write_status(staging, complete=False)
        _barrier()
        self._staging_root = str(staging.parent)  # Trainer writes <run dir>/checkpoint-N: under .tmp-save/
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        for callback in self.callback_handler.callbacks:
            if callable(getattr(callback, "save", None)):
                callback.save(staging, self.args, self.state)
        _barrier()
        if self.args.should_save:
            write_status(staging, complete=True, step=self.state.global_step)
            final = run_dir / name
            if final.exists():  # a resumed run saves the step again
                _remove(final)
            os.replace(staging, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit)
        _barrier()

    def save_final(self, output_dir) -> None:
        """Saves the final model with its processor and log history into `output_dir`, atomically."""
        check_finite_weights(self.model, self.state.global_step)
        staging = Path(output_dir, STAGING_DIR, "final")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        self.save_model(str(staging))  # the full state dict, gathered from every process under FSDP
        if self.args.should_save:
            Path(staging, "log_history.json").write_text(json.dumps(self.state.log_history, indent=1) + "\n")
            publish_final(output_dir, staging, self.state.global_step)
        _barrier()
