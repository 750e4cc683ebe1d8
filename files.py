"""
Files in and out, and long work on them: the text files a user names (read as UTF-8, or one line
that says what is wrong), the files a script writes (atomically: a crash leaves the old file or the
new one, never half of one), the folder it writes into (checked before any work, locked while it
works), progress lines, and a file's sha256.

    text = read_utf8("prompt.txt", "the prompt file")  # or UserError("... is not UTF-8 text ...")
    write_json("out/config.json", settings)           # whole, or not at all
    with folder_lock("out"):                          # a second run on "out": refused in one line
        ...
"""

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from cli import UserError


def decode_utf8(data, name):
    """bytes -> str, or a UserError naming the file: b'caf\\xc3\\xa9' -> 'café'."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text (byte {e.start}); convert it first")


def read_utf8(path, what="file"):
    """The text of a UTF-8 file the user named, or a UserError that says what is wrong with it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}")
    return decode_utf8(data, f"{what} {path}")


def atomic_write(path, write):
    """Call write(temporary path), then rename the result over `path`: readers (and a crash) see the
    old file or the new one, never half of one. A write that fails leaves no temporary file behind.

        atomic_write("ckpt.pt", lambda tmp: torch.save(checkpoint, tmp))
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        # atomic on POSIX and Windows
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path, data):
    """Write data as indented JSON, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable(path, flag, folder=True):
    """Refuse, before any work, an output path this script could not write: a file where the folder
    should be, or a folder (the one named, else the nearest above it that exists) the user may not
    write into. folder=False: path is a file to write.

        check_writable("README.md", "out_dir") -> UserError("--out_dir=README.md is a file: ...")
    """
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--{flag}={path} is a file: choose a folder")
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--{flag}={path}: {folder} is read-only here: "
                        f"choose a folder you can write into")


@contextlib.contextmanager
def folder_lock(folder, flag="out_dir"):
    """Hold an advisory lock on `folder` (made if missing) while the block runs: a second process
    that asks for it gets a UserError naming the first one's PID (and --flag, the setting that
    names the folder). The lock file, folder/.lock, goes
    when the lock does, and so do the folders made for it that are still empty. (Where there is no
    fcntl, as on Windows, nothing is locked.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    # deepest first: the folders to remove afterwards if they are empty
    made = [f for f in (folder, *folder.parents) if not f.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 20).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{folder} is in use by another run (PID {holder}): wait for it to "
                            f"end, or choose another --{flag}")
        # the run before may have removed the file between our open and our lock: lock the new one
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        with contextlib.suppress(OSError):
            for empty in made:
                empty.rmdir()


# ----------------------------------------------------------------------------- progress lines

def duration(seconds):
    """75.4 -> '1m15s'; 4000 -> '1h06m'."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A progress line on stderr with the rate and an ETA, redrawn at most 5 times a second on a
    terminal and every 10 s into a log file:

        encoding train: 45% (4.9/10.8 MB, 3.1 MB/s, eta 0m02s)
    """

    def __init__(self, desc, total, unit="MB", scale=1e6):
        self.desc, self.total, self.unit, self.scale = desc, total, unit, scale
        self.start = self.last = time.time()
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.interval = 0.2 if self.tty else 10.0

    def update(self, done, force=False):
        self.done, now = done, time.time()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        digits = 0 if self.scale == 1 else 1
        size = f"{done / self.scale:,.{digits}f}"
        if self.total:
            size += f"/{self.total / self.scale:,.{digits}f}"
        share = f"{100 * done / self.total:3.0f}% " if self.total else ""
        text = f"{self.desc}: {share}({size} {self.unit}, {rate / self.scale:,.1f} {self.unit}/s"
        if self.total and rate > 0 and done < self.total:
            text += f", eta {duration((self.total - done) / rate)}"
        end = "" if self.tty else "\n"
        print(("\r" if self.tty else "") + text + ")", end=end, file=sys.stderr, flush=True)

    def close(self, done):
        self.update(done, force=True)
        if self.tty:
            print(file=sys.stderr)


def sha256_of(path):
    """The sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
