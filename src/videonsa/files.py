"""Writing files so that a reader never sees half of one: atomic writes, staging folders, umask modes; and reading
JSON Lines.

Shared by every part of the package that writes (checkpoint conversion, training, evaluation, analysis), so it
depends on nothing of theirs; docs/model-files.md, "Writing files", describes the guarantees.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: abandoned temporaries are not cleaned up
    fcntl = None

_TEMPORARY_SUFFIX = ".tmp"
# A temporary file younger than this is never removed by another writer, even if unlocked: it may belong to a
# writer between creating it and locking it.
_ABANDONED_AFTER_SECONDS = 5.0


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(temporary_path) and rename the result onto `path`, so `path` is either the old or the new file.

    The temporary file is created empty in `path`'s folder with the permissions a plain `open` would give (0666
    less the umask), and `write` may reopen or truncate it by name. It is removed if `write` or the rename
    fails; one left by a writer that was killed (SIGKILL, power loss) is removed by the next write to `path`
    (docs/model-files.md, "Writing files").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(path)
    temporary, lock = _create_locked_temporary(path)
    try:
        write(str(temporary))
        _settle(temporary, lock)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)
    _fsync_folder(path.parent)


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux /proc), else by setting
    and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(folder: str | Path) -> None:
    """Give every regular file in `folder` (not in its subfolders) the mode a plain `open` gives (0666 less the
    umask).

    For folders written by libraries that create private files: transformers' `save_pretrained` writes
    model.safetensors through safetensors, which makes it 0600, so a checkpoint would be unreadable to the
    collaborators the umask allows."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)

    atomic_write(path, write)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _create_locked_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file next to `path`, created with mode 0666 (the umask applies, as for `open`) and held under
    an exclusive lock for as long as the returned descriptor is open: the lock tells other writers it is alive."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        temporary = path.parent / f"{_temporary_prefix(path)}{secrets.token_hex(8)}{_TEMPORARY_SUFFIX}"
        try:
            descriptor = os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        return temporary, descriptor


def _remove_abandoned_temporaries(path: Path) -> None:
    """Remove temporaries of `path` whose writer is gone: unlocked, and not just created."""
    _remove_abandoned(path.parent, _temporary_prefix(path), _TEMPORARY_SUFFIX)


def _remove_abandoned(folder: Path, prefix: str, suffix: str) -> None:
    """Remove the files or folders `prefix` + 16 hex digits + `suffix` in `folder` that no live writer holds
    locked and that are older than `_ABANDONED_AFTER_SECONDS`."""
    if fcntl is None:
        return
    for candidate in folder.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(suffix) and len(name) == len(prefix) + 16 + len(suffix)):
            continue
        try:
            descriptor = os.open(candidate, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if time.time() - os.fstat(descriptor).st_mtime < _ABANDONED_AFTER_SECONDS:
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def staging_folder(destination: str | Path) -> Iterator[Path]:
    """A new empty folder beside `destination` to fill and then rename onto it (`os.replace(staging,
    destination)` inside the `with`).

    It gets the permissions `mkdir` gives (0777 less the umask; `tempfile.mkdtemp` would make it 0700) and is
    locked while the `with` runs; on an exception it is removed. Staging folders of `destination` left by a
    killed process are removed first, as `atomic_write` does for files.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{destination.name}.partial-"
    _remove_abandoned(destination.parent, prefix, "")
    while True:
        staging = destination.parent / f"{prefix}{secrets.token_hex(8)}"
        try:
            staging.mkdir(mode=0o777)
        except FileExistsError:
            continue
        break
    lock = os.open(staging, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _settle(temporary: Path, lock: int) -> None:
    """Flush the written file to disk, with the mode the temporary was created with: some writers (safetensors'
    `save_file`) replace the file at the path they are given by their own, created 0600."""
    created = os.fstat(lock)
    descriptor = os.open(temporary, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        written = os.fstat(descriptor)
        if (written.st_dev, written.st_ino) != (created.st_dev, created.st_ino):
            os.fchmod(descriptor, stat.S_IMODE(created.st_mode))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: not every platform or file system can open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_json(path: str | Path, value: Any) -> None:
    """Write `value` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text. They end at "\\n" only: str.splitlines also splits at U+2028 and U+0085,
    which json.dumps(ensure_ascii=False) writes raw inside strings."""
    return text.split("\n")
