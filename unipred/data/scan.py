"""Folder scans that terminate and count every file once, for the readers of any modality.

A data folder is a tree a user made by hand, a sync tool or a script of symlinks. Walking it
naively (``os.walk(followlinks=True)``) loops forever on a link to a parent folder (or, with
the loop detection of ``os.walk``, returns its files once per lap), counts a file reached by
two paths twice, and hangs on a FIFO named like an image. :func:`walk_files` is the walk every
folder reader uses:

* a symlink (to a file or a folder) is followed only when its target lies inside the data
  root, unless following all links was asked for (``data.follow_symlinks: true``); a folder
  already visited (a loop) is never entered again;
* every file is listed once, by its identity (device, inode): a second path to the same file
  (a symlink, a hard link) is left out;
* only regular files are listed: FIFOs, sockets and devices are left out (opening a FIFO
  blocks forever);
* what was left out is summed in a :class:`ScanReport` the reader logs in one line.

:func:`read_regular` reads a file the same way later (a path replaced by a FIFO after the scan
raises instead of blocking).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# process-wide: follow symlinks that leave the data root (LitTask sets it from
# data.follow_symlinks before any dataset is built; False is the safe default)
_POLICY = {"follow_outside": False}


def set_follow_symlinks(follow_outside: bool) -> None:
    """Follow symlinks whose target leaves the data root (``data.follow_symlinks``)."""
    _POLICY["follow_outside"] = bool(follow_outside)


@dataclass
class ScanReport:
    """What a scan left out, by kind (logged once per reader, never silent)."""

    outside: int = 0  # symlinks leading out of the data root
    loops: int = 0  # symlinks to a folder already being walked
    duplicates: int = 0  # a second path to a file already listed
    special: int = 0  # FIFOs, sockets, devices
    broken_links: int = 0  # symlinks to nothing
    unreadable: int = 0  # folders that could not be listed
    examples: list[str] = field(default_factory=list)

    def note(self, kind: str, path: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 3:
            self.examples.append(path)

    def line(self) -> str:
        """'' when nothing was left out, else one line of counts."""
        parts = [
            (self.outside, "symlinks leaving the data folder (data.follow_symlinks=true follows them)"),
            (self.loops, "symlinks looping back to a folder already walked"),
            (self.duplicates, "second paths to a file already listed"),
            (self.special, "special files (FIFO, socket, device)"),
            (self.broken_links, "broken symlinks"),
            (self.unreadable, "folders that could not be listed"),
        ]  # fmt: skip
        said = [f"{n} {what}" for n, what in parts if n]
        if not said:
            return ""
        return f"left out {', '.join(said)} (e.g. {', '.join(self.examples)})"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def symlink_allowed(path: str, data_root: str) -> bool:
    """False for a symlink leading out of ``data_root`` (unless following them was asked)."""
    if _POLICY["follow_outside"] or not os.path.islink(path):
        return True
    return _inside(os.path.realpath(path), os.path.realpath(data_root))


class Scan:
    """One walk over the folders of a data root (e.g. its class folders), sharing what was
    seen: files and folders reached by a real path are listed first, then those reached
    through symlinks (so a link into another class folder never takes the file from its
    own class), each file and folder once."""

    def __init__(self, data_root: str, follow_outside: bool | None = None,
                 report: ScanReport | None = None):  # fmt: skip
        self.real_root = os.path.realpath(data_root)
        self.follow_outside = (
            _POLICY["follow_outside"] if follow_outside is None else follow_outside
        )
        self.report = report if report is not None else ScanReport()
        self.files: list[tuple[str, object]] = []
        self._seen_files: set[tuple[int, int]] = set()
        self._seen_dirs: set[tuple[int, int]] = set()
        self._links: list[tuple[str, object, tuple[int, int], bool]] = []
        try:
            st = os.stat(data_root)
            self._seen_dirs.add((st.st_dev, st.st_ino))  # a link back to the root is a loop
        except OSError:
            pass

    def add(self, folder: str, tag: object = None) -> None:
        """Walk ``folder`` (its files get ``tag``, e.g. a class index)."""
        try:
            st = os.stat(folder)
        except OSError:
            self.report.note("unreadable", folder)
            return
        ident = (st.st_dev, st.st_ino)
        if ident in self._seen_dirs and os.path.realpath(folder) != self.real_root:
            self.report.note("loops", folder)
            return
        self._seen_dirs.add(ident)
        self._walk(folder, tag)

    def _walk(self, folder: str, tag) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            self.report.note("unreadable", folder)
            return
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            path = os.path.join(folder, e.name)
            try:
                link = e.is_symlink()
                if link and not self.follow_outside:
                    if not _inside(os.path.realpath(path), self.real_root):
                        self.report.note("outside", path)
                        continue
                st = os.stat(path)  # follows a link
            except OSError:
                self.report.note("broken_links" if e.is_symlink() else "unreadable", path)
                continue
            ident, is_dir = (st.st_dev, st.st_ino), stat.S_ISDIR(st.st_mode)
            if not is_dir and not stat.S_ISREG(st.st_mode):
                self.report.note("special", path)
            elif link:
                self._links.append((path, tag, ident, is_dir))  # after every real path
            elif is_dir:
                if ident in self._seen_dirs:  # a bind mount or a hard-linked folder
                    self.report.note("loops", path)
                else:
                    self._seen_dirs.add(ident)
                    subdirs.append(path)
            elif ident in self._seen_files:  # a hard link to a file already listed
                self.report.note("duplicates", path)
            else:
                self._seen_files.add(ident)
                self.files.append((path, tag))
        for d in subdirs:
            self._walk(d, tag)

    def finish(self) -> list[tuple[str, object]]:
        """The (path, tag) of every file, real paths first (walk order), then the files and
        folders reached only through links."""
        while self._links:
            links, self._links = self._links, []
            for path, tag, ident, is_dir in links:
                if is_dir:
                    if ident in self._seen_dirs:
                        self.report.note("loops", path)
                        continue
                    self._seen_dirs.add(ident)
                    self._walk(path, tag)
                elif ident in self._seen_files:
                    self.report.note("duplicates", path)
                else:
                    self._seen_files.add(ident)
                    self.files.append((path, tag))
        return self.files


def walk_files(root: str, report: ScanReport | None = None,
               follow_outside: bool | None = None) -> list[str]:  # fmt: skip
    """Every regular file under ``root`` once (see the module docstring), real paths in
    sorted depth-first order, then files reached only through symlinks."""
    scan = Scan(root, follow_outside, report)
    scan.add(root)
    return [p for p, _ in scan.finish()]


def once_each(items: list[tuple], data_root: str, report: ScanReport | None = None) -> list:
    """``items`` (``(path, ...)`` tuples) without a second path to the same file or folder:
    the path that is not a symlink is kept (so a link into another class folder never takes
    the clip from its own class), else the first; order is kept."""
    report = report if report is not None else ScanReport()
    first: dict[tuple[int, int], int] = {}
    for k, it in enumerate(items):
        try:
            st = os.stat(it[0])
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident not in first or (os.path.islink(items[first[ident]][0])
                                  and not os.path.islink(it[0])):  # fmt: skip
            first[ident] = k
    keep = set(first.values())
    for k, it in enumerate(items):
        if k not in keep:
            report.note("duplicates", str(it[0]))
    return [it for k, it in enumerate(items) if k in keep]


def list_dir(folder: str, report: ScanReport | None = None,
             data_root: str | None = None) -> list[os.DirEntry]:  # fmt: skip
    """The non-hidden entries directly in ``folder`` (sorted by name) that are regular files
    or folders, no link leading out of ``data_root`` (default: ``folder``) unless following
    all links was asked for: the link rules of :func:`walk_files`."""
    report = report if report is not None else ScanReport()
    real = os.path.realpath(data_root or folder)
    out = []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if e.name.startswith("."):
            continue
        path = os.path.join(folder, e.name)
        try:
            if e.is_symlink() and not _POLICY["follow_outside"]:
                if not _inside(os.path.realpath(path), real):
                    report.note("outside", path)
                    continue
            st = os.stat(path)
        except OSError:
            report.note("broken_links", path)
            continue
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            out.append(e)
        else:
            report.note("special", path)
    return out


def read_regular(path: str) -> bytes:
    """The bytes of ``path``, refusing anything that is not a regular file (``OSError``)
    without opening it: a FIFO or device put where a file was scanned never blocks a worker."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def log_classes(root: str, labels: list[int], classes: list[str], what: str = "files") -> str:
    """Log (and return) one line: the number of files per class of a folder that starts
    being read, so a class doubled by a link or emptied by a failed sync shows at once."""
    per = Counter(labels)
    shown = [f"{c}: {per.get(i, 0)}" for i, c in enumerate(classes)]
    if len(shown) > 20:
        shown = shown[:20] + [f"... ({len(classes) - 20} more)"]
    line = f"{root}: {len(labels)} {what} in {len(classes)} classes ({', '.join(shown)})"
    if not classes:
        line = f"{root}: {len(labels)} {what} (unlabelled)"
    empty = [c for i, c in enumerate(classes) if not per.get(i)]
    if empty:
        line += f"; no files in class folders {empty[:5]}"
    log.info(line)
    return line
