"""File output: one overwrite policy, atomic writes, and no temp files left behind.

A model or report is either fully written or not there at all (temp file + ``os.replace``).
A writer killed mid-write (SIGKILL runs no cleanup) leaves its temp file; the next writer to
the same folder removes such files — only ones of this module's naming pattern whose writer
is dead or that are older than :data:`STALE_TEMP_SECONDS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError, OutputExistsError

#: A temp file older than this is stale whatever its pid says (a writer on another host).
STALE_TEMP_SECONDS = 3600.0
TEMP_SUFFIX = ".hdrq-tmp"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
_TEMP_PATTERN = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")


def check_outputs(inputs: Iterable[str | os.PathLike | None], outputs: Iterable[str | os.PathLike | None],
                  overwrite: bool = False) -> None:
    """The one overwrite policy of every writer, checked before any work starts.

    An output that resolves to one of the inputs is always refused (a command never destroys
    what it reads); an existing output is refused unless ``overwrite``; a folder is never an output.
    """
    sources = {}
    for item in inputs:
        if item is None or str(item).startswith("domain:"):
            continue
        sources[Path(item).resolve()] = item
    for item in outputs:
        if item is None:
            continue
        path = Path(item)
        resolved = path.resolve()
        if resolved in sources or any(_same_file(resolved, src) for src in sources):
            raise OutputExistsError(f"refusing to write {path}: it is an input of this command")
        if path.is_dir():
            raise OutputExistsError(f"output {path} is a directory; give a file name")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"output {path} exists; pass --overwrite to replace it")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and fail early, with its name, if it cannot be written."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create output folder {path}: {err.strerror or err}") from err
    if not path.is_dir():
        raise InputError(f"output folder {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {path} is not writable")
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove temp files a killed writer left in ``folder`` (this module's pattern only).

    A file is stale when its writer (pid, same host) is gone, or when it is older than
    :data:`STALE_TEMP_SECONDS`. Returns what was removed.
    """
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _TEMP_PATTERN.match(entry.name)
            if not match or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                dead = match["host"] == _HOST and not _pid_alive(int(match["pid"]))
                if dead or now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, OSError):
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The temporary file lives in the destination folder so the final ``os.replace`` is atomic
    on POSIX. On any exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    if final.exists() and final.is_dir():
        raise OutputExistsError(f"output {final} is a directory; give a file name")
    folder = ensure_writable_dir(final.parent if str(final.parent) else ".")
    remove_stale_temp_files(folder)
    tmp = folder / f".{final.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as err:
        raise OSError(f"cannot write into {folder} for {final.name}: {err.strerror or err}") from err
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {final}")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_torch_atomic(path: str | os.PathLike, payload: Any, *, overwrite: bool = True) -> Path:
    """``torch.save`` atomically and byte-reproducibly.

    Saved through a file object, torch names the zip's top folder ``archive``; saved to a path,
    it uses the file's stem — the random temp name — so two identical saves differed.
    """
    import torch

    with atomic_write_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (a model file need not fit twice in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
