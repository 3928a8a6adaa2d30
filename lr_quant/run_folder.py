"""Output folders: checked before any work, one run per folder, one process at a time.

    check_not_input([out / "final.safetensors"], {"--model.checkpoint": path})
    with open_run_folder(out, resume="auto", force=False, need_bytes=n) as run:
        run.resume         # the checkpoint to continue from, None for a new run
        run.clear()        # --force: remove the previous run's files (right before writing)

`open_run_folder` checks, in this order and before any other work: `--resume` has a
checkpoint; the folder can be created and written and has `need_bytes` free; no other
process holds it (an exclusive `flock` on DIR/.lock, held until the block ends); it holds
no previous run (any of RUN_FILES) unless resuming or forced. Errors are `RunFolderError`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

__all__ = ["RunFolderError", "RUN_FILES", "run_files", "check_not_input", "check_output_folder",
           "run_folder_lock", "open_run_folder", "RunFolder", "same_file"]

PathLike = Union[str, os.PathLike]
# what `lr-quant train` and `lr-quant convert` write into their --output folder
RUN_FILES = ("recipe.yaml", "checkpoint.safetensors", "final.safetensors", "metrics.json",
             "history.csv", "history.json", "curves.png", "converted.safetensors",
             "conversion.txt")
LOCK_FILE = ".lock"
MIN_FREE_BYTES = 64 * 2**20


class RunFolderError(RuntimeError):
    """An output folder or path that cannot be used (the message says why and what to do)."""


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file (after symlinks; hard links too)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:   # one of them does not exist
        return False


def check_not_input(outputs: Iterable[PathLike], inputs: Dict[str, Optional[Any]]) -> None:
    """Refuse when an output path is one of the named input files (`{"--flag": path}`)."""
    for output in outputs:
        for flag, source in inputs.items():
            if source and Path(str(source)).expanduser().is_file() and same_file(output, source):
                raise RunFolderError(f"{output} would overwrite the input {flag} {source}; "
                                     f"write to another path (nothing was written)")


def run_files(folder: PathLike) -> List[str]:
    """The RUN_FILES present in `folder` (and their .tmp leftovers)."""
    folder = Path(folder)
    return [n for name in RUN_FILES for n in (name, name + ".tmp") if (folder / n).exists()]


def _megabytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def check_output_folder(folder: PathLike, need_bytes: int = MIN_FREE_BYTES) -> None:
    """Refuse a folder that cannot be created or written, or with less than `need_bytes`
    free (at least MIN_FREE_BYTES). Creates nothing."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"cannot create output folder {folder}: {existing} is a file")
    try:   # an anonymous file, removed on close: tests permissions and read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise RunFolderError(f"cannot write to {existing} (output {folder}): "
                             f"{e.strerror or e}") from e
    need = max(int(need_bytes), MIN_FREE_BYTES)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise RunFolderError(f"not enough free space for {folder}: about {_megabytes(need)} "
                             f"needed (one checkpoint), {_megabytes(free)} free")


@contextmanager
def run_folder_lock(folder: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (DIR/.lock) for the block; a second holder fails
    at once with RunFolderError. Folders it creates are removed again if left empty.
    No-op where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover
        yield
        return
    folder = Path(folder).absolute()
    created = [d for d in [folder, *folder.parents] if not d.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderError(
                f"{folder} is in use by another lr-quant process"
                f"{f' (pid {holder})' if holder else ''}; wait for it to finish or choose "
                f"another --output") from None
        try:   # the holder may have removed the file between open and flock: retry
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
        for d in created:   # folders made for the lock and left empty (a refused run)
            try:
                d.rmdir()
            except OSError:
                break


@dataclass
class RunFolder:
    """What `open_run_folder` yields: the checkpoint to resume (None: a new run)."""
    path: Path
    resume: Optional[Path]
    force: bool

    def clear(self) -> None:
        """With force: remove the previous run's files (RUN_FILES and .tmp leftovers)."""
        if self.force:
            for name in run_files(self.path):
                (self.path / name).unlink()


@contextmanager
def open_run_folder(folder: PathLike, resume: Optional[PathLike] = None, force: bool = False,
                    need_bytes: int = MIN_FREE_BYTES, lock: bool = True,
                    resumable: bool = True) -> Iterator[RunFolder]:
    """Check and lock the output folder of a run (module doc). resume: a checkpoint path, or
    "auto" for folder/checkpoint.safetensors. lock=False (other DDP ranks): resolve
    `resume` only. resumable: whether the error may suggest --resume."""
    folder = Path(folder)
    own = folder / "checkpoint.safetensors"
    if resume == "auto":
        if not own.is_file():
            raise RunFolderError(f"--resume: {own} does not exist, there is nothing to continue "
                                 f"in {folder}; start a new run without --resume")
        resume = own
    resume = Path(resume) if resume is not None else None
    inside = resume is not None and same_file(resume.parent, folder)
    if force and inside:
        raise RunFolderError(f"--force would delete {resume}, the checkpoint --resume "
                             f"continues; use one of them")
    if not lock:
        yield RunFolder(folder, resume, force)
        return
    check_output_folder(folder, need_bytes)
    with run_folder_lock(folder):
        previous = run_files(folder)
        if previous and not force and not inside:
            raise RunFolderError(
                f"{folder} holds a previous run ({', '.join(previous)}); "
                f"{'continue it with --resume, ' if resumable else ''}replace it with "
                f"--force, or choose another --output")
        yield RunFolder(folder, resume, force)
