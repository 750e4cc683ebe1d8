"""
Downloads that are checked against a sha256, resume where they stopped, try mirrors in order and
show their progress; a file that fails its check never lands under its name.

    download(["https://mirror-a/f.zip", "https://mirror-b/f.zip"], "data/cache/f.zip",
             sha256="ef7e...")
"""

import os
import sys
from pathlib import Path

import requests

from cli import UserError
from files import Progress, sha256_of


def _fetch(url, part, desc):
    """Stream url into `part`, continuing an existing partial file with an HTTP Range request if
    the server can."""
    have = part.stat().st_size if part.exists() else 0
    # byte ranges and lengths must refer to the file itself
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=30) as r:
        # nothing left to send: the .part is complete (the checksum decides)
        if have and r.status_code == 416:
            return
        content_range = r.headers.get("Content-Range", "")
        resumed = have > 0 and r.status_code == 206 and content_range.startswith(f"bytes {have}-")
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
    """The message of a network error, or its class name where the message runs to hundreds of
    characters (urllib3's do)."""
    text = str(e)
    return text if len(text) < 100 else type(e).__name__


def download(url_or_urls, dest, sha256=None, desc=None, offline_hint=""):
    """Fetch a file to `dest`, trying mirror URLs in order; check its sha256, then rename it into
    place. Returns dest.

    A file already at dest with the right checksum is reused, one with the wrong checksum is fetched
    again. Bytes go to dest + ".part" first, so an interrupted download resumes next time and dest
    never holds a partial file.
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
        # the second try resumes an interrupted transfer, or restarts after a stale .part
        for _ in range(2):
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
