"""What the test files share: running a script, the real data when it is here, a made-up corpus and the dataset,
checkpoint and classifier made from it with the project's own scripts, small random models, and a local HTTP server
that stands in for the internet."""

import contextlib
import io
import os
import random
import runpy
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules, from any working directory

from cli import run_main  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"  # real data sets, outside the repository (see its README)
WORDS = ("the café in Zürich served naïve crème brûlée ; 日本 の 東京 — a £ 5 price , 🙂 and so on . "
         "river valley stone bridge church people grew old near").split()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Models this small gain nothing from a second thread, and lose a lot when other work keeps the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data():
    """../shared/data, or a skip where this checkout has no such folder."""
    if not SHARED.is_dir():
        pytest.skip("no shared data folder next to the repository")
    return SHARED

# ----------------------------------------------------------------------------- running the scripts


def _run_script(script, *args, check=False, cwd=ROOT, timeout=240):
    """Run one of the project's scripts in a fresh interpreter, on one thread; stdout and stderr as UTF-8 text.
    check=True fails the test, showing both, if the script does not exit with 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env, timeout=timeout,
                            capture_output=True, encoding="utf-8", errors="replace")
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _run_in_process(module, *args):
    """Run a script's main() in this process, as its command line would: (exit status, stdout, stderr)."""
    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = [module.__name__ + ".py", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(module.main)
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = argv
    return status, out.getvalue(), err.getvalue()


def _run_train(*args):
    """train.py's main() run in this process (no interpreter start-up), with these arguments; raises what it raises
    (a UserError, where the command line prints one line). The Ctrl-C and SIGTERM handlers it installs are put back
    afterwards."""
    argv, handlers = sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = ["train.py", *map(str, args)]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="train")["main"]()
    finally:
        sys.argv = argv
        for number, handler in handlers.items():
            signal.signal(number, handler)


@pytest.fixture
def run_train():
    """run_train(*args): train.py in this process."""
    return _run_train


def _signal_training(signum, *args):
    """train.py with these arguments in a fresh process, sent `signum` once it has logged iteration 3 (give it
    --log_interval=1): (exit status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            break
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


@pytest.fixture
def signal_training():
    """signal_training(signum, *args): train.py stopped by a signal after iteration 3."""
    return _signal_training


@pytest.fixture
def run_script():
    """run_script(script, *args, check=False, cwd=ROOT, timeout=240) -> subprocess.CompletedProcess (text)."""
    return _run_script


@pytest.fixture
def run_in_process():
    """run_in_process(module, *args) -> (exit status, stdout, stderr) of module.main() under run_main."""
    return _run_in_process

# ----------------------------------------------------------------------------- a made-up corpus and its products


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """prepare.py on 600 made-up lines (accents, CJK, an emoji), with a 300-id tokenizer: train, val and test."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(600)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _run_script("prepare.py", f"--input={root / 'corpus.txt'}", f"--out_dir={root / 'data'}", "--vocab_size=300",
               "--val_fraction=0.15", "--test_fraction=0.1", check=True)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_data):
    """train.py for 30 steps on tiny_data: a 36k-parameter model with a context of 32 tokens.
    In float32, not --dtype=auto (bf16 on some CPUs): the tests that score it start from the same
    weights on every machine."""
    out = tiny_data.parent / "ckpt"
    _run_script("train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", "--hidden_size=32", "--num_hidden_layers=2",
               "--num_attention_heads=2", "--block_size=32", "--batch_size=8", "--max_iters=30", "--eval_interval=30",
               "--eval_iters=1", "--log_interval=20", "--learning_rate=1e-2", "--warmup_iters=5",
               "--lr_decay_iters=30", "--dropout=0", "--device=cpu", "--dtype=float32",
               "--compile=False", check=True)
    return out


@pytest.fixture(scope="session")
def tiny_classifier(tiny_ckpt):
    """finetune_classifier.py for one epoch from tiny_ckpt, in float32, on 24 made-up texts labelled
    ham and spam."""
    root = tiny_ckpt.parent
    rows = [f"spam\tWIN free cash prize now {i}" if i % 2 else f"ham\tthe café in Zürich {i}" for i in range(24)]
    (root / "labels.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n", encoding="utf-8")
    _run_script("finetune_classifier.py", f"--init_from={tiny_ckpt}", f"--data={root / 'labels.tsv'}",
               f"--out_dir={root / 'classifier'}", "--num_epochs=1", "--device=cpu",
               "--dtype=float32", check=True)
    return root / "classifier"


@pytest.fixture
def random_model():
    """random_model(vocab_size=97, block_size=32, dtype=float64, **choices): a small GPT with seeded random weights,
    in eval mode (choices: GPTConfig's, e.g. position="rope"). float64 by default: cached and uncached logits then
    agree far below any tie."""

    def make(vocab_size=97, block_size=32, dtype=torch.float64, **choices):
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=vocab_size, block_size=block_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, dropout=0.0, **choices)
        return GPT(config).to(dtype).eval()

    return make

# ----------------------------------------------------------------------------- the internet, on 127.0.0.1


class LocalServer:
    """An HTTP server on 127.0.0.1 for download tests. It serves `files` ({path: bytes}), honours Range requests
    unless `ranges` is False, drops the connection after `cut_once[path]` bytes once, answers paths under a key of
    `redirects` with a 307 to the same path under its value, and adds `headers[path]` to GET and HEAD answers.
    Every GET is logged as (path, its Range header or None)."""

    def __init__(self):
        self.files, self.headers, self.redirects, self.cut_once, self.log, self.ranges = {}, {}, {}, {}, [], True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _handler(server):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                self.answer(body=True)

            def answer(self, body):
                moved = next((p for p in server.redirects if self.path.startswith(p)), None)
                if moved is not None:
                    self.send_response(307)
                    self.send_header("Location", server.redirects[moved] + self.path[len(moved):])
                    return self.end_headers()
                data = server.files.get(self.path)
                if data is None:
                    return self.send_error(404)
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].rstrip("-")) if rng and server.ranges else 0
                if start >= len(data) > 0:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                for name, value in server.headers.get(self.path, {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    cut = server.cut_once.pop(self.path, None)  # a dropped connection
                    self.wfile.write(data[start:] if cut is None else data[start:start + cut])

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = LocalServer()
    yield server
    server.close()
