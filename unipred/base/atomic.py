"""Atomic file writes whose result has the permissions any other new file of the user gets.

A file is written under a temporary name in its destination folder, flushed to disk and
renamed over the destination, so a reader never sees half a file. ``tempfile.mkstemp`` creates
its file with mode 0600 whatever the umask (it is meant to be private), and a rename keeps the
mode: every exported model would be unreadable to the other users of a shared file system.
So the temporary file is given ``0666 & ~umask`` (0644 under the usual umask 022) before
the rename, as ``open(path, "w")`` would have done.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    set-and-restore idiom."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(dest: str | os.PathLike, write) -> Path:
    """``write(tmp_path)`` then fsync, chmod to the umask's mode and rename onto ``dest``; a
    failure leaves ``dest`` as it was and no temporary behind."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
