"""Where a build writes before its artifact exists, and how it moves into place.

A build writes into a temporary sibling ``.NAME.tmp-PID@HOST-XXXXXXXX`` of the output ``NAME``
and renames it into place, so no reader ever sees half an artifact. Interrupted in Python (an
error, SIGINT, SIGTERM: ``kvcompile.cli`` turns both signals into exceptions) the build
removes its temporary itself. Killed outright (SIGKILL, a lost machine), it cannot: the next
build into the same place removes the temporaries whose process is gone, which the PID and
host in the name tell. A temporary of a live process, of another host, or without a PID in its
name (made by an older kvcompile) is never touched.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from kvcompile.interrupts import signals_deferred
from kvcompile.yamlio import current_umask

TEMPORARY = "tmp"  # a build's files, renamed to the output when complete
REPLACED = "old"  # the artifact a --force build replaces, removed once the new one is in place
# errno codes and their Rust spelling (safetensors reports I/O errors as "(os error 28)")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


def host_name() -> str:
    """This machine's name as it appears in temporary names (no '/' or '-' ambiguity)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def make_temporary(out_dir: Path, kind: str = TEMPORARY) -> Path:
    """A new empty ``.NAME.KIND-PID@HOST-XXXXXXXX`` beside ``out_dir``, with the umask's mode."""
    prefix = f".{out_dir.name}.{kind}-{os.getpid()}@{host_name()}-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    os.chmod(path, 0o777 & ~current_umask())  # mkdtemp makes 0700; artifacts are shared
    return path


def _owner(path: Path, out_dir: Path) -> tuple[int, str] | None:
    """The (pid, host) in a temporary's name, or None if ``path`` is not one of ``out_dir``'s."""
    pattern = (rf"\.{re.escape(out_dir.name)}\.(?:{TEMPORARY}|{REPLACED})"
               rf"-(\d+)@([A-Za-z0-9._]+)-[A-Za-z0-9_]+")
    match = re.fullmatch(pattern, path.name)
    return (int(match.group(1)), match.group(2)) if match else None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine (in doubt: yes, so nothing live is removed)."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def stale_temporaries(out_dir: Path) -> list[Path]:
    """The temporaries beside ``out_dir`` whose build ran on this host and is gone."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    stale = []
    here = host_name()
    for path in sorted(out_dir.parent.iterdir()):
        owner = _owner(path, out_dir)
        if owner is not None and owner[1] == here and not process_alive(owner[0]) \
                and path.is_dir() and not path.is_symlink():
            stale.append(path)
    return stale


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove what :func:`stale_temporaries` finds; returns the removed paths."""
    removed = []
    for path in stale_temporaries(out_dir):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the complete ``tmp`` to ``out_dir``, replacing an existing ``out_dir``; a signal
    waits until both renames are done (then the replaced artifact is still removed)."""
    trash: Path | None = None
    try:
        with signals_deferred():
            if not out_dir.exists():
                tmp.rename(out_dir)
                return
            trash = make_temporary(out_dir, REPLACED)
            out_dir.rename(trash / "old")
            try:
                tmp.rename(out_dir)
            except BaseException:
                (trash / "old").rename(out_dir)  # the old artifact stays what the output holds
                trash.rmdir()
                trash = None
                raise
    finally:
        if trash is not None:
            with signals_deferred():
                shutil.rmtree(trash, ignore_errors=True)


def is_disk_full(exc: BaseException, directory: Path | None = None) -> bool:
    """A write failed for lack of space: ENOSPC/EDQUOT raised as it is or wrapped (safetensors
    raises its own error naming the OS error), or, with ``directory``, any I/O error while its
    device has (next to) no space left (numpy reports a short write without an errno). Ask
    before removing what was written, while the disk is still full."""
    seen: set[int] = set()
    io_error = False
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        io_error = io_error or isinstance(current, OSError)
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return True
        if any(f"(os error {code})" in str(current) for code in _DISK_FULL):
            return True
        current = current.__cause__ or current.__context__
    if directory is None or not io_error:  # a failed check or a signal is not a full disk
        return False
    try:
        return shutil.disk_usage(directory).free < _NEARLY_FULL
    except OSError:
        return False
