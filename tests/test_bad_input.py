"""Nothing a user types can hurt their work: every bad setting, file or checkpoint is one `error:` line and exit
status 2 (no traceback), a failed run leaves a trained folder byte for byte as it was, two runs cannot share a
folder, SIGTERM saves like Ctrl-C, a full disk loses nothing, and counting workers do not outlive prepare.py."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import finetune_classifier
import finetune_instruct
import prepare
import sample
import serve
import tokenizer
from checkpoint import CHECKPOINT_NAME
from cli import UserError
from files import folder_lock
from generate import StopStrings
from tokenizer import BPETokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--eval_iters=1", "--log_interval=1", "--batch_size=4", "--block_size=32", "--hidden_size=32",
        "--num_hidden_layers=2", "--num_attention_heads=2", "--warmup_iters=2", "--device=cpu", "--compile=False"]


def folder_hash(folder):
    """One sha256 over every file's name and bytes: equal hashes, an untouched folder."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def trained(tiny_ckpt, tmp_path):
    """A copy of a trained folder (checkpoint, log, curve, config, tokenizer) to aim bad runs at."""
    folder = tmp_path / "trained"
    shutil.copytree(tiny_ckpt, folder)
    return folder


def assert_one_line(status, err, *fragments):
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def train_error(run_train, *args):
    """The UserError message of a train.py run that must fail."""
    with pytest.raises(UserError) as error:
        run_train(*args)
    return str(error.value)

# ----------------------------------------------------------------------------- settings out of range


@pytest.mark.parametrize("arg, fragment", [
    ("--batch_size=-1", "--batch_size must be >= 1, got -1"), ("--batch_size=0", "--batch_size must be >= 1"),
    ("--eval_iters=0", "--eval_iters must be >= 1"), ("--eval_interval=0", "--eval_interval must be >= 1"),
    ("--log_interval=0", "--log_interval must be >= 1"),
    ("--gradient_accumulation_steps=0", "--gradient_accumulation_steps must be >= 1"),
    ("--dropout=2", "--dropout must be >= 0 and < 1, got 2.0"), ("--learning_rate=-1", "--learning_rate must be > 0"),
    ("--max_iters=-5", "--max_iters must be >= 1, got -5"), ("--device=tpu", "--device must be auto, cpu, cuda"),
    ("--device=cuda", "no CUDA GPU"), ("--compile=maybe", "--compile must be one of auto, True, False"),
    ("--init_from=gpt2", "--init_from must be one of scratch, resume"), ("--seed=100000000000000000000000", "--seed"),
    ("--learning_rate=1e400", "--learning_rate must be float"), ("--dtype=float64", "--dtype must be"),
    ("--beta2=1", "--beta2 must be >= 0 and < 1"),
])
def test_train_settings_out_of_range(arg, fragment, run_train, tiny_data, trained):
    before = folder_hash(trained)
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={trained}", "--init_from=resume", *TINY,
                          "--max_iters=100", arg)
    assert fragment in message and "\n" not in message
    assert folder_hash(trained) == before


@pytest.mark.parametrize("module, args, fragment", [
    (sample, ["--seed=100000000000000000000000"], "--seed"), (sample, ["--seed=-1"], "--seed must be >= 0"),
    (sample, ["--temperature=-1"], "--temperature must be >= 0"), (sample, ["--top_p=0"], "--top_p must be > 0"),
    (sample, ["--num_samples=0"], "--num_samples must be >= 1"), (sample, ["--device=tpu"], "--device must be"),
    (evaluate, ["--stride=-1"], "--stride must be >= 0"), (evaluate, ["--batch_size=0"], "--batch_size must be >= 1"),
    (evaluate, ["--split=dev"], "--split must be one of train, val, test"),
    (evaluate, ["--quantize=int4"], "--quantize must be one of none, int8"),
    (finetune_instruct, ["--temperature=-1"], "--temperature must be >= 0"),
    (finetune_instruct, ["--trainable=head"], "--trainable must be one of all, last_block, lora"),
    (finetune_classifier, ["--lora_rank=0"], "--lora_rank must be >= 1"),
    (finetune_classifier, ["--dropout=1"], "--dropout must be >= 0 and < 1"),
    (serve, ["--port=70000"], "--port must be >= 1 and <= 65535, got 70000"),
    (serve, ["--port=-1"], "--port must be >= 1"), (serve, ["--max_batch_size=0"], "--max_batch_size must be >= 1"),
    (prepare, ["--vocab_size=2000000"], "--vocab_size must be >= 257 and <= 1048576"),
    (prepare, ["--val_fraction=1.5"], "--val_fraction must be > 0 and < 1"),
    (prepare, ["--tokenizer=sentencepiece"], "--tokenizer must be bpe, gpt2 or a folder"),
    (tokenizer, ["--train=x.txt", "--vocab_size=10"], "--vocab_size must be >= 257"),
])
def test_other_scripts_settings_out_of_range(module, args, fragment, run_in_process):
    status, _, err = run_in_process(module, *args)  # refused before anything is read or loaded
    assert_one_line(status, err, fragment)


def test_help_shows_the_allowed_values(run_in_process):
    status, out, _ = run_in_process(serve, "--help")
    assert status == 0 and "TCP port to listen on [>= 1 and <= 65535]" in out

# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("content, fragment", [
    ("max_iters = 9**9**9".encode(), "too large for a setting"),
    ("wandb_run_name = 'x' * 10**10".encode(), "too large for a setting"),
    ("max_iters = 1\nwandb_run_name = 'café'\n".encode("latin-1"), "is not UTF-8 text"),
    (b"max_iters = (", "syntax error"),
])
def test_config_files_that_cannot_be_settings(content, fragment, tmp_path, run_script):
    config = tmp_path / "config.py"
    config.write_bytes(content)
    t0 = time.time()
    r = run_script("train.py", str(config), f"--out_dir={tmp_path / 'out'}", timeout=60)
    assert_one_line(r.returncode, r.stderr, fragment)
    assert time.time() - t0 < 30 and not (tmp_path / "out").exists()

# ----------------------------------------------------------------------------- a trained folder survives


def test_scratch_into_a_trained_folder_is_refused(run_train, tiny_data, trained):
    before = folder_hash(trained)
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={trained}", *TINY, "--max_iters=2")
    assert "holds a trained model" in message and "--overwrite=True" in message
    assert folder_hash(trained) == before


def test_a_run_that_fails_after_start_up_leaves_the_folder_as_it_was(run_train, tiny_data, trained):
    """--overwrite=True lets a run start into the folder; it diverges before its first checkpoint: nothing moved."""
    before = folder_hash(trained)
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={trained}", *TINY, "--overwrite=True",
                          "--max_iters=50", "--eval_interval=25", "--learning_rate=1e30", "--warmup_iters=0",
                          "--grad_clip=0")
    assert "training diverged" in message
    assert folder_hash(trained) == before


def test_resuming_with_another_tokenizer_of_the_same_size_is_refused(run_train, tiny_data, trained, tmp_path):
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    vocab = BPETokenizer.load(other).vocab_size
    text = " ".join(f"zq{i % 97} xv{i % 89}" for i in range(5000))  # other words, other merges
    BPETokenizer.train(text, vocab_size=vocab, min_frequency=1).save(other)
    assert BPETokenizer.load(other).vocab_size == vocab
    before = folder_hash(trained)
    message = train_error(run_train, f"--data_dir={other}", f"--out_dir={trained}", *TINY, "--init_from=resume",
                          "--max_iters=100")
    assert "another tokenizer" in message and folder_hash(trained) == before


def test_resume_past_max_iters_is_refused(run_train, tiny_data, trained):
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={trained}", *TINY, "--init_from=resume",
                          "--max_iters=10")
    assert "the checkpoint is at iteration 30" in message


def test_an_out_dir_that_is_a_file(run_train, tiny_data, tmp_path, run_in_process):
    (tmp_path / "afile").write_text("x")
    assert "is a file" in train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'afile'}", *TINY)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some words to learn from\n" * 50)
    status, _, err = run_in_process(prepare, f"--input={corpus}", f"--out_dir={tmp_path / 'afile'}", "--vocab_size=300")
    assert_one_line(status, err, "is a file")
    status, _, err = run_in_process(tokenizer, f"--train={corpus}", f"--out={tmp_path / 'afile'}", "--vocab_size=300")
    assert_one_line(status, err, "is a file")


def test_two_runs_cannot_share_a_folder(tiny_data, tmp_path, run_script):
    out = tmp_path / "out"
    with folder_lock(out):  # as a running train.py holds it
        r = run_script("train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=2")
    assert_one_line(r.returncode, r.stderr, f"is in use by another run (PID {os.getpid()})")
    assert not out.exists()  # the lock's folder goes with it


def test_an_export_into_a_folder_in_use_names_its_own_flag(tiny_ckpt, tmp_path, run_in_process):
    import export
    to = tmp_path / "hf"
    with folder_lock(to):
        status, _, err = run_in_process(export, f"--model={tiny_ckpt}", f"--to={to}")
    assert_one_line(status, err, f"is in use by another run (PID {os.getpid()})")
    assert err.rstrip().endswith("choose another --to") and not to.exists()


def test_sigterm_saves_like_ctrl_c(tiny_data, tmp_path, signal_training):
    out = tmp_path / "out"
    returncode, stdout, stderr = signal_training(signal.SIGTERM, f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY,
                                                 "--max_iters=100000", "--eval_interval=100000")
    assert returncode == 128 + signal.SIGTERM, stderr
    assert "stopping (SIGTERM)" in stdout and "saved checkpoint" in stdout and "Traceback" not in stderr
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["iter_num"] >= 3
    assert not (out / ".lock").exists()


def test_a_full_disk_loses_nothing(run_train, tiny_data, trained, monkeypatch):
    before = torch.load(trained / CHECKPOINT_NAME, weights_only=True)["iter_num"]

    def disk_full(obj, path, *args, **kw):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={trained}", *TINY, "--init_from=resume",
                          "--max_iters=32", "--eval_interval=1")
    assert "No space left on device" in message and "the last checkpoint there is intact" in message
    monkeypatch.undo()
    assert torch.load(trained / CHECKPOINT_NAME, weights_only=True)["iter_num"] == before
    assert not list(trained.glob("*.tmp")) and not (trained / ".lock").exists()

# ----------------------------------------------------------------------------- checkpoints and data


@pytest.mark.parametrize("content, fragment", [(b"", "cannot read checkpoint"),
                                               (b"\x80\x02junk", "cannot read checkpoint"),
                                               ({"model": {}}, "is not a checkpoint of this project")])
def test_broken_checkpoints(content, fragment, tiny_ckpt, tmp_path, run_in_process):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, folder)
    if isinstance(content, bytes):
        (folder / CHECKPOINT_NAME).write_bytes(content)
    else:
        torch.save(content, folder / CHECKPOINT_NAME)
    for module in (sample, evaluate):
        status, _, err = run_in_process(module, f"--model={folder}", "--device=cpu")
        assert_one_line(status, err, fragment)


def test_evaluate_without_data_or_words(tiny_ckpt, tmp_path, run_in_process):
    status, _, err = run_in_process(evaluate, f"--model={tiny_ckpt}", f"--data_dir={tmp_path / 'nothing'}")
    assert_one_line(status, err, "run prepare.py first")
    (tmp_path / "blank.txt").write_text("  \n\n \t\n")
    status, _, err = run_in_process(evaluate, f"--model={tiny_ckpt}", f"--text_file={tmp_path / 'blank.txt'}")
    assert_one_line(status, err, "has no text to score")


def test_empty_corpora_are_refused(tmp_path, run_in_process):
    (tmp_path / "empty.txt").write_text("   \n\n")
    status, _, err = run_in_process(tokenizer, f"--train={tmp_path / 'empty.txt'}", f"--out={tmp_path / 'tok'}")
    assert_one_line(status, err, "no words to learn")
    assert not (tmp_path / "tok").exists()
    status, _, err = run_in_process(prepare, f"--input={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'data'}")
    assert_one_line(status, err, "empty")


def test_counting_workers_end_with_their_parent(tmp_path):
    """kill -9 of a process that shares out word counting: its workers must not wait forever."""
    marker = f"count-{os.getpid()}-{time.time_ns()}"
    script = tmp_path / f"{marker}.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                      "from tokenizer import count_pretokens_parallel\n"
                      "from workers import worker_pool\n"
                      "print('counting', flush=True)\n"
                      "count_pretokens_parallel(['some words and more words ' * 400_000], min_chars=0,\n"
                      "                         pool=worker_pool(2))\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "counting"
    time.sleep(1.0)  # the workers are forked and counting
    proc.kill()
    proc.wait()

    def workers():
        found = []
        for stat in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker in stat.read_bytes().decode(errors="replace"):
                    found.append(stat.parent.name)
            except OSError:
                pass
        return found

    deadline = time.time() + 60
    while workers() and time.time() < deadline:
        time.sleep(0.5)
    assert workers() == []

# ----------------------------------------------------------------------------- the second battery (issue 21)


def test_d15_a_text_flag_without_a_value_is_refused(tiny_ckpt, tmp_path, run_in_process):
    import export
    status, _, err = run_in_process(export, f"--model={tiny_ckpt}", "--to")
    assert_one_line(status, err, "--to needs a value: --to=VALUE")
    assert not (ROOT / "True").exists()
    status, _, err = run_in_process(sample, f"--model={tiny_ckpt}", "--compile", "--max_new_tokens=2")
    assert status == 0, err  # a bare boolean flag still switches it on


@pytest.fixture(scope="module")
def guarded_app(tiny_ckpt):
    app = serve.create_app(str(tiny_ckpt), device="cpu", allowed_origins="https://app.example")
    yield app
    app.engine.close()


@pytest.mark.parametrize("headers, status", [
    ({}, 200),                                                                 # curl, the SDKs
    ({"Origin": "http://localhost"}, 200),                                     # the page the server serves
    ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),   # a page elsewhere, no preflight
    ({"Origin": "null"}, 403),                                                 # a sandboxed page or a file
    ({"Host": "attacker.example:8000"}, 403),                                 # DNS rebinding: its own name
    ({"Host": "attacker.example:8000", "Origin": "http://attacker.example:8000"}, 403),
    ({"Host": "127.0.0.1:8000"}, 200), ({"Host": "[::1]:8000"}, 200),
    ({"Origin": "https://app.example"}, 200),                                  # allowed with --allowed_origins
])
def test_d3_no_web_page_elsewhere_can_drive_the_server(guarded_app, headers, status):
    client = guarded_app.test_client()
    r = client.post("/v1/completions", data='{"prompt": "The", "max_tokens": 2}', headers=headers)
    assert r.status_code == status, r.data
    if status == 403:
        assert r.json["error"]["message"].count("--allowed_") == 1
    if headers.get("Origin") == "https://app.example":
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_d3_an_allowed_origin_passes_its_preflight(guarded_app):
    r = guarded_app.test_client().options("/v1/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200 and "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]


def test_d1_long_stop_strings_are_refused_and_cheap_ones_stay_cheap(guarded_app):
    client = guarded_app.test_client()
    r = client.post("/v1/completions", json={"prompt": "The", "stop": "x" * 15_500})
    assert r.status_code == 400 and r.json["error"]["param"] == "stop"
    stop = "a" * (serve.MAX_STOP_CHARS - 1) + "b"  # the longest allowed, against text that keeps almost matching it
    assert "".join(StopStrings([stop]).cut(["a" * 7] * 2000)) == "a" * 14_000
    assert "".join(StopStrings([stop]).cut(["a" * 7] * 2000 + ["b", "c"])) == "a" * (14_000 - len(stop) + 1)


def test_d2_a_chunked_body_beyond_the_limit_is_413(tiny_ckpt):
    import json
    import socket
    import threading

    from werkzeug.serving import make_server
    app = serve.create_app(str(tiny_ckpt), device="cpu", max_body_bytes=2000)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        def send_chunked(body):
            with socket.create_connection(("127.0.0.1", httpd.server_port)) as s:
                chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 500]), body[i:i + 500])
                                  for i in range(0, len(body), 500)) + b"0\r\n\r\n"
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)
                answer = b""
                while data := s.recv(65536):
                    answer += data
            return int(answer.split(b" ", 2)[1])
        big = json.dumps({"prompt": "The", "max_tokens": 1, "user": "x" * 3000}).encode()
        small = json.dumps({"prompt": "The", "max_tokens": 1}).encode()
        assert send_chunked(big) == 413
        assert send_chunked(small) == 200
    finally:
        httpd.shutdown()
        app.engine.close()


@pytest.mark.parametrize("token", ["café", " padded ", "tab\there"])
def test_d4_a_token_no_client_can_send_is_refused_at_start(tiny_ckpt, token, monkeypatch, run_in_process):
    monkeypatch.setenv(serve.TOKEN_ENV, token)
    status, _, err = run_in_process(serve, f"--model={tiny_ckpt}", "--device=cpu")
    assert_one_line(status, err, "GPT_API_TOKEN must be printable ASCII")


@pytest.mark.parametrize("content, fragment", [
    ("max_iters = " + "+".join(["1"] * 100_000), "nested too deeply"),                        # D9
    ("wandb_project = ('x' * 10000,) * 10000", "too large for a setting"),                    # D10
    ("wandb_project = 'x' * 9000\nwandb_run_name = (wandb_project,) * 2", "too large"),       # D10, nested
    ("wandb_project = '%*d' % (10**9, 1)", "string formatting is not supported"),             # D10
])
def test_d9_d10_config_files_that_would_eat_memory(content, fragment, tmp_path, run_script):
    config = tmp_path / "config.py"
    config.write_text(content)
    r = run_script("train.py", str(config), f"--out_dir={tmp_path / 'out'}", timeout=60)
    assert_one_line(r.returncode, r.stderr, fragment)


def test_d12_a_start_text_that_is_not_utf8(tiny_ckpt, run_script):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--model={tiny_ckpt}", b"--start=ab\xff\xfecd"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line(r.returncode, r.stderr, "--start is not UTF-8 text (byte 0xff")


def resumed_training(tiny_ckpt, out, *args, wait_for):
    """A copy of the tiny run (at step 30) resumed (no evaluation at its start) with args; returns the process once
    it has printed a line starting with wait_for."""
    shutil.copytree(tiny_ckpt, out)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--out_dir={out}", "--init_from=resume",
                             "--log_interval=1", "--max_iters=100", "--eval_iters=1000000000", *args],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith(wait_for):
            return proc
    raise AssertionError(proc.communicate())


def test_d16_sigterm_during_an_evaluation_stops_it_within_seconds(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = resumed_training(tiny_ckpt, out, "--eval_interval=32", wait_for="iter 32/")
    time.sleep(1)  # the evaluation of step 32 is under way: a billion batches
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.time() - t0 < 30, stderr
    assert "eval 32: stopped" in stdout and "Traceback" not in stderr
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["iter_num"] == 32


def test_d16_a_second_sigterm_exits_at_once(tiny_ckpt, tmp_path):
    proc = resumed_training(tiny_ckpt, tmp_path / "out", "--eval_interval=1000", wait_for="iter 32/")
    proc.send_signal(signal.SIGTERM)  # the stop's evaluation begins: a billion batches
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM


def test_d8_fine_tuning_into_a_pretraining_folder_is_refused_unless_asked(trained, tmp_path, run_in_process,
                                                                          run_train, tiny_data):
    import json
    records = [{"instruction": f"say {w}", "input": "", "output": f"{w} ok"} for w in "a b c d e f g h i j".split()]
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records * 3))
    before = folder_hash(trained)
    status, _, err = run_in_process(finetune_instruct, f"--model={trained}", f"--out_dir={trained}", f"--data={data}",
                                    "--num_epochs=1", "--max_new_tokens=2", "--device=cpu")
    assert_one_line(status, err, "holds a trained model", "--overwrite=True")
    assert folder_hash(trained) == before
    status, _, err = run_in_process(finetune_classifier, f"--model={trained}", f"--out_dir={trained}",
                                    "--device=cpu")
    assert_one_line(status, err, "holds a trained model")
    sms = tmp_path / "sms.tsv"
    sms.write_text("".join(f"ham\tsee you at {i}\nspam\twin cash now {i}\n" for i in range(30)))
    status, _, err = run_in_process(finetune_classifier, f"--model={trained}", f"--out_dir={trained}", f"--data={sms}",
                                    "--num_epochs=1", "--device=cpu", "--overwrite=True")
    assert status == 0, err
    assert not (trained / "log.jsonl").exists()  # the pretraining run's records went with its model
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={trained}", *TINY, "--init_from=resume")
    assert "no run to resume" in message


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes() + b"\x01"), "not whole uint16 ids"),
    (lambda d: (d / "train.bin").write_bytes(b"\xff\xff" + (d / "train.bin").read_bytes()[2:]),
     "holds the id 65,535, beyond its vocabulary"),
    (lambda d: (d / "meta.json").write_text("{not json"), "cannot read"),
    (lambda d: (d / "vocab.json").write_text("[1, 2"), "is not a tokenizer's vocabulary"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\na b c\n"), "merges.txt:2: not a merge"),
])
def test_d13_damaged_data_files_are_one_line(tiny_data, tmp_path, damage, fragment, run_script):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    damage(data)
    r = run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2",
                   timeout=120)
    assert_one_line(r.returncode, r.stderr, fragment)


def test_d6_d7_a_full_disk_while_exporting_is_one_line(tiny_ckpt, tmp_path, monkeypatch, run_in_process):
    import export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hf" / "model.safetensors.tmp"))
    monkeypatch.setattr(export, "save_file", full)
    status, _, err = run_in_process(export, f"--model={tiny_ckpt}", f"--to={tmp_path / 'hf'}")
    assert_one_line(status, err, "No space left on device", "model.safetensors")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def folder_with(tiny_ckpt, tmp_path, edit):
    """A copy of tiny_ckpt whose checkpoint dict went through edit(checkpoint)."""
    folder = tmp_path / "edited"
    shutil.copytree(tiny_ckpt, folder)
    checkpoint = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, folder / CHECKPOINT_NAME)
    return folder


def every_reader(folder, tmp_path, run_in_process):
    """(status, stderr) of each script that loads a model folder, pointed at `folder`."""
    import export
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": f"{i} ok"} for i in range(30)]))
    runs = [(sample, "--device=cpu", "--max_new_tokens=2"), (evaluate, "--device=cpu", "--split=val"),
            (export, f"--to={tmp_path / 'hf'}"),
            (finetune_instruct, "--device=cpu", f"--data={records}", f"--out_dir={tmp_path / 'ft'}")]
    for module, *args in runs:
        status, _, err = run_in_process(module, f"--model={folder}", *args)
        yield module.__name__, status, err
    try:  # serve.py's main() loads the model here, before it listens
        serve.create_app(str(folder), device="cpu").engine.close()
        yield "serve", 0, ""
    except UserError as e:
        yield "serve", 2, f"error: {e}\n"


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["model_config"].update(rotary_base=500000), "an unknown key 'rotary_base'"),
    (lambda c: c["model_config"].update(vocab_size="300"), "vocab_size='300', not int"),
    (lambda c: c["model_config"].update(hidden_size=100000), "the weights hold"),
    (lambda c: c["model_config"].update(vocab_size=299), "size mismatch for"),
    (lambda c: c["model"].pop("blocks.1.mlp.up_proj.weight"), "blocks.1.mlp.up_proj.weight"),
])
def test_d11_a_model_config_that_does_not_fit_its_weights_is_one_line(edit, fragment, tiny_ckpt, tmp_path,
                                                                      run_in_process):
    folder = folder_with(tiny_ckpt, tmp_path, edit)
    for script, status, err in every_reader(folder, tmp_path, run_in_process):
        assert_one_line(status, err, "model_config does not fit its weights", fragment)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ft").exists()


def test_d5_a_tokenizer_that_is_not_the_models_is_one_line(tiny_ckpt, tmp_path, run_in_process):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_ckpt, folder)
    text = " ".join(f"zq{i % 97} xv{i % 89}" for i in range(5000))
    BPETokenizer.train(text, vocab_size=280, min_frequency=1).save(folder)  # 280 ids beside a 300-id model
    for script, status, err in every_reader(folder, tmp_path, run_in_process):
        assert_one_line(status, err, "has 280 ids and its model 300", "vocab.json")
    BPETokenizer.train(text, vocab_size=300, min_frequency=1).save(folder)  # as many ids, other merges
    for script, status, err in every_reader(folder, tmp_path, run_in_process):
        assert_one_line(status, err, "is not the one its model was trained with")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ft").exists()


def test_d6_a_first_save_that_fails_leaves_nothing_behind(run_train, tiny_data, tmp_path, monkeypatch, run_in_process):
    def failing(obj, path, *args, **kw):  # what torch.save raises on a full disk: RuntimeError, not OSError
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", failing)
    out = tmp_path / "out"
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=2")
    assert "cannot save into" in message and "PytorchStreamWriter failed" in message and "MB free there" in message
    assert "nothing was saved" in message
    assert not out.exists()  # no config, log or tokenizer without a checkpoint
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": f"{i} ok"} for i in range(30)]))
    status, _, err = run_in_process(finetune_instruct, "--model=scratch", f"--tokenizer_dir={tiny_data}",
                                    "--hidden_size=16", "--num_hidden_layers=1", "--num_attention_heads=1",
                                    "--block_size=512", "--max_length=512",
                                    f"--data={records}", f"--out_dir={out}", "--device=cpu", "--num_epochs=1",
                                    "--max_new_tokens=2")
    assert status == 2 and "Traceback" not in err  # after the epoch's progress line, one error line
    assert err.splitlines()[-1].startswith("error: cannot write the checkpoint (PytorchStreamWriter failed"), err
    assert not (out / "vocab.json").exists()


@pytest.fixture
def read_only(tmp_path):
    """A folder no script may write into: read-only by its mode, or (as root, whom modes do not stop) a read-only
    tmpfs mounted there."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("root here cannot mount a read-only folder, and modes do not stop root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_d7_a_read_only_folder_is_refused_before_any_work(read_only, tiny_data, tiny_ckpt, tmp_path, run_in_process,
                                                          run_train):
    import export
    corpus = tmp_path / "c.txt"
    corpus.write_text("some words to learn from\n" * 50)
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": f"{i} ok"} for i in range(30)]))
    runs = [(prepare, f"--input={corpus}", f"--out_dir={read_only / 'data'}", "--vocab_size=300"),
            (tokenizer, f"--train={corpus}", f"--out={read_only / 'tok'}", "--vocab_size=300"),
            (export, f"--model={tiny_ckpt}", f"--to={read_only / 'hf'}"),
            (export, f"--model={tiny_ckpt}", f"--to={read_only / 'model.gguf'}"),
            (finetune_instruct, f"--model={tiny_ckpt}", f"--data={records}", f"--out_dir={read_only / 'ft'}",
             "--device=cpu")]
    for module, *args in runs:
        status, out, err = run_in_process(module, *args)
        assert_one_line(status, err, "is read-only here")
        assert "epoch" not in out and "training" not in out  # refused before the work
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={read_only / 'out'}", *TINY)
    assert "is read-only here" in message


@pytest.mark.parametrize("args", [["--hidden_size=100000", "--num_attention_heads=1"],
                                  ["--hidden_size=384", "--num_attention_heads=6", "--num_hidden_layers=100000"],
                                  ["--batch_size=100000000"]])
def test_d14_a_run_that_cannot_fit_in_memory_says_what_it_needs(args, run_train, tiny_data, tmp_path):
    t0 = time.time()
    message = train_error(run_train, f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", *TINY, *args)
    assert "needs at least" in message and "GB of memory" in message and "GB free" in message
    assert time.time() - t0 < 10 and not (tmp_path / "out").exists()


def test_d14_running_out_of_memory_anyway_is_one_line(capsys):
    from cli import run_main

    def allocate():
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total capacity)\nmore")
    with pytest.raises(SystemExit) as stop:
        run_main(allocate)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "out of memory" in err and "--batch_size" in err

    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # a bug still shows its traceback
        run_main(bug)


def test_d17_the_log_holds_each_row_once_after_kills_and_resumes(tiny_data, tmp_path, run_train):
    out = tmp_path / "out"
    args = [f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--eval_interval=2", "--max_iters=100000"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    next(line for line in proc.stdout if line.startswith("iter 5/"))
    proc.kill()  # kill -9 past the checkpoint of step 4: the log on disk ends there, the run had gone on
    proc.communicate()
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["iter_num"] == 4
    run_train(*args[:-1], "--init_from=resume", "--max_iters=8")  # resumed twice: each time from a checkpoint
    run_train(*args[:-1], "--init_from=resume", "--max_iters=12")
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    kinds = [(row["iter"], "val_loss" in row) for row in rows]
    assert kinds == sorted([(i, False) for i in range(1, 13)] + [(i, True) for i in range(0, 13, 2)])


def test_d18_a_resumed_run_takes_its_own_settings(run_train, tiny_data, tmp_path, capsys):
    out, config = tmp_path / "out", tmp_path / "config.py"
    config.write_text("batch_size = 8\nlearning_rate = 3e-3\n")
    run_train(config, f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=4", "--batch_size=2")
    capsys.readouterr()
    run_train(config, f"--out_dir={out}", "--init_from=resume", "--max_iters=6")  # as the README resumes
    stdout = capsys.readouterr().out
    assert "resuming with the run's own settings, not the config file's: batch_size=2 (the file says 8)" in stdout
    assert "changed from the run's settings by this command: max_iters 4 -> 6" in stdout
    saved = torch.load(out / CHECKPOINT_NAME, weights_only=True)["train_config"]
    assert (saved["batch_size"], saved["block_size"], saved["hidden_size"], saved["max_iters"]) == (2, 32, 32, 6)
    run_train(f"--out_dir={out}", "--init_from=resume", "--max_iters=8", "--batch_size=3")  # a flag wins
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["train_config"]["batch_size"] == 3
    for flag in ("--hidden_size=64", "--position=rope", "--optimizer=muon"):
        message = train_error(run_train, f"--out_dir={out}", "--init_from=resume", "--max_iters=10", flag)
        assert f"{flag.split('=')[0]} cannot change when resuming" in message

# ----------------------------------------------------------------------------- audit.py; export's folder


@pytest.fixture
def no_tokenizer(tiny_ckpt, tmp_path):
    """A copy of a trained folder without its tokenizer files."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_ckpt, folder)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / name).unlink()
    return folder


def write_file(name, data):
    """make(folder): write `data` (bytes or text) to folder/name."""
    def make(folder):
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return make


@pytest.mark.parametrize("make, args, fragment", [
    (write_file("other.csv", "name,score\nann,3\n"),
     ["--task=crows_pairs", "--source={d}/other.csv"],
     "is not the CrowS-Pairs CSV (it has no sent_more, sent_less"),
    (write_file("bad.csv", b"sent_more,sent_less\n\xff\n"),
     ["--task=crows_pairs", "--source={d}/bad.csv"], "is not UTF-8"),
    (None, ["--task=crows_pairs", "--source={d}"], "has no crows_pairs_anonymized.csv"),
    (write_file("empty.txt", ""), ["--text_file={d}/empty.txt", "--prefix_tokens=8",
                                   "--suffix_tokens=8"], "has no line of two tokens or more"),
    (None, ["--text_file={d}/missing.txt", "--prefix_tokens=8", "--suffix_tokens=8"],
     "cannot read"),
    (None, [], "--prefix_tokens + --suffix_tokens = 64 is more than the model's context of 32"),
    (None, ["--source=x.csv"], "--source is not a setting of --task=memorization"),
    (None, ["--task=crows_pairs", "--text_file=x.txt"],
     "--text_file is not a setting of --task=crows_pairs"),
    (None, ["--task=bias"], "--task must be one of memorization, crows_pairs"),
])
def test_audit_inputs_are_one_line(make, args, fragment, tiny_ckpt, tmp_path, run_in_process):
    import audit
    if make is not None:
        make(tmp_path)
    before = folder_hash(tiny_ckpt)
    status, _, err = run_in_process(audit, f"--model={tiny_ckpt}", "--device=cpu",
                                    *[arg.format(d=tmp_path) for arg in args])
    assert_one_line(status, err, fragment)
    assert folder_hash(tiny_ckpt) == before  # no audit.json from a run that failed


@pytest.mark.parametrize("task", ["memorization", "crows_pairs"])
def test_audit_of_a_model_without_its_tokenizer_is_one_line(task, no_tokenizer, run_in_process):
    import audit
    status, _, err = run_in_process(audit, f"--model={no_tokenizer}", f"--task={task}",
                                    "--device=cpu")
    assert_one_line(status, err, "tokenizer", str(no_tokenizer))


def test_audit_of_data_another_tokenizer_made_is_one_line(trained, tmp_path, run_in_process):
    import audit
    data, corpus = tmp_path / "data", tmp_path / "corpus.txt"
    corpus.write_text("".join(f"zq{i % 97} xv{i % 89}\n" for i in range(5000)))
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"--input={corpus}",
                        f"--out_dir={data}", "--vocab_size=280", "--workers=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    status, _, err = run_in_process(audit, f"--model={trained}", f"--data_dir={data}",
                                    "--prefix_tokens=8", "--suffix_tokens=8", "--device=cpu")
    assert_one_line(status, err, "tokenized with another tokenizer than the model's")


@pytest.mark.parametrize("target", ["another model", "a data folder", "a link to the model",
                                    "a stopped prepare's work"])
def test_n5_export_never_writes_into_a_folder_that_holds_something(target, trained, tiny_data,
                                                                    tmp_path, run_in_process):
    import export
    to = tmp_path / "to"
    if target == "another model":
        shutil.copytree(trained, to)
    elif target == "a data folder":
        shutil.copytree(tiny_data, to)
    elif target == "a link to the model":
        to.symlink_to(trained)
    else:  # what prepare.py goes on from when run again
        (to / ".partial").mkdir(parents=True)
        (to / ".partial" / "settings.json").write_text("{}")
    before = folder_hash(to), folder_hash(trained)
    # --overwrite=True replaces an earlier export, never another kind of folder
    for overwrite in ([], ["--overwrite=True"]):
        status, _, err = run_in_process(export, f"--model={trained}", f"--to={to}", *overwrite)
        assert_one_line(status, err, "--to")
    assert (folder_hash(to), folder_hash(trained)) == before


def test_n5_an_earlier_export_is_replaced_only_when_asked(trained, tmp_path, run_in_process):
    import export
    hf = tmp_path / "hf"
    assert run_in_process(export, f"--model={trained}", f"--to={hf}")[0] == 0
    before = folder_hash(hf)
    status, _, err = run_in_process(export, f"--model={trained}", f"--to={hf}")
    assert_one_line(status, err, "is not empty", "--overwrite=True")
    assert folder_hash(hf) == before
    status, _, err = run_in_process(export, f"--model={trained}", f"--to={hf}", "--overwrite=True")
    assert status == 0 and folder_hash(hf) == before, err  # the same model: the same files
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"someone's file")
    status, _, err = run_in_process(export, f"--model={trained}", f"--to={gguf}")
    assert_one_line(status, err, "exists", "--overwrite=True")
    assert gguf.read_bytes() == b"someone's file"


def test_n17_a_full_disk_while_exporting_leaves_no_folder(trained, tmp_path, monkeypatch,
                                                          run_in_process):
    import export
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(export, "save_file", full)
    hf = tmp_path / "hf"
    status, _, err = run_in_process(export, f"--model={trained}", f"--to={hf}")
    assert_one_line(status, err, "No space left on device", "model.safetensors")
    assert not hf.exists()


def test_n17_a_disk_that_fills_after_the_weights_leaves_no_folder(trained, tmp_path, monkeypatch,
                                                                  run_in_process):
    import export
    written = []

    def full(path, data):
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(export, "write_json", full)
    hf = tmp_path / "hf"
    status, _, err = run_in_process(export, f"--model={trained}", f"--to={hf}")
    assert_one_line(status, err, "No space left on device", "config.json")
    assert written and not hf.exists()  # the weights, written first, went with the rest


def test_n17_an_export_the_disk_has_no_room_for_is_refused_first(trained, tmp_path, monkeypatch,
                                                                 run_in_process):
    import export
    usage = shutil._ntuple_diskusage(10**9, 10**9, 1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    hf = tmp_path / "hf"
    status, _, err = run_in_process(export, f"--model={trained}", f"--to={hf}")
    assert_one_line(status, err, "the export needs", "MB free")
    assert not hf.exists()


# ----------------------------------------------------------------------------- resuming, and what a run saves

TINY_RUN = ["--eval_iters=1", "--log_interval=1", "--batch_size=4", "--block_size=32", "--hidden_size=32",
            "--num_hidden_layers=2", "--num_attention_heads=2", "--warmup_iters=2", "--device=cpu",
            "--compile=False", "--dtype=float32"]


def test_resuming_from_a_config_file_goes_on_in_its_out_dir(run_train, tiny_data, tmp_path, monkeypatch):
    """`train.py CONFIG --init_from=resume` without --out_dir: the config file's out_dir, not the default."""
    monkeypatch.chdir(tmp_path)  # where the default out_dir, "out", would go
    out, config = tmp_path / "out-config", tmp_path / "config.py"
    config.write_text(f"data_dir = {str(tiny_data)!r}\nout_dir = {str(out)!r}\neval_interval = 2\n")
    run_train(config, *TINY_RUN, "--max_iters=4")
    run_train(config, *TINY_RUN, "--max_iters=6", "--init_from=resume")
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["iter_num"] == 6
    assert not (tmp_path / "out").exists()


def test_resuming_applies_every_setting_it_says_it_changes(run_train, tiny_data, tmp_path, capsys):
    """weight_decay, betas and Muon's rate reach the optimizer that goes on, dropout the model."""
    adamw, muon = tmp_path / "adamw", tmp_path / "muon"
    for out, optimizer in ((adamw, "adamw"), (muon, "muon")):
        run_train(f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY_RUN, "--eval_interval=2", "--max_iters=2",
                  f"--optimizer={optimizer}", "--learning_rate=1e-3", "--dropout=0.1")
    capsys.readouterr()
    run_train(f"--out_dir={adamw}", "--init_from=resume", "--max_iters=4", "--weight_decay=0.05", "--beta1=0.8",
              "--beta2=0.95", "--dropout=0.0", "--embedding_dropout=0.2")
    assert "weight_decay 0.1 -> 0.05, beta1 0.9 -> 0.8, beta2 0.99 -> 0.95" in capsys.readouterr().out
    checkpoint = torch.load(adamw / CHECKPOINT_NAME, weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.05, (0.8, 0.95)), (0.0, (0.8, 0.95))]
    assert (checkpoint["model_config"]["dropout"], checkpoint["model_config"]["embedding_dropout"]) == (0.0, 0.2)
    run_train(f"--out_dir={muon}", "--init_from=resume", "--max_iters=4", "--muon_learning_rate=0.01")
    muon_group = torch.load(muon / CHECKPOINT_NAME, weights_only=True)["optimizer"]["optimizers"][0]["param_groups"][0]
    assert muon_group["lr_scale"] == pytest.approx(0.01 / 1e-3)
    # the dtype too (an fp16 run's loss scaler starts afresh); the seed cannot change the streams it resumes
    run_train(f"--out_dir={adamw}", "--init_from=resume", "--max_iters=6", "--dtype=float16")
    assert torch.load(adamw / CHECKPOINT_NAME, weights_only=True)["scaler"]["scale"] > 0
    message = train_error(run_train, f"--out_dir={adamw}", "--init_from=resume", "--max_iters=8", "--seed=5")
    assert "--seed cannot change when resuming" in message


@pytest.mark.parametrize("always_save", [True, False])
def test_a_diverging_run_saves_nothing_over_its_last_checkpoint(always_save, run_train, tiny_data, tmp_path):
    """A NaN evaluation stops the run before any save: the last checkpoint (and its log) stay as they were."""
    out = tmp_path / "out"
    args = [f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY_RUN, "--eval_interval=2",
            f"--always_save_checkpoint={always_save}"]
    run_train(*args, "--max_iters=4")
    before = folder_hash(out)
    message = train_error(run_train, *args, "--init_from=resume", "--max_iters=8", "--log_interval=100",
                          "--learning_rate=1e30", "--grad_clip=0")
    assert "at iteration 6: training diverged" in message and "\n" not in message
    assert folder_hash(out) == before
    weights = torch.load(out / CHECKPOINT_NAME, weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_tokenizer_file_names_in_meta_json_cannot_reach_outside(run_train, tiny_data, tmp_path):
    """A data folder's meta.json that lists '../run.sh' among its tokenizer files: nothing outside out_dir is
    written; the run's folder gets the tokenizer it trains with."""
    data, out = tmp_path / "a" / "data", tmp_path / "b" / "out"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizer"]["files"].append("../run.sh")
    (data / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "a" / "run.sh").write_text("rm -rf ~\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.sh").write_text("echo mine\n")
    run_train(f"--data_dir={data}", f"--out_dir={out}", *TINY_RUN, "--max_iters=2")
    assert (tmp_path / "b" / "run.sh").read_text() == "echo mine\n"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["out", "run.sh"]
    assert BPETokenizer.load(out).fingerprint() == BPETokenizer.load(tiny_data).fingerprint()


def test_a_tokenizer_replaced_mid_run_is_not_copied_beside_the_model(run_train, tiny_data, tmp_path, monkeypatch):
    """The data folder prepared again (another tokenizer) while the run trains: each checkpoint still has the
    tokenizer the run trains with beside it."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(tiny_data, data)
    trained_with = BPETokenizer.load(data).fingerprint()
    save = torch.save

    def save_then_prepare_again(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        text = " ".join(f"zq{i % 97} xv{i % 89}" for i in range(5000))
        BPETokenizer.train(text, vocab_size=300, min_frequency=1).save(data)

    monkeypatch.setattr(torch, "save", save_then_prepare_again)
    run_train(f"--data_dir={data}", f"--out_dir={out}", *TINY_RUN, "--eval_interval=2", "--max_iters=4")
    assert BPETokenizer.load(data).fingerprint() != trained_with
    checkpoint = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert BPETokenizer.load(out).fingerprint() == checkpoint["tokenizer_sha256"] == trained_with


def test_a_data_folder_whose_tokenizer_does_not_fit_its_meta_json(run_train, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    text = " ".join(f"zq{i % 97} xv{i % 89}" for i in range(5000))
    BPETokenizer.train(text, vocab_size=280, min_frequency=1).save(data)  # 280 ids; meta.json says 300
    message = train_error(run_train, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY_RUN,
                          "--max_iters=2")
    assert "has 280 ids and its meta.json 300" in message and "\n" not in message
    assert "iter " not in capsys.readouterr().out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda meta: [meta], "no whole-number vocab_size"),
    (lambda meta: {**meta, "vocab_size": str(meta["vocab_size"])}, "no whole-number vocab_size"),
    (lambda meta: {k: v for k, v in meta.items() if k != "tokenizer"}, None),  # a record train.py needs not
])
def test_a_damaged_data_meta_json_is_one_line_at_start(edit, fragment, run_train, tiny_data, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(tiny_data, data)
    (data / "meta.json").write_text(json.dumps(edit(json.loads((data / "meta.json").read_text()))))
    args = [f"--data_dir={data}", f"--out_dir={out}", *TINY_RUN, "--max_iters=2"]
    if fragment is None:
        run_train(*args)
        assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["iter_num"] == 2
        return
    message = train_error(run_train, *args)
    assert fragment in message and "\n" not in message
    assert "iter " not in capsys.readouterr().out and not out.exists()


def test_an_empty_out_dir_is_refused_at_start(run_train, tiny_data, capsys):
    message = train_error(run_train, f"--data_dir={tiny_data}", "--out_dir=", *TINY_RUN, "--max_iters=2")
    assert "--out_dir is empty" in message
    assert "iter " not in capsys.readouterr().out

# ----------------------------------------------------------------------------- the third battery (issue 27): serve.py


@pytest.fixture(scope="module")
def long_app(tiny_ckpt):
    """A server whose requests may ask for a million tokens: a choice left behind would generate for minutes."""
    app = serve.create_app(str(tiny_ckpt), device="cpu", dtype="float32", max_tokens_limit=1_000_000)
    yield app
    with app.engine.waiting.mutex:  # whatever a failed test left behind, so that the engine can stop
        left = [sequence for *_, sequence in app.engine.waiting.queue]
    for sequence in left + list(app.engine.active):
        sequence.close()
    app.engine.close()


def held(engine, wait=10.0):
    """The choices the engine still holds (decoding or waiting), once it has had `wait` seconds to drop those that
    were closed."""
    deadline = time.time() + wait
    while (count := len(engine.active) + engine.waiting.qsize()) and time.time() < deadline:
        time.sleep(0.05)
    return count


def events_of(raw):
    """The JSON of each server-sent event, [DONE] left out."""
    return [json.loads(event.removeprefix("data: ")) for event in raw.strip().split("\n\n")[:-1]]


@pytest.mark.parametrize("prompt, n", [("The history", 1), ([[5, 6, 7], [8]], 2)])
def test_n2_a_streamed_echo_with_logprobs_scores_the_prompt(long_app, prompt, n, monkeypatch):
    real, client = long_app.engine.model.prefill, long_app.test_client()
    # a busy engine runs a prompt some time after it was submitted
    monkeypatch.setattr(long_app.engine.model, "prefill", lambda *a, **kw: time.sleep(0.05) or real(*a, **kw))
    body = {"prompt": prompt, "n": n, "max_tokens": 5, "echo": True, "logprobs": 1, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json["choices"]
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.data
    events = events_of(r.get_data(as_text=True))
    assert not any("error" in event for event in events)
    for index, choice in enumerate(whole):
        chunks = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in chunks) == choice["text"]
        streamed = [p for c in chunks if c["logprobs"] for p in c["logprobs"]["token_logprobs"]]
        prompt_scores = chunks[0]["logprobs"]["token_logprobs"]  # the echoed prompt's, in its own event
        # (approximately: a row's logits move in the last bits with the rows decoded beside it)
        assert len(prompt_scores) >= 1
        whole = choice["logprobs"]["token_logprobs"][:len(streamed)]
        assert streamed == pytest.approx(whole, abs=1e-5)


N3 = {"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 1_000_000, "stream": True, "echo": True, "logprobs": 1}


def test_n3_a_request_that_ends_early_leaves_nothing_generating(long_app, monkeypatch):
    """Every way a request ends before its choices are done (its client hangs up on a stream or on a whole answer,
    one of its choices fails in the engine) lets all its choices go: the engine holds nothing afterwards."""
    import socket
    import threading

    from werkzeug.serving import make_server
    engine = long_app.engine
    httpd = make_server("127.0.0.1", 0, long_app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for body in (N3, {**N3, "stream": False}):  # 64 choices; a client that reads one event, or none
            with socket.create_connection(("127.0.0.1", httpd.server_port)) as s:
                data = json.dumps(body).encode()
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                if body["stream"]:
                    assert s.recv(65536).startswith(b"HTTP/1.1 200")
                else:
                    time.sleep(0.5)  # under way
            assert held(engine) == 0
    finally:
        httpd.shutdown()
    bad, real = [3, 1, 4], engine.model.prefill  # a prompt whose run fails (16 choices), beside one that runs

    def prefill(idx, **kw):
        if idx.tolist() == [bad]:
            raise RuntimeError("the engine failed")
        return real(idx, **kw)

    monkeypatch.setattr(engine.model, "prefill", prefill)
    for stream in (False, True):
        r = long_app.test_client().post("/v1/completions", json={"prompt": [bad, [1, 2]], "n": 16,
                                                                  "max_tokens": 1_000_000, "stream": stream})
        assert r.status_code == 500 and held(engine) == 0


def test_n3_a_stream_left_at_once_runs_one_prompt_of_its_64(long_app, monkeypatch):
    """A streamed request of 64 choices whose client hangs up on its first event: only its first
    choice's prompt runs (that event echoes its scores), the other 63 never start, and the engine
    holds nothing afterwards."""
    import socket
    import threading

    from werkzeug.serving import make_server
    engine, run = long_app.engine, []
    real_prefill, real_decode = engine.model.prefill, engine.decode

    def prefill(idx, **kw):  # (a prompt, not a row rebuilt when full)
        if "every_position" in kw:
            run.append(idx[0].tolist())
        return real_prefill(idx, **kw)

    monkeypatch.setattr(engine.model, "prefill", prefill)
    # a busy engine: the hang-up reaches the server before the first choice's first token
    monkeypatch.setattr(engine, "decode", lambda *a: time.sleep(0.2) or real_decode(*a))
    httpd = make_server("127.0.0.1", 0, long_app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_port)) as s:
            # greedy: its first token is a whole character, an event (one that waits for more bytes
            # is seen later)
            data = json.dumps({**N3, "temperature": 0}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert held(engine) == 0
    finally:
        httpd.shutdown()
    assert len(run) == 1


def test_n23_allowed_hosts_with_a_port_are_answered(tiny_ckpt, run_in_process):
    app = serve.create_app(str(tiny_ckpt), device="cpu", allowed_hosts="my.example:8000, Other.Example")
    client = app.test_client()
    for host, status in [("my.example:8000", 200), ("my.example", 200), ("other.example:80", 200),
                         ("evil.example:8000", 403), ("my.example.evil.example:8000", 403)]:
        assert client.get("/health", headers={"Host": host}).status_code == status, host
    app.engine.close()
    status, _, err = run_in_process(serve, f"--model={tiny_ckpt}", "--allowed_hosts=http://my.example:8000")
    assert_one_line(status, err, "--allowed_hosts takes host names, NAME or NAME:PORT, got 'http://my.example:8000'")


def test_the_page_generates_nothing_when_another_site_links_or_frames_it(guarded_app):
    import re
    r = guarded_app.test_client().get("/?prompt=The%20history")
    assert r.status_code == 200 and r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    page = r.get_data(as_text=True)
    assert "generate" in page and not re.search(r"(?<!function )generate\(\)", page)  # a click runs it, only


# ----------------------------------------------------------------------------- prepare.py: inputs, folder (issue 27)

def corpus_lines(n, seed=0):
    """n lines of 12 words, the same for the same seed."""
    import random
    rng = random.Random(seed)
    words = "the river valley stone bridge church people grew old near café Zürich".split()
    return "".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(n))


def prepare_args(input, out, *more):
    return [f"--input={input}", f"--out_dir={out}", "--vocab_size=300", "--workers=1", *more]


def data_files(folder):
    """{name: bytes} of what prepare.py writes into a data folder."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def start_prepare(*args):
    """prepare.py in a process of its own, returned once it has said it trains its tokenizer: by then
    it holds its folder and has started its work there."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    line = proc.stderr.readline()
    assert line.startswith("training a BPE tokenizer"), line + proc.communicate()[1]
    return proc


def test_n1_a_second_prepare_on_the_same_out_dir_is_refused(tmp_path, run_in_process):
    """Two prepares on one --out_dir overlap: the second is one line and touches nothing; the first ends with the
    data a run alone makes."""
    corpus, out = tmp_path / "corpus.txt", tmp_path / "out"
    corpus.write_text(corpus_lines(3000), encoding="utf-8")
    first = start_prepare(*prepare_args(corpus, out))
    try:
        # the first holds the folder, half done, while the second runs
        first.send_signal(signal.SIGSTOP)
        status, _, err = run_in_process(prepare, *prepare_args(corpus, out))
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)
    assert_one_line(status, err, f"{out} is in use by another run (PID {first.pid})", "--out_dir")
    assert first.returncode == 0, first_err
    assert run_in_process(prepare, *prepare_args(corpus, tmp_path / "alone"))[0] == 0
    assert data_files(out) == data_files(tmp_path / "alone") and not (out / ".lock").exists()


def test_n10_globs_and_folders_through_symbolic_link_loops_read_each_file_once(tmp_path, run_script):
    folder = tmp_path / "c"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / "sub" / f"{i}.txt").write_text(corpus_lines(50, seed=i), encoding="utf-8")
    (folder / "self").symlink_to(".")          # a loop: c/self/self/self/...
    (folder / "sub" / "up").symlink_to("..")   # another, from below
    (folder / "same.txt").symlink_to("sub/0.txt")  # one file by two names
    for spec in (f"{folder}/**/*.txt", str(folder), f"{folder}/*/*.txt,{folder}/sub/0.txt"):
        out = tmp_path / f"out{len(spec)}"
        try:
            r = run_script("prepare.py", *prepare_args(spec, out, "--val_documents=1", "--test_documents=1"),
                           timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"--input={spec} did not end in 60 s")
        assert r.returncode == 0, r.stderr
        meta = json.loads((out / "meta.json").read_text())
        assert sum(s["documents"] for s in meta["splits"].values()) == 3, spec


@pytest.mark.parametrize("line, fragment", [
    (b'{"text": "half \\ud800 a character"}', "c.jsonl:2: the text holds a lone surrogate"),
    (b'{"text": "half \xed\xa0\x80 a character"}', "c.jsonl:2: the text holds a lone surrogate"),
    (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "c.jsonl:2: a JSON line nested too deeply"),
])
def test_n11_n12_json_lines_no_text_can_hold(line, fragment, tmp_path, run_in_process):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "fine"}\n' + line + b'\n{"text": "fine"}\n')
    status, _, err = run_in_process(prepare, *prepare_args(tmp_path / "c.jsonl", tmp_path / "out"))
    assert_one_line(status, err, fragment)
    assert not (tmp_path / "out").exists()


def write_parquet(path, texts):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": texts}), path)


def n13_file(tmp_path, case):
    """A file for a datasets builder that goes wrong while it streams: (builder, path)."""
    good = [json.dumps({"text": line}) for line in corpus_lines(40).splitlines()]
    lines = {"malformed": '{"text": "unclosed"', "latin-1": '{"text": "caf\xe9"}', "no field": '{"body": "x"}',
             "deep": '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"}
    if case == "corrupt parquet":
        write_parquet(tmp_path / "c.parquet", corpus_lines(200).splitlines())
        data = (tmp_path / "c.parquet").read_bytes()
        (tmp_path / "c.parquet").write_bytes(data[:len(data) // 2] + b"\0" * 64 + data[len(data) // 2 + 64:])
        return "parquet", tmp_path / "c.parquet"
    # (the deep line alone: pyarrow's reader segfaults on it; among other lines it raises)
    records = [lines[case]] if case == "deep" else good[:1] + [lines[case]] + good[1:]
    encoding = "latin-1" if case == "latin-1" else "utf-8"
    (tmp_path / "c.jsonl").write_bytes(("\n".join(records) + "\n").encode(encoding))
    return "json", tmp_path / "c.jsonl"


@pytest.mark.parametrize("case, fragment", [
    ("malformed", "cannot read json after"), ("latin-1", "cannot read json after"),
    # (here a segfault: "the process reading it ended with signal SIGSEGV"; with a deeper stack, an error)
    ("deep", "json"),
    ("no field", "json, example 1: no 'text' (missing or null"),
    ("corrupt parquet", "cannot read parquet after"),
])
def test_n13_a_dataset_that_fails_while_it_streams_is_one_line(case, fragment, tmp_path, run_in_process):
    """--hf_dataset reads in a child process: its errors, and pyarrow's segfault on a JSON line nested 100,000
    deep, are one line here."""
    pytest.importorskip("datasets")
    builder, path = n13_file(tmp_path, case)
    status, _, err = run_in_process(prepare, f"--hf_dataset={builder}", f"--hf_data_files={path}",
                                    f"--out_dir={tmp_path / 'out'}", "--vocab_size=300", "--workers=1")
    assert_one_line(status, err, fragment)
    assert "make room" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", [lambda gz: gz[:len(gz) // 2], lambda gz: gz[:30] + bytes(30) + gz[60:]])
def test_n14_a_truncated_or_corrupt_parquet_gz_is_one_line(damage, tmp_path, run_in_process):
    import gzip
    write_parquet(tmp_path / "c.parquet", corpus_lines(200).splitlines())
    (tmp_path / "c.parquet.gz").write_bytes(damage(gzip.compress((tmp_path / "c.parquet").read_bytes())))
    status, _, err = run_in_process(prepare, *prepare_args(tmp_path / "c.parquet.gz", tmp_path / "out"))
    assert_one_line(status, err, "c.parquet.gz is not a whole gzip file", "compress it again")


def test_n15_upper_case_gz_names_are_read_through_gzip(tmp_path, run_in_process):
    import gzip
    text = corpus_lines(200)
    records = "".join(json.dumps({"text": line}) + "\n" for line in text.splitlines(keepends=True))
    (tmp_path / "A.TXT.GZ").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "B.JSONL.GZ").write_bytes(gzip.compress(records.encode()))
    for name in ("A.TXT.GZ", "B.JSONL.GZ"):
        status, _, err = run_in_process(prepare, *prepare_args(tmp_path / name, tmp_path / name.lower()))
        assert status == 0, err
        meta = json.loads((tmp_path / name.lower() / "meta.json").read_text())
        assert sum(s["bytes"] for s in meta["splits"].values()) == len(text.encode())


@pytest.mark.parametrize("special, fragment", [
    ("a", "the special token 'a' can be the name of an ordinary token"),
    ("Ġthe", "the special token 'Ġthe' can be the name of an ordinary token"),
    ("", "a special token is empty"),
])
def test_n18_a_special_token_that_an_ordinary_token_is_called(special, fragment, tmp_path, run_in_process):
    """A special token named as the files name a byte or a learned token (' the' is written 'Ġthe'): vocab.json
    cannot hold both. prepare.py and tokenizer.py refuse it, and write nothing a loader would refuse."""
    (tmp_path / "c.txt").write_text(corpus_lines(300), encoding="utf-8")
    specials = f"--special_tokens={('<|endoftext|>', special)!r}"
    status, _, err = run_in_process(prepare, *prepare_args(tmp_path / "c.txt", tmp_path / "out", specials))
    assert_one_line(status, err, fragment)
    status, _, err = run_in_process(tokenizer, f"--train={tmp_path / 'c.txt'}", f"--out={tmp_path / 'tok'}",
                                    "--vocab_size=300", specials)
    assert_one_line(status, err, fragment)
    assert not (tmp_path / "out" / "meta.json").exists() and not (tmp_path / "tok").exists()


def test_n20_the_workers_of_a_killed_prepare_say_nothing(tmp_path):
    """kill -9 of prepare.py while its workers encode: they end with it, before any of them writes a result into
    the closed pipe (a BrokenPipeError traceback on the terminal, after the shell's prompt)."""
    corpus, out = tmp_path / "corpus.txt", tmp_path / "out"
    corpus.write_text(corpus_lines(2000) * 100, encoding="utf-8")  # 16 MB: seconds of ~0.1 s tasks
    BPETokenizer.train(corpus_lines(500), vocab_size=300).save(tmp_path / "tok")
    proc = subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), f"--input={corpus}", f"--out_dir={out}",
                             f"--tokenizer={tmp_path / 'tok'}", "--workers=2"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(out.glob(".partial/*.ids")) and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    # read until every process that holds the pipe, the workers too, has ended
    err = proc.stderr.read()
    proc.wait()
    assert "Traceback" not in err and "Error" not in err, err


def test_n21_an_input_folder_that_holds_the_output_and_hidden_folders(tmp_path, run_in_process):
    """--input=c --out_dir=c/data: the run passes over its own output (the same command runs twice, to the same
    data) and over hidden folders (.git/, .venv/)."""
    folder = tmp_path / "c"
    (folder / ".git").mkdir(parents=True)
    (folder / "a.txt").write_text(corpus_lines(200, seed=1), encoding="utf-8")
    (folder / "b.txt").write_text(corpus_lines(200, seed=2), encoding="utf-8")
    (folder / ".git" / "notes.txt").write_text("never read " * 100, encoding="utf-8")
    args = prepare_args(folder, folder / "data")
    assert run_in_process(prepare, *args)[0] == 0
    first = data_files(folder / "data")
    status, _, err = run_in_process(prepare, *args)
    assert status == 0, err
    assert data_files(folder / "data") == first
    meta = json.loads(first["meta.json"])
    size = sum(len((folder / name).read_bytes()) for name in ("a.txt", "b.txt"))
    assert sum(s["bytes"] for s in meta["splits"].values()) == size


def test_n22_an_existing_path_is_a_path_even_with_brackets_or_commas(tmp_path, run_in_process):
    text = corpus_lines(200)
    for name in ("[draft] 1.txt", "a,b.txt", "c.txt"):
        (tmp_path / name).write_text(text, encoding="utf-8")
    spec = f"{tmp_path / '[draft] 1.txt'},{tmp_path / 'a,b.txt'}, {tmp_path / 'c.txt'}"
    status, _, err = run_in_process(prepare, *prepare_args(spec, tmp_path / "out"))
    assert status == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert sum(s["bytes"] for s in meta["splits"].values()) == 3 * len(text.encode())
    status, _, err = run_in_process(prepare, *prepare_args(tmp_path / "b,[x].txt", tmp_path / "out2"))
    assert_one_line(status, err, "no file or folder")


def test_own_data_holds_out_a_test_split_by_default(tiny_data, tiny_ckpt, tmp_path, run_in_process):
    """Val and test, as the README says; data prepared without a test split names the flag that makes one."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": line}) + "\n"
                                              for line in corpus_lines(100).splitlines()), encoding="utf-8")
    status, _, err = run_in_process(prepare, *prepare_args(tmp_path / "c.jsonl", tmp_path / "out"))
    assert status == 0, err
    splits = json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]
    assert (splits["val"]["documents"], splits["test"]["documents"]) == (10, 10)
    no_test = tmp_path / "no-test"
    status, _, err = run_in_process(prepare, *prepare_args(tmp_path / "c.jsonl", no_test, "--test_fraction=0",
                                                           f"--tokenizer={tiny_data}"))
    assert status == 0, err
    status, _, err = run_in_process(evaluate, f"--model={tiny_ckpt}", f"--data_dir={no_test}", "--split=test",
                                    "--device=cpu")
    assert_one_line(status, err, f"{no_test} has no test split (it has train, val)", "--test_fraction=0.1")


# ----------------------------------------------------------------------------- prepare.py: --scrub_pii, --dedup

@pytest.mark.parametrize("flag, fragment", [
    ("--dedup=fuzzy", "--dedup must be one of off, exact, near, got 'fuzzy'"),
    ("--dedup=Exact", "--dedup must be one of off, exact, near, got 'Exact'"),
    ("--dedup_threshold=0", "--dedup_threshold must be > 0 and <= 1, got 0.0"),
    ("--dedup_threshold=1.5", "--dedup_threshold must be > 0 and <= 1, got 1.5"),
    ("--dedup_threshold=high", "--dedup_threshold must be float, got 'high'"),
    ("--dedup_memory_mb=0", "--dedup_memory_mb must be >= 1, got 0"),
    ("--scrub_pii=maybe", "--scrub_pii must be bool, got 'maybe'"),
])
def test_bad_scrub_and_dedup_flags_are_one_line_before_any_work(flag, fragment, tmp_path,
                                                                run_in_process):
    (tmp_path / "c.txt").write_text(corpus_lines(50), encoding="utf-8")
    status, _, err = run_in_process(prepare, *prepare_args(tmp_path / "c.txt", tmp_path / "out",
                                                           flag))
    assert_one_line(status, err, fragment)
    assert not (tmp_path / "out").exists()


def test_splits_that_dedup_empties_are_one_line_that_says_so(tmp_path, run_in_process):
    """A corpus of one document again and again: --dedup keeps the first, in train, and leaves val
    and test empty; with the first held out, it leaves train empty."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text((json.dumps({"text": "the same words"}) + "\n") * 30, encoding="utf-8")
    status, _, err = run_in_process(prepare, *prepare_args(corpus, tmp_path / "a", "--dedup=exact"))
    last = err.strip().splitlines()[-1]
    assert status == 2 and "Traceback" not in err, err
    assert last.startswith("error: the corpus leaves the val and test split empty (1 documents in "
                           "all once 29 copies were left out (--dedup))"), last
    status, _, err = run_in_process(prepare, *prepare_args(corpus, tmp_path / "b", "--dedup=near",
                                                           "--val_documents=1"))
    last = err.strip().splitlines()[-1]
    assert status == 2 and "Traceback" not in err, err
    assert last.startswith("error: --dedup leaves the train split empty: its 29 documents all "
                           "repeat earlier ones"), last
