"""
Files and downloads, as every script needs them: writes that never leave half a file, and downloads that are
checked against a sha256, resume where they stopped, try mirrors in order and show their progress.

No torch here: prepare.py and tokenizer.py use this module and start in a fraction of a second.
"""

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import requests

from cli import UserError

# ----------------------------------------------------------------------------- writing files


def atomic_write(path, write):
    """Call write(temporary path), then rename the result over `path`: readers (and a crash) see the old file or
    the new one, never half of one. A write that fails leaves no temporary file behind.

        atomic_write("ckpt.pt", lambda tmp: torch.save(checkpoint, tmp))
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path, data):
    """Write data as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an advisory lock on `folder` (made if missing) while the block runs: a second process that asks for it
    gets a UserError naming the first one's PID. The lock file, folder/.lock, goes when the lock does, and so does
    a folder made for it that is still empty. (Where there is no fcntl, as on Windows, nothing is locked.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 20).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{folder} is in use by another run (PID {holder}): wait for it to end, or choose another "
                        f"--out_dir")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made and not any(folder.iterdir()):
            folder.rmdir()

# ----------------------------------------------------------------------------- downloads


class Progress:
    """A one-line progress report on stderr, redrawn at most 5 times a second (every 30 s into a log file)."""

    def __init__(self, desc, total, unit_name="MB"):
        self.desc, self.total, self.unit_name, self.last, self.done_drawn = desc, total, unit_name, 0.0, None
        self.interval = 0.2 if sys.stderr.isatty() else 30.0

    def update(self, done, force=False):
        if (force and done != self.done_drawn) or time.time() - self.last > self.interval:
            self.last, self.done_drawn = time.time(), done
            size = f"{done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f}" if self.total else "")
            pct = f"{100 * done / self.total:3.0f}% " if self.total else ""
            print(f"\r{self.desc}: {pct}({size} {self.unit_name})", end="", file=sys.stderr, flush=True)

    def close(self, done):
        self.update(done, force=True)
        print(file=sys.stderr)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url, part, desc):
    """Stream url into `part`, continuing an existing partial file with an HTTP Range request if the server can."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte ranges and lengths must refer to the file itself
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=30) as r:
        if have and r.status_code == 416:  # nothing left to send: the .part is complete (the checksum decides)
            return
        resumed = have > 0 and r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if not resumed and r.status_code != 200:
            raise requests.HTTPError(f"HTTP {r.status_code} {r.reason}")
        have = have if resumed else 0
        length = r.headers.get("Content-Length")
        total = have + int(length) if length else None
        progress = Progress(desc, total)
        with open(part, "ab" if resumed else "wb") as f:
            for block in r.iter_content(1 << 16):
                f.write(block)
                have += len(block)
                progress.update(have)
        progress.close(have)
        if total and have < total:
            raise requests.ConnectionError(f"connection closed after {have:,} of {total:,} bytes")


def short_error(e):
    """The message of a network error, or its class name where the message runs to hundreds of characters
    (urllib3's do)."""
    text = str(e)
    return text if len(text) < 100 else type(e).__name__


def download(url_or_urls, dest, sha256=None, desc=None, offline_hint=""):
    """Fetch a file to `dest`, trying mirror URLs in order; check its sha256, then rename it into place. Returns dest.

    A file already at dest with the right checksum is reused, one with the wrong checksum is fetched again. Bytes go to
    dest + ".part" first, so an interrupted download resumes next time and dest never holds a partial file.
    `offline_hint` tells the user how to do without the network (e.g. "pass --source=DIR ...").
    """
    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    dest, desc = Path(dest), desc or Path(dest).name
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            return dest
        print(f"{dest} fails its sha256 check: fetching it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problems = []
    for url in urls:
        for _ in range(2):  # the second try resumes an interrupted transfer, or restarts after a stale .part
            had = part.stat().st_size if part.exists() else 0
            try:
                _fetch(url, part, desc)
            except requests.RequestException as e:
                problems.append(f"{url}: {short_error(e)}")
                if part.exists() and part.stat().st_size > had:
                    continue  # it was making progress: pick up where it stopped
                break
            if sha256 is None or sha256_of(part) == sha256:
                os.replace(part, dest)
                return dest
            part.unlink()
            problems.append(f"{url}: sha256 mismatch")
            if not had:
                break  # a fresh copy was wrong: this mirror serves another file
    raise UserError(f"could not download {desc} ({'; '.join(problems)}); "
                    f"{offline_hint or f'download it yourself to {dest}'}")
