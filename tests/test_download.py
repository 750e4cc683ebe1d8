"""files.py's atomic writes, UTF-8 reading and progress lines; download.py against a local HTTP
server: checksums, resumed transfers, mirrors, and errors that leave nothing behind."""

import hashlib
import time

import pytest

from cli import UserError
from download import download
from files import Progress, atomic_write, duration, read_utf8, write_json

# ----------------------------------------------------------------------------- files


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "meta.json"
    write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def fails_half_way(tmp):
        tmp.write_text("half of a ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails_half_way)
    assert path.read_text() == '{\n  "a": 1\n}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_read_utf8_says_what_is_wrong(tmp_path):
    (tmp_path / "ok.txt").write_text("café\n", encoding="utf-8")
    assert read_utf8(tmp_path / "ok.txt") == "café\n"
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"the prompt file .*latin1.txt is not UTF-8 text \(byte 3\)"):
        read_utf8(tmp_path / "latin1.txt", "the prompt file")
    with pytest.raises(UserError, match="cannot read file .*missing.txt: No such file"):
        read_utf8(tmp_path / "missing.txt")

def test_progress_lines_give_the_rate_and_an_eta(capsys, monkeypatch):
    clock = iter([0.0, 20.0, 40.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    progress = Progress("encoding", 100e6)
    progress.update(25e6)  # 20 s in: 25 MB at 1.25 MB/s, 75 MB to go
    progress.close(50e6)
    assert capsys.readouterr().err.splitlines() == ["encoding:  25% (25.0/100.0 MB, 1.2 MB/s, eta 1m00s)",
                                                    "encoding:  50% (50.0/100.0 MB, 1.2 MB/s, eta 0m40s)"]
    assert duration(75) == "1m15s" and duration(4000) == "1h06m"


# ----------------------------------------------------------------------------- downloads


DATA = bytes(range(256)) * 400  # 100 KiB
DATA_SHA = hashlib.sha256(DATA).hexdigest()


def test_download_with_checksum(http_server, tmp_path):
    http_server.files["/f.bin"] = DATA
    dest = tmp_path / "sub" / "f.bin"
    assert download(http_server.url + "/f.bin", dest, DATA_SHA) == dest
    assert dest.read_bytes() == DATA and not (tmp_path / "sub" / "f.bin.part").exists()
    download(http_server.url + "/f.bin", dest, DATA_SHA)  # cached: no second request
    assert len(http_server.log) == 1


def test_download_checksum_mismatch_leaves_nothing(http_server, tmp_path):
    http_server.files["/f.bin"] = DATA[:-1] + b"x"
    dest = tmp_path / "f.bin"
    with pytest.raises(UserError, match="sha256 mismatch.*--source=DIR"):
        download(http_server.url + "/f.bin", dest, DATA_SHA, offline_hint="pass --source=DIR")
    assert list(tmp_path.iterdir()) == []


def test_download_resumes_a_part_file_with_range(http_server, tmp_path):
    http_server.files["/f.bin"] = DATA
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(DATA[:40_000])
    download(http_server.url + "/f.bin", dest, DATA_SHA)
    assert http_server.log == [("/f.bin", "bytes=40000-")]
    assert dest.read_bytes() == DATA and not (tmp_path / "f.bin.part").exists()


def test_download_resumes_after_a_dropped_connection(http_server, tmp_path):
    http_server.files["/f.bin"] = DATA
    http_server.cut_once["/f.bin"] = 80_000
    dest = tmp_path / "f.bin"
    download(http_server.url + "/f.bin", dest, DATA_SHA)
    (_, first), (_, second) = http_server.log  # the retry asks only for what the first try did not save
    assert first is None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= 80_000
    assert dest.read_bytes() == DATA


def test_download_restarts_when_server_ignores_range(http_server, tmp_path):
    http_server.files["/f.bin"] = DATA
    http_server.ranges = False
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"junk" * 100)
    download(http_server.url + "/f.bin", dest, DATA_SHA)
    assert dest.read_bytes() == DATA


def test_download_refetches_a_stale_part_and_a_corrupt_file(http_server, tmp_path):
    http_server.files["/f.bin"] = DATA
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"junk" * 100)  # resumed onto junk: checksum fails, fetched afresh
    download(http_server.url + "/f.bin", dest, DATA_SHA)
    assert dest.read_bytes() == DATA and http_server.log == [("/f.bin", "bytes=400-"), ("/f.bin", None)]
    dest.write_bytes(b"corrupt")
    download(http_server.url + "/f.bin", dest, DATA_SHA)
    assert dest.read_bytes() == DATA


def test_download_tries_mirrors_in_order(http_server, tmp_path):
    http_server.files["/b/f.bin"] = DATA
    dest = download([http_server.url + "/a/f.bin", http_server.url + "/b/f.bin"], tmp_path / "f.bin", DATA_SHA)
    assert dest.read_bytes() == DATA and [p for p, _ in http_server.log] == ["/a/f.bin", "/b/f.bin"]


def test_download_http_error_saves_nothing(http_server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        download(http_server.url + "/missing.bin", tmp_path / "f.bin")  # no checksum to catch an error page
    assert list(tmp_path.iterdir()) == []
