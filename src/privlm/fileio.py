"""Safe file writes.

* Atomic writes: every file of a run directory or data cache is written to a temporary name in the same
  directory, fsynced and renamed, so a reader (or a run killed with SIGKILL) never sees a partial file; a failed
  write (disk full, a kill's exception) removes its temporary file.
* Containment: `RunDirectory` is the one way privlm writes, appends, truncates, deletes and locks under a run,
  sweep or export directory. Nothing it touches may be a symbolic link or lie outside the directory, so a run
  directory received from someone else cannot make privlm write, truncate or delete anything elsewhere; a
  refusal is one `UnsafePathError` line naming the path.
* Permissions: files are created with the user's umask (0666 & ~umask, directories 0777 & ~umask), like other
  ML tools, including those that libraries (safetensors) or `tempfile` would create 0600/0700.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Any

from privlm.errors import UnsafePathError

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def slug(text: str) -> str:
    """File-name-safe form of a run or sweep name: 'EReg(SM(t)+ScFuFFN)' -> 'ereg-sm-t-scfuffn'
    ('.' and '=' are kept so that 'lr=0.001' stays readable)."""
    return re.sub(r"[^a-z0-9.=]+", "-", text.lower()).strip("-") or "run"


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refuse_link(path: Path) -> None:
    """UnsafePathError if ``path`` is a symbolic link (an existing one: the name is checked, not its target)."""
    if os.path.islink(path):
        raise UnsafePathError(f"'{path}' is a symbolic link; privlm does not write through links "
                              f"(replace it with a regular file or directory, or choose another path)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + fsync + rename; creates the parent directory. The
    destination may not be a symbolic link (it is refused, never followed or silently replaced); on any
    failure (disk full, interrupt) the temporary file is removed and the destination is unchanged."""
    path = Path(path)
    _refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600 files; run files are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file: name it
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def use_umask(path: Path) -> None:
    """Give ``path`` (a file or a whole tree) the modes of the user's umask: safetensors writes 0600 files and
    `tempfile` 0700 directories, but run directories and exports are ordinary files a colleague may read."""
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, DIR_MODE)
        elif stat.S_ISREG(st.st_mode):
            os.chmod(p, FILE_MODE)


def path_state(path: Path) -> os.stat_result | None:
    """lstat of ``path``, None when it does not exist; a permission problem is raised as such (a
    PermissionError naming the path), never mistaken for a missing file."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_accessible(path: Path) -> None:
    """Raise PermissionError ('Permission denied: PATH') when ``path`` or a directory above it cannot be read
    (so that the caller's "missing" message is never the answer to a permission problem)."""
    path = Path(path)
    for p in [*reversed(path.parents), path]:
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):  # missing: the caller's own message says so
            return
        except PermissionError:
            raise PermissionError(errno.EACCES, "Permission denied", str(p)) from None
        need = os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
        if not os.access(p, need, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))


def _raise(exc: OSError) -> None:
    raise exc


class RunDirectory:
    """A run, sweep or export directory as the root of everything privlm writes under it.

    ``path(*parts)`` is the only way to name something inside: no part may be '..' or absolute, and no existing
    component below the root may be a symbolic link, so the path cannot resolve outside the root (the root itself
    is what the user named and may be a link). Opens that modify a file in place (append, lock) also use
    O_NOFOLLOW and refuse files with other hard links; deletions refuse links and use `shutil.rmtree`'s
    descriptor-based walk, which never follows a link inside the tree.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.root)!r})"

    def path(self, *parts: str | Path) -> Path:
        rel = Path(*parts) if parts else Path()
        if rel.is_absolute() or ".." in rel.parts:
            raise UnsafePathError(f"'{rel}' is not a path inside '{self.root}'")
        cur = self.root
        for part in rel.parts:
            cur = cur / part
            st = path_state(cur)
            if st is None:
                break
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(f"'{cur}' is a symbolic link; privlm does not write through links in "
                                      f"'{self.root}' (they could point outside it); remove the link")
        return self.root / rel

    def check_tree(self, foreign: tuple[str, ...] = ()) -> None:
        """Refuse a directory holding any symbolic link (privlm never creates one; a directory received from
        someone else could use one to make a resume write, truncate or delete files elsewhere). ``foreign``
        names top-level subdirectories whose contents another tool manages (submitit's job folder holds its own
        links): they must not be links themselves, but their contents are not checked."""
        if not self.root.is_dir():  # missing, or a file (whoever wants a directory there says so)
            return
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False, onerror=_raise):
            if Path(dirpath) == self.root:
                skipped = [d for d in dirnames if d in foreign and not os.path.islink(Path(dirpath) / d)]
                dirnames[:] = [d for d in dirnames if d not in skipped]
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                if os.path.islink(p):
                    raise UnsafePathError(f"'{p}' is a symbolic link; privlm does not write into a directory "
                                          f"holding links (they could point outside '{self.root}'); remove it")

    def mkdir(self, *parts: str | Path) -> Path:
        p = self.path(*parts)
        p.mkdir(parents=True, exist_ok=True)
        if not p.is_dir() or p.is_symlink():
            raise UnsafePathError(f"'{p}' is not a directory")
        return p

    def write_text(self, rel: str | Path, text: str) -> Path:
        p = self.path(rel)
        atomic_write_text(p, text)
        return p

    def write_bytes(self, rel: str | Path, data: bytes) -> Path:
        p = self.path(rel)
        atomic_write_bytes(p, data)
        return p

    def write_json(self, rel: str | Path, obj: Any, indent: int = 2) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=indent) + "\n")

    def _open_in_place(self, rel: str | Path, flags: int) -> tuple[int, Path]:
        p = self.path(rel)
        try:
            fd = os.open(p, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"'{p}' is a symbolic link; privlm does not write through links") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"has {st.st_nlink} hard links"
            raise UnsafePathError(f"'{p}' {what}; privlm modifies only its own files in '{self.root}'")
        return fd, p

    def open_append(self, rel: str | Path) -> IO[str]:
        """A text file opened for appending (created if missing), never through a link."""
        fd, _ = self._open_in_place(rel, os.O_WRONLY | os.O_APPEND)
        return os.fdopen(fd, "a", encoding="utf-8")

    def open_lock(self, rel: str | Path) -> int:
        """A descriptor (read/write, created if missing, never through a link) for a lock file."""
        fd, _ = self._open_in_place(rel, os.O_RDWR)
        return fd

    def remove(self, *parts: str | Path) -> None:
        """Delete a file or a whole directory inside the root (never a link's target; missing is fine)."""
        p = self.path(*parts)
        st = path_state(p)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
        else:
            p.unlink()

    def entries(self, *parts: str | Path, pattern: str = "*") -> list[Path]:
        """Entries of a subdirectory matching ``pattern``, as paths relative to the root (none when it does not
        exist); every entry is checked like `path` (a link among them is refused)."""
        d = self.path(*parts)
        if path_state(d) is None:
            return []
        rel = Path(*parts) if parts else Path()
        found = [rel / p.name for p in sorted(d.glob(pattern))]
        for r in found:
            self.path(r)
        return found


def strict_json(obj: Any, **kwargs) -> str:
    """JSON that every parser accepts: NaN and +-Infinity (not JSON) become null."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """`atomic_write_text` of JSON."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
