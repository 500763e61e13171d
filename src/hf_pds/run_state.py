"""The work folder of a distillation that writes to an output folder: its lock, its checkpoint, its images.

While ``pipe(..., output_dir=DIR)`` (CLI ``--output DIR``) runs, its state lives in ``.DIR.pds-run`` beside ``DIR``:

- ``lock``: held by the live run, taken before any expensive step (before the images are checked; in the CLI,
  before the dataset and the pipeline are loaded: :func:`hold_run`). A second run into ``DIR`` is refused at once.
  The operating system drops the lock when its process ends, even by SIGKILL, so the next run takes over the folder
  of a dead one.
- ``checkpoint.npz`` and ``checkpoint.json`` (the prototypes, their prompts and the source sizes), then
  ``run.json`` (the run's arguments, the identity of its data among them), written once the prototypes exist. From
  then on the run is resumable: the same call on the same data makes only the missing images; a call with other
  arguments or other data is refused and told what changed. A run whose data has no identity (a stream made by a
  function) is not resumed: the next run starts afresh, with a warning.
- ``images/000042-0.png`` and ``.json``: each finished image (candidate 0 of prototype 42) and its scores,
  written atomically.

A run that fails before its prototypes exist (bad input, say) leaves no work folder. ``DIR`` itself appears only
when the whole output is written, and then the work folder is removed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from .distributed import SINGLE_PROCESS, broadcast
from .errors import NoSpaceError
from .hub import write_atomically
from .prototypes import Prototypes
from .synthesis import Generated

logger = logging.getLogger(__name__)

_ARGUMENTS = "run.json"
_CHECKPOINT_ARRAYS = "checkpoint.npz"
_CHECKPOINT_DETAILS = "checkpoint.json"
_LOCK = "lock"
# The argument that identifies the data of a run (see hf_pds.pairs.dataset_identity).
_DATA = "dataset"


class RunInProgressError(FileExistsError):
    """Another live run is writing the same output folder."""


class RunInterrupted(KeyboardInterrupt):
    """A run into an output folder was interrupted (Ctrl-C); the message says what was kept for the rerun."""


@dataclass
class Checkpoint:
    """What steps 2-3 produce and a resumed run restores instead of running them again.

    Attributes:
        prototypes: the prototypes of the run.
        prompts: the retrieved caption of each prototype, in order.
        sizes: ``source_images``, ``source_captions`` and ``skipped_rows`` of the source dataset.
        sources: ``[M, candidates]`` dataset rows the decoder reads for each prototype (``select``), or None.
    """

    prototypes: Prototypes
    prompts: list[str]
    sizes: dict
    sources: np.ndarray | None = None


def _canonical(value):
    """JSON round trip, so that a fresh dict compares equal to one read back from ``run.json``."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class ImageStore:
    """Finished images of a run, with their scores: ``images/000042-1.png`` and ``images/000042-1.json`` for
    candidate 1 of prototype 42. The scores are written after the image, so a complete pair is a finished image."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.saved = 0  # images saved by this process: those it made, not those it found

    def path(self, index: int, candidate: int) -> Path:
        return self.folder / f"{index:06d}-{candidate}.png"

    def load(self, index: int, candidate: int) -> Generated | None:
        """Candidate ``candidate`` of prototype ``index``, or None when it is missing or unreadable."""
        path = self.path(index, candidate)
        try:
            png = path.read_bytes()
            PIL.Image.open(io.BytesIO(png)).verify()
            scores = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            return Generated(png, float(scores["fidelity"]), float(scores["text_alignment"]))
        except (OSError, SyntaxError, ValueError, KeyError, TypeError):
            return None

    def save(self, index: int, candidate: int, image: Generated) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(index, candidate)
        write_atomically(path, image.png)
        scores = {"fidelity": image.fidelity, "text_alignment": image.text_alignment}
        write_atomically(path.with_suffix(".json"), json.dumps(scores).encode())
        self.saved += 1

    def count(self) -> int:
        """How many images are stored (readable or not)."""
        return len(list(self.folder.glob("*.png")))


class RunState:
    """The work folder of a run writing to ``output_dir``; see the module's documentation.

    :meth:`lock` it first, as early as possible, then :meth:`open` it; each :meth:`lock` is undone by one
    :meth:`close`.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.folder = self.output_dir.parent / f".{self.output_dir.name}.pds-run"
        self.images = ImageStore(self.folder / "images")
        self.checkpoint: Checkpoint | None = None
        self._arguments: dict = {}
        self._lock = None
        self._holders = 0
        self._finished = False

    def lock(self, state=SINGLE_PROCESS) -> RunState:
        """Take the work folder's lock (main process), before any expensive step, and return self. A RunState that
        is already locked is only counted again: the CLI locks before loading anything, then the pipeline it calls
        uses the same RunState (see :func:`claim_run`); the last :meth:`close` releases it.

        Raises:
            RunInProgressError: (on every process) another live run writes the same output folder.
        """
        if self._holders == 0:
            refusal = None
            if state.is_main_process:
                try:
                    self._acquire()
                except RunInProgressError as error:
                    refusal = error
            refusal = broadcast(refusal, state)  # every process fails the same way
            if refusal is not None:
                raise refusal
        self._holders += 1
        return self

    def open(self, arguments: dict, fresh: bool = False, state=SINGLE_PROCESS) -> Checkpoint | None:
        """Read the checkpoint that an interrupted run with the same ``arguments`` left (locking the work folder
        first unless it is); returns it, or None for a run that starts afresh.

        Raises:
            RunInProgressError: another live run writes the same output folder.
            ValueError: the work folder holds an interrupted run with other arguments or on other data (unless
                ``fresh``, which discards it).
        """
        if self._holders == 0:
            self.lock(state)
        self._arguments = _canonical(arguments)
        refusal = None
        if state.is_main_process:
            try:
                self._settle(fresh)
            except ValueError as error:
                refusal = error
        refusal = broadcast(refusal, state)  # every process fails the same way
        if refusal is not None:
            raise refusal
        self.checkpoint = self._load_checkpoint()
        if self.checkpoint is not None and state.is_main_process:
            logger.info(
                "Resuming %s: its %d prototypes and %d finished images are kept.",
                self.folder,
                len(self.checkpoint.prototypes),
                self.images.count(),
            )
        return self.checkpoint

    def _acquire(self) -> None:
        """Take the folder's lock, or raise when a live run holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / _LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held until close)
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: one run at a time is up to the user
            self._lock = handle
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunInProgressError(
                f"Another run is writing {self.output_dir} ({holder}): wait for it to finish, or choose another "
                "output folder."
            ) from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            logger.info("Taking over the work folder %s of a run that ended (%s).", self.folder, previous)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._lock = handle

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None

    def _settle(self, fresh: bool) -> None:
        """Keep a resumable run with the same arguments; clear anything else (``fresh``: everything)."""
        manifest = self.folder / _ARGUMENTS
        if manifest.exists() and not fresh:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
            if previous.get(_DATA) is None or self._arguments.get(_DATA) is None:
                # Nothing tells whether this run reads the data the interrupted one read: never reuse its prototypes.
                logger.warning(
                    "%s holds an interrupted run into %s, but its data or this run's has no identity (a stream made "
                    "by a function, such as from_generator, map or filter, or shuffled): it is not resumed; starting "
                    "afresh.",
                    self.folder,
                    self.output_dir,
                )
            else:
                self._refuse_other_arguments(previous)
                return
        # Not resumable (a run that died before its prototypes existed), or discarded: start clean.
        for path in self.folder.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != _LOCK:
                path.unlink()

    def _refuse_other_arguments(self, previous: dict) -> None:
        """Raise ``ValueError`` naming what differs between ``previous`` arguments and this run's, if anything."""
        changed = sorted(
            key for key in previous.keys() | self._arguments.keys() if previous.get(key) != self._arguments.get(key)
        )
        if not changed:
            return
        details = "; ".join(
            "dataset: not the data it read (another dataset, or its files changed since)"
            if key == _DATA
            else f"{key}: {previous.get(key)!r} then, {self._arguments.get(key)!r} now"
            for key in changed
        )
        raise ValueError(
            f"{self.folder} holds an interrupted run into {self.output_dir} with other arguments ({details}). "
            "Run again with the same arguments on the same data to resume it, or pass fresh=True to discard it."
        )

    def _load_checkpoint(self) -> Checkpoint | None:
        if not (self.folder / _ARGUMENTS).exists():
            return None
        try:
            prototypes = Prototypes.load(self.folder / _CHECKPOINT_ARRAYS)
            details = json.loads((self.folder / _CHECKPOINT_DETAILS).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("The checkpoint of %s cannot be read (%s): starting afresh.", self.folder, error)
            return None
        sources = details.get("sources")
        return Checkpoint(
            prototypes=prototypes,
            prompts=details["prompts"],
            sizes=details["sizes"],
            sources=None if sources is None else np.asarray(sources, dtype=np.int64),
        )

    def save_checkpoint(self, checkpoint: Checkpoint, state=SINGLE_PROCESS) -> None:
        """Keep what steps 2-3 made (main process), after which the run is resumable."""
        if not state.is_main_process or self.checkpoint is not None:
            return
        buffer = io.BytesIO()
        checkpoint.prototypes.save(buffer)
        write_atomically(self.folder / _CHECKPOINT_ARRAYS, buffer.getvalue())
        sources = None if checkpoint.sources is None else np.asarray(checkpoint.sources).tolist()
        details = {"prompts": checkpoint.prompts, "sizes": checkpoint.sizes, "sources": sources}
        write_atomically(self.folder / _CHECKPOINT_DETAILS, json.dumps(details).encode())
        # The arguments are written last: a folder with them holds a whole checkpoint.
        write_atomically(self.folder / _ARGUMENTS, json.dumps(self._arguments, indent=1, sort_keys=True).encode())
        self.checkpoint = checkpoint

    def kept(self) -> str:
        """What an interrupted run leaves for the next one, in words."""
        if not (self.folder / _ARGUMENTS).exists():  # as close() decides
            return "nothing was kept (the prototypes did not exist yet): running it again starts over."
        images = self.images.count()
        return (
            f"the prototypes and {images} finished image{'s' * (images != 1)} are kept in {self.folder}: running it "
            "again with the same arguments resumes it."
        )

    def finish(self) -> None:
        """The output folder is in place: the work folder is no longer needed."""
        self._finished = True

    def close(self, state=SINGLE_PROCESS) -> None:
        """Undo one :meth:`lock`. The last one releases the lock and removes the work folder unless it holds an
        interrupted, resumable run."""
        self._holders = max(0, self._holders - 1)
        if self._holders or not state.is_main_process:
            return
        if self._finished or not (self.folder / _ARGUMENTS).exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        self._release()


# The RunState of an enclosing hold_run block, which a run into the same output uses instead of locking again.
_HELD: ContextVar[RunState | None] = ContextVar("hf_pds_held_run", default=None)


def claim_run(output_dir: str | os.PathLike, state=SINGLE_PROCESS) -> RunState:
    """The locked :class:`RunState` of ``output_dir``: the one of an enclosing :func:`hold_run` block, or a new one,
    locked now. Undo with its ``close``.

    Raises:
        RunInProgressError: another live run writes the same output folder.
    """
    held = _HELD.get()
    if held is not None and held.output_dir == Path(output_dir).expanduser().resolve():
        return held.lock(state)
    return RunState(output_dir).lock(state)


@contextmanager
def hold_run(output_dir: str | os.PathLike, state=SINGLE_PROCESS) -> Iterator[RunState]:
    """Lock the work folder of ``output_dir`` for the block, before its expensive steps (loading a dataset and a
    pipeline): a second run into ``output_dir`` is refused at once, and a run into it inside the block uses this lock
    (:func:`claim_run`) instead of conflicting with it.

    Raises:
        RunInProgressError: another live run writes the same output folder.
    """
    run = RunState(output_dir).lock(state)
    token = _HELD.set(run)
    try:
        yield run
    finally:
        _HELD.reset(token)
        run.close(state)


@contextmanager
def open_run(
    run: RunState | None, arguments: dict | None, fresh: bool = False, state=SINGLE_PROCESS
) -> Iterator[RunState | None]:
    """``run`` (locked: see :func:`claim_run`; None without an output folder) opened for the block with ``arguments``,
    what a resumed run must share with the interrupted one; closed after the block, or when it cannot be opened.

    An interruption (``KeyboardInterrupt``) in the block goes on as :class:`RunInterrupted`, and a full disk as a
    :class:`~hf_pds.errors.NoSpaceError`, each saying what was kept."""
    if run is None:
        yield None
        return
    try:
        run.open(arguments, fresh, state)
        yield run
    except KeyboardInterrupt as interrupt:
        raise RunInterrupted(run.kept()) from interrupt
    except NoSpaceError as error:
        raise NoSpaceError(f"{error} Of this run, {run.kept()}") from error
    finally:
        run.close(state)
