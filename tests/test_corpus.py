"""Any corpus, any size: prepare.py on folders of text, JSON lines, Parquet and gzip, on datasets' local loaders
(the hub's code path, offline), an interrupted run, uint32 ids, and train.py's memory on a multi-GB train.bin."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import corpus
import data
import prepare
from cli import UserError
from data import load_tokenizer
from tokenizer import BPETokenizer, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the river valley was named after a café owner in 1887 ; it grew to 4 000 people and its church 中文".split()


def make_documents(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"Document {i}.\n" + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + "\n" for i in range(n)]


def write_jsonl(path, docs, field="text"):
    lines = "".join(json.dumps({"id": i, field: doc}) + "\n" for i, doc in enumerate(docs))
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")


def write_parquet(path, docs, field="text"):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=7)


def documents_of(out_dir, split):
    """The texts of a split's documents, read back from its .bin."""
    meta, tok = data.load_meta(out_dir), load_tokenizer(out_dir)
    ids = data.load_split(out_dir, split).tolist()
    starts = [i for i, t in enumerate(ids) if t == meta["eot_id"]] + [len(ids)]
    return [tok.decode(ids[a + 1:b]) for a, b in zip(starts, starts[1:])]


def prepare_into(out_dir, **settings):
    return prepare.prepare_data(prepare.PrepareConfig(out_dir=str(out_dir), vocab_size=300, workers=2, **settings))

# ----------------------------------------------------------------------------- which documents go where


def test_held_out_documents_are_spread_evenly_and_whole():
    config = prepare.PrepareConfig(val_fraction=0.1, test_fraction=0.05)
    splits = [corpus.split_of(i, config) for i in range(1000)]
    assert splits.count("val") == 100 and splits.count("test") == 50
    assert [(i, s) for i, s in enumerate(splits[:45]) if s != "train"] == [
        (3, "val"), (9, "test"), (16, "val"), (23, "val"), (29, "test"), (36, "val"), (43, "val")]
    gaps = np.diff([i for i, s in enumerate(splits) if s != "train"])
    assert set(gaps) <= {6, 7}  # every 6.67th document
    config = prepare.PrepareConfig(val_fraction=0.1, test_fraction=0)
    assert [i for i in range(40) if corpus.split_of(i, config) == "val"] == [4, 14, 24, 34]
    config = prepare.PrepareConfig(val_documents=3, test_documents=2)
    assert [corpus.split_of(i, config) for i in range(7)] == ["val"] * 3 + ["test"] * 2 + ["train"] * 2


def test_a_folder_of_text_jsonl_parquet_and_gzip(tmp_path):
    docs = make_documents(60)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")                 # a text file: one document
    with gzip.open(folder / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[1])
    write_jsonl(folder / "c.jsonl", docs[2:20])
    write_jsonl(folder / "sub" / "d.jsonl.gz", docs[20:40])
    write_parquet(folder / "sub" / "e.parquet", docs[40:60])
    (folder / "notes.csv").write_text("not, a, corpus file")                 # skipped: not a corpus suffix
    meta = prepare_into(tmp_path / "out", input=str(folder), val_fraction=0.1, test_fraction=0.1)

    config = prepare.PrepareConfig(val_fraction=0.1, test_fraction=0.1)
    expected = {split: [d for i, d in enumerate(docs) if corpus.split_of(i, config) == split] for split in data.SPLITS}
    for split in data.SPLITS:
        assert documents_of(tmp_path / "out", split) == expected[split]
        assert meta["splits"][split]["documents"] == len(expected[split])
        assert meta["splits"][split]["bytes"] == sum(len(d.encode()) for d in expected[split])
    assert meta["dataset"] == "corpus" and meta["dtype"] == "uint16"
    assert not (tmp_path / "out" / ".partial").exists()


def test_datasets_local_loaders_take_the_hub_path(tmp_path):
    pytest.importorskip("datasets")
    docs = make_documents(40)
    write_jsonl(tmp_path / "x.jsonl", docs, field="content")
    write_parquet(tmp_path / "x.parquet", docs, field="content")
    prepare_into(tmp_path / "files", input=str(tmp_path / "x.jsonl"), text_field="content", val_documents=4)
    prepare_into(tmp_path / "hf-json", hf_dataset="json", hf_data_files=str(tmp_path / "x.jsonl"),
                 text_field="content", val_documents=4)
    meta = prepare_into(tmp_path / "hf-parquet", hf_dataset="parquet", hf_data_files=str(tmp_path / "x.parquet"),
                        text_field="content", val_documents=4)
    assert documents_of(tmp_path / "files", "val") == docs[:4]
    for name in ("hf-json", "hf-parquet"):
        for file in ("train.bin", "val.bin", "vocab.json", "merges.txt"):
            assert (tmp_path / name / file).read_bytes() == (tmp_path / "files" / file).read_bytes(), (name, file)
    assert meta["dataset"] == "parquet" and meta["splits"]["train"]["documents"] == 36


@pytest.mark.parametrize("make, fragment", [
    (lambda p: write_jsonl(p / "c.jsonl", ["a b c"], field="body"), "c.jsonl:1: no 'text' field (fields: id, body)"),
    (lambda p: (p / "c.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n'), "c.jsonl:2: not a JSON line"),
    (lambda p: (p / "c.jsonl").write_text('{"text": ["a", "list"]}\n'), "c.jsonl:1: the 'text' field is a list"),
    (lambda p: (p / "c.jsonl").write_text('[1, 2]\n'), "c.jsonl:1: a record is a list"),
    (lambda p: (p / "c.txt").write_bytes(b"caf\xe9 au lait\n" * 3), "c.txt is not UTF-8 text (byte 3)"),
    (lambda p: (p / "c.txt.gz").write_bytes(gzip.compress(" ".join(map(str, range(20000))).encode())[:9000]),
     "is not a whole gzip file"),
    (lambda p: (p / "c.parquet").write_bytes(b"PAR1 not really"), "cannot read"),
    (lambda p: (p / "c.txt").write_text("   \n\n"), "the corpus is empty"),
])
def test_bad_input_is_one_line(tmp_path, run_in_process, make, fragment):
    folder = tmp_path / "in"
    folder.mkdir()
    make(folder)
    status, _, err = run_in_process(prepare, f"--input={folder}", f"--out_dir={tmp_path / 'out'}", "--vocab_size=300")
    assert status == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    assert fragment in err, err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_inputs_that_name_nothing(tmp_path):
    with pytest.raises(UserError, match="nothing matches"):
        corpus.find_files(str(tmp_path / "*.jsonl"))
    with pytest.raises(UserError, match="no file or folder"):
        corpus.find_files(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="holds no .txt"):
        corpus.find_files(str(tmp_path))

# ----------------------------------------------------------------------------- bounded memory, any vocabulary


def test_tokenizer_learns_from_the_first_tokenizer_chars(tmp_path):
    docs = make_documents(200)
    write_jsonl(tmp_path / "c.jsonl", docs)
    prepare_into(tmp_path / "out", input=str(tmp_path / "c.jsonl"), tokenizer_chars=2000)
    config = prepare.PrepareConfig(val_fraction=0.1)
    train = [d for i, d in enumerate(docs) if corpus.split_of(i, config) == "train"]
    seen, sample = 0, []
    for doc in train:
        sample.append(doc[:2000 - seen])
        seen += len(doc)
        if seen >= 2000:
            break
    expected = BPETokenizer.train(sample, vocab_size=300)
    assert load_tokenizer(tmp_path / "out").fingerprint() == expected.fingerprint()
    assert BPETokenizer.train(train, vocab_size=300).fingerprint() != expected.fingerprint()


def big_tokenizer():
    """A tokenizer with 65,793 ids (every pair of bytes is a merge): the token files need uint32."""
    merges = [(bytes([a]), bytes([b])) for a in range(256) for b in range(256)]
    return Tokenizer(merges, {"<|endoftext|>": 256 + len(merges)})


def test_vocabularies_beyond_65536_ids_take_uint32(tmp_path, run_train):
    big_tokenizer().save(tmp_path / "tok")
    docs = make_documents(30)
    write_jsonl(tmp_path / "c.jsonl", docs)
    meta = prepare_into(tmp_path / "data", input=str(tmp_path / "c.jsonl"), tokenizer=str(tmp_path / "tok"),
                        test_fraction=0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65_793 and meta["tokenizer"]["kind"] == "folder"
    ids = data.load_split(tmp_path / "data", "train")
    assert ids.dtype == np.uint32 and ids.max() > 65_535
    assert documents_of(tmp_path / "data", "val") == [docs[4], docs[14], docs[24]]
    run_train(f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}", "--num_hidden_layers=1",
              "--hidden_size=16", "--num_attention_heads=2", "--block_size=16", "--batch_size=2", "--max_iters=2",
              "--eval_interval=2", "--eval_iters=1", "--compile=False", "--device=cpu")
    assert (tmp_path / "run" / "ckpt.pt").is_file()


def train_peak_rss_mb(data_dir, out_dir):
    """Peak resident memory of a short train.py run on data_dir, in MB, measured by a parent of its own."""
    args = [sys.executable, str(ROOT / "train.py"), f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            "--num_hidden_layers=1", "--hidden_size=16", "--num_attention_heads=2", "--block_size=64",
            "--batch_size=8", "--max_iters=30", "--eval_interval=10", "--eval_iters=5", "--compile=False",
            "--device=cpu"]
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr
    return int(r.stdout) / 1024


def test_train_memory_does_not_grow_with_train_bin(tiny_data, tmp_path):
    """A 2 GB train.bin (sparse: no disk used) takes no more memory than the 30 kB one: it is read through a
    memmap, a batch at a time (and its check at load leaves no page cache behind)."""
    big = tmp_path / "big"
    big.mkdir()
    for name in ("meta.json", "val.bin", "test.bin", "vocab.json", "merges.txt", "tokenizer.json"):
        (big / name).write_bytes((tiny_data / name).read_bytes())
    with open(big / "train.bin", "wb") as f:
        f.write((tiny_data / "train.bin").read_bytes())
        f.truncate(2 << 30)  # zeros beyond: id 0, a valid id
    small_mb = train_peak_rss_mb(tiny_data, tmp_path / "run-small")
    big_mb = train_peak_rss_mb(big, tmp_path / "run-big")
    assert big_mb < small_mb + 100, (small_mb, big_mb)

# ----------------------------------------------------------------------------- interrupted runs


def slow_corpus(tmp_path, mb=12):
    """A corpus that takes seconds to encode, with a tokenizer of its own (no training to wait for)."""
    docs = make_documents(2000)
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as f:
        written = 0
        while written < mb * 1_000_000:
            for doc in docs:
                written += f.write(json.dumps({"text": doc * 20}) + "\n")
    BPETokenizer.train(docs, vocab_size=300).save(tmp_path / "tok")
    return [sys.executable, str(ROOT / "prepare.py"), f"--input={tmp_path / 'big.jsonl'}",
            f"--out_dir={tmp_path / 'out'}", f"--tokenizer={tmp_path / 'tok'}", "--workers=2", "--test_fraction=0"]


def start_and_wait_for_ids(args, tmp_path):
    """prepare.py in a process group of its own, Ctrl-C answered as in a terminal (a suite started in the background
    hands its children SIGINT ignored), returned once its workers have written ids."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not list((tmp_path / "out" / ".partial").glob("*.ids")) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    return proc


def test_kill_9_leaves_no_half_file_and_the_same_command_starts_over(tmp_path):
    args = slow_corpus(tmp_path)
    proc = start_and_wait_for_ids(args, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: prepare.py and its workers
    proc.wait()
    out = tmp_path / "out"
    # nothing under a final name (the work files, and the lock file that a kill leaves: no one holds it)
    assert not [p.name for p in out.iterdir() if p.name not in (".partial", ".lock")]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "holds a run that did not finish: starting over, with the tokenizer it trained" in r.stderr
    meta = data.load_meta(out)
    assert sum(s["tokens"] for s in meta["splits"].values()) == sum(
        (out / f"{s}.bin").stat().st_size // 2 for s in meta["splits"])
    assert not (out / ".partial").exists()
    assert documents_of(out, "val")[0] == json.loads((tmp_path / "big.jsonl").open().readlines()[4])["text"]


def test_ctrl_c_is_one_line_and_keeps_the_old_data(tmp_path):
    args = slow_corpus(tmp_path, mb=48)  # ~4 s of encoding on 2 cores: Ctrl-C comes well before its end
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # an earlier dataset's file: not replaced by a stopped run
    proc = start_and_wait_for_ids(args + ["--overwrite=True"], tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the terminal signals the whole group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: nothing was written under a final name in {out}; the "
                                            f"same command starts over"), err
    assert "Traceback" not in err and (out / "meta.json").read_text() == "{}"


def test_a_full_disk_is_one_line_and_nothing_under_a_final_name(tmp_path, monkeypatch, run_in_process):
    docs = make_documents(30)
    write_jsonl(tmp_path / "c.jsonl", docs)

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(prepare, "concatenate", full)
    status, _, err = run_in_process(prepare, f"--input={tmp_path / 'c.jsonl'}", f"--out_dir={tmp_path / 'out'}",
                                    "--vocab_size=300", "--workers=1")
    assert status == 2 and err.splitlines()[-1] == (
        f"error: cannot write in {tmp_path / 'out'} (No space left on device): nothing was written under a final "
        f"name; make room and run the same command again"), err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".partial"]

