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
from checkpoint import CHECKPOINT_NAME, folder_lock
from cli import UserError
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


def test_sigterm_saves_like_ctrl_c(tiny_data, tmp_path, signal_training):
    out = tmp_path / "out"
    returncode, stdout, stderr = signal_training(signal.SIGTERM, f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY,
                                                 "--max_iters=100000", "--eval_interval=100000")
    assert returncode == 0, stderr
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
                      "print('counting', flush=True)\n"
                      "count_pretokens_parallel(['some words and more words ' * 400_000], min_chars=0)\n")
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
    assert "".join(serve.text_until_stop(["a" * 7] * 2000, [stop])) == "a" * 14_000
    assert "".join(serve.text_until_stop(["a" * 7] * 2000 + ["b", "c"], [stop])) == "a" * (14_000 - len(stop) + 1)


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
    assert proc.returncode == 0 and time.time() - t0 < 30, stderr
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
