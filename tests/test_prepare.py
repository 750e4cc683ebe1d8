"""Tests for prepare.py: splitting, encoding round trips, meta.json, downloads (against a local HTTP server), errors."""

import hashlib
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import corpus
import data
import prepare
from cli import UserError
from tokenizer import BPETokenizer, load_tokenizer

WORDS = ("the river valley was named after a café owner in 1887 ; it grew to 4 @,@ 000 people , "
         "and its <unk> church ( built of stone ) still stands near the old bridge").split()


def article(title, n_lines, seed):
    """A WikiText-shaped article: blank line, ' = Title = ', sections, every line starting with a space."""
    rng = np.random.default_rng(seed)
    lines = [" ", f" = {title} = ", " "]
    for i in range(n_lines):
        if i % 3 == 2:
            lines += [" ", f" = = Section {i} = = ", " "]
        lines.append(" " + " ".join(rng.choice(WORDS, size=12)) + " . ")
    return "\n".join(lines) + "\n"


def write_corpus(folder, ext="raw", n_articles=(6, 2, 2)):
    texts = {}
    for split, theirs, n in zip(data.SPLITS, ("train", "valid", "test"), n_articles):
        texts[split] = "".join(article(f"{split.title()} Article {i}", 6, hash((split, i)) % 1000) for i in range(n))
        (folder / f"wiki.{theirs}.{ext}").write_text(texts[split], encoding="utf-8")
    return texts


def small_config(tmp_path, **kw):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    defaults = dict(source=str(src), out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                    vocab_size=300, check_sha256=False)
    return prepare.PrepareConfig(**(defaults | kw))


# ----------------------------------------------------------------------------- splitting and counting

def test_wikitext_articles_split_at_titles_and_keep_every_byte():
    text = article("One", 4, 1) + article("Two", 4, 2) + article("Three", 1, 3)
    docs = prepare.wikitext_articles(text)
    assert "".join(docs) == text
    assert [d.split("\n")[1] for d in docs] == [" = One = ", " = Two = ", " = Three = "]
    assert all(d.startswith(" \n = ") for d in docs)
    assert prepare.wikitext_articles("no heading here\n") == ["no heading here\n"]


def test_count_words_conventions():
    assert data.count_words("a b\nc d e\n") == 5
    assert data.count_words("a b\nc d e\n", "classic") == 7  # one <eos> per line
    assert data.count_words("a b\nc", "classic") == 5        # an unterminated last line still ends
    assert data.count_words(" \n \n", "classic") == 2        # blank lines count their <eos>
    assert data.count_words("", "classic") == 0
    with pytest.raises(ValueError):
        data.count_words("a", "bytes")


def test_fast_word_count_is_str_split():
    rng = np.random.default_rng(0)
    chars = [" ", "\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1f", "\x85", "\xa0", "\u3000", "\u2009", "a", "é", "中",
             "🙂", "b", "\x00"]
    for _ in range(2000):
        text = "".join(rng.choice(chars, size=int(rng.integers(0, 30))))
        assert data.count_words(text) == len(text.split()), repr(text)


def test_classic_word_count_of_real_wikitext2(shared_data):
    expected = {"test": 245_569, "valid": 217_646, "train": 2_088_628}  # the WikiText paper's figures
    for split, n in expected.items():
        text = (shared_data / "wikitext-2" / f"wiki.{split}.tokens").read_text(encoding="utf-8")
        assert data.count_words(text, "classic") == n


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 3])
def test_the_tail_of_text_files_is_cut_at_a_line_start(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", chunk_bytes)  # a line break sought across chunks too
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("aaaa\nbbbb\n")
    b.write_text("cccc\ndddd\n")

    def documents(files, **kw):
        stream = prepare.by_tail(corpus.Corpus(files), prepare.PrepareConfig(**kw))
        docs = []
        for split, starts, text in stream:
            docs += [[split, ""]] if starts else []
            docs[-1][1] += text
        return [tuple(d) for d in docs]
    assert documents([a, b], val_fraction=0.4) == [("train", "aaaa\nbbbb\n"), ("train", "cccc\n"), ("val", "dddd\n")]
    assert documents([a], val_fraction=0.5) == [("train", "aaaa\n"), ("val", "bbbb\n")]  # already at a line start
    assert documents([a, b], val_fraction=0.3, test_fraction=0.3) == [
        ("train", "aaaa\nbbbb\n"), ("val", "cccc\n"), ("test", "dddd\n")]


# ----------------------------------------------------------------------------- the whole pipeline

def test_memmaps_decode_back_to_each_split(tmp_path):
    config = small_config(tmp_path)
    texts = write_corpus(Path(config.source))
    texts["val"] += " text that spells <|endoftext|> is ordinary text . \n"
    (Path(config.source) / "wiki.valid.raw").write_text(texts["val"], encoding="utf-8")
    meta = prepare.prepare_data(config)
    tok = load_tokenizer(config.out_dir)
    assert meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] == tok.vocab_size <= 300
    for split, text in texts.items():
        ids = data.load_split(config.out_dir, split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and not ids.flags.writeable
        assert len(ids) == meta["splits"][split]["tokens"] == (Path(config.out_dir) / f"{split}.bin").stat().st_size // 2
        eot = ids == meta["eot_id"]
        assert eot[0] and eot.sum() == meta["splits"][split]["documents"] == len(prepare.wikitext_articles(text))
        assert tok.decode(ids[~eot].tolist()) == text
    assert not list(Path(config.out_dir).glob("*.tmp"))


def test_meta_counts_on_a_known_text(tmp_path):
    config = small_config(tmp_path, dataset="wikitext-2")
    write_corpus(Path(config.source), ext="tokens")
    test_text = " \n = Café = \n \n Un café , s'il vous plaît . \n \n = Tea = \n \n Two words \n"
    (Path(config.source) / "wiki.test.tokens").write_text(test_text, encoding="utf-8")
    meta = prepare.prepare_data(config)
    assert meta == data.load_meta(config.out_dir)
    assert meta["dataset"] == "wikitext-2" and meta["word_convention"] == "classic"
    test = meta["splits"]["test"]
    assert test["documents"] == 2
    assert test["bytes"] == len(test_text) + 3  # é, é and î take two bytes each
    assert test["words_whitespace"] == 3 + 7 + 3 + 2
    assert test["words_classic"] == 15 + 8  # eight lines
    assert meta["special_tokens"] == {"<|endoftext|>": meta["eot_id"]}


def test_input_files_hold_out_the_tail_for_val(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"line {i} of the first file\n" for i in range(60)), encoding="utf-8")
    b.write_text("".join(f"line {i} of the second file\n" for i in range(40)), encoding="utf-8")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "test.bin").write_bytes(b"stale")
    meta = prepare.prepare_data(prepare.PrepareConfig(input=f"{a},{b}", out_dir=str(out), vocab_size=300, val_fraction=0.2))
    assert set(meta["splits"]) == {"train", "val"} and not (out / "test.bin").exists()
    assert meta["dataset"] == "a+b" and meta["word_convention"] == "whitespace"
    tok = load_tokenizer(out)
    val = data.load_split(out, "val")
    val_text = tok.decode(val[val != meta["eot_id"]].tolist())
    total = len(a.read_text()) + len(b.read_text())
    assert val_text.startswith("line ") and b.read_text().endswith(val_text)  # the tail, cut at a line break
    assert abs(len(val_text) - 0.2 * total) < 30
    assert meta["splits"]["train"]["documents"] == 2 and meta["splits"]["val"]["documents"] == 1
    assert "train.bin" in capsys.readouterr().out


def test_long_documents_encode_in_chunks_like_whole(tmp_path):
    texts = write_corpus(tmp_path)
    tok = BPETokenizer.train(texts["train"], vocab_size=300)
    tok.save(tmp_path / "tok")
    doc = "First line.\nSecond line\n" + texts["val"] + "A\nB\nC\n" * 50 + "中文\n字 " * 40
    chunks = [doc[i:i + 37] for i in range(0, len(doc), 37)]  # cut anywhere, as a file is read
    stream = [("test", n == 0, chunk) for n, chunk in enumerate(chunks)] + [("test", True, "x")]
    pieces = list(prepare.in_pieces(stream, size=64))
    assert len(pieces) > 10 and "".join(p for _, _, p in pieces) == doc + "x"
    assert [starts for _, starts, _ in pieces].count(True) == 2
    stats = prepare.encode_batch(str(tmp_path / "tok"), "uint16", pieces)
    ids = np.fromfile(tmp_path / "tok" / stats["test"]["file"], dtype=np.uint16)
    assert ids.tolist() == [tok.eot_id] + tok.encode(doc) + [tok.eot_id] + tok.encode("x")
    assert stats["test"]["documents"] == 2 and stats["test"]["bytes"] == len((doc + "x").encode())


def test_gpt2_tokenizer_from_local_folder(tmp_path, shared_data):
    config = small_config(tmp_path, tokenizer="gpt2", gpt2_dir=str(shared_data / "gpt2"))
    texts = write_corpus(Path(config.source))
    meta = prepare.prepare_data(config)
    assert meta["tokenizer"]["kind"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_id"] == 50256
    ref = BPETokenizer.load(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")
    ids = data.load_split(config.out_dir, "val")
    expected = []
    for doc in prepare.wikitext_articles(texts["val"]):
        expected += [50256] + ref.encode(doc)
    assert ids.tolist() == expected
    assert load_tokenizer(config.out_dir).encode(texts["test"]) == ref.encode(texts["test"])


def test_gpt2_dir_missing_file(tmp_path):
    config = small_config(tmp_path, tokenizer="gpt2", gpt2_dir=str(tmp_path))
    write_corpus(Path(config.source))
    with pytest.raises(UserError, match="encoder.json"):
        prepare.prepare_data(config)


# ----------------------------------------------------------------------------- refusals

def test_oversized_vocab_refused_before_any_work(tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(prepare, "download", no_work)
    monkeypatch.setattr(prepare, "wikitext_splits", no_work)
    monkeypatch.setattr(BPETokenizer, "train", no_work)
    config = prepare.PrepareConfig(vocab_size=(1 << 20) + 1, out_dir=str(tmp_path / "out"),
                                   cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="vocab_size"):
        prepare.prepare_data(config)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    prepare.check_config(replace(config, vocab_size=100_277))  # beyond 65,536 ids: uint32 token files
    with pytest.raises(UserError, match="--vocab_size must be >= 257"):
        prepare.check_config(replace(config, vocab_size=200))
    with pytest.raises(UserError, match="endoftext"):
        prepare.check_config(replace(config, vocab_size=8192, special_tokens=("<|pad|>",)))


def test_modified_source_file_refused(tmp_path):
    config = small_config(tmp_path, check_sha256=True)
    write_corpus(Path(config.source))
    with pytest.raises(UserError, match="check_sha256=False"):
        prepare.prepare_data(config)
    assert not Path(config.out_dir).exists()


def test_source_zip_is_read_like_a_folder(tmp_path):
    import zipfile
    config = small_config(tmp_path)
    texts = write_corpus(Path(config.source))
    zip_path = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for f in Path(config.source).iterdir():
            z.write(f, f"wikitext-2-raw/{f.name}")
    assert prepare.wikitext_splits(replace(config, source=str(zip_path))) == texts


def test_cli_source_missing_file_is_one_line(tmp_path, run_script):
    src = tmp_path / "src"
    src.mkdir()
    write_corpus(src)
    (src / "wiki.train.raw").unlink()
    r = run_script("prepare.py", f"--source={src}", cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "wiki.train.raw" in r.stderr and "wiki.valid.raw" not in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_load_helpers_say_run_prepare_first(tmp_path):
    with pytest.raises(UserError, match=r"no meta.json in .*run prepare.py first"):
        data.load_meta(tmp_path / "wikitext-2")
    with pytest.raises(UserError, match=r"no val.bin in .*python prepare.py"):
        data.load_split(tmp_path, "val")

# ----------------------------------------------------------------------------- downloads


def test_unreachable_server_says_use_source(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(prepare, "WIKITEXT_MIRRORS", (f"http://127.0.0.1:{port}/",))
    config = prepare.PrepareConfig(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="--source") as e:
        prepare.wikitext_splits(config)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("*.zip"))


def test_wikitext_download_end_to_end(http_server, tmp_path, monkeypatch):
    import io
    import zipfile
    texts = write_corpus(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in tmp_path.glob("wiki.*"):
            z.write(f, f"wikitext-2-raw/{f.name}")
    http_server.files["/wikitext-2-raw-v1.zip"] = buf.getvalue()
    monkeypatch.setattr(prepare, "WIKITEXT_MIRRORS", (http_server.url + "/",))
    spec = prepare.WIKITEXT["wikitext-2-raw"] | {"sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    monkeypatch.setitem(prepare.WIKITEXT, "wikitext-2-raw", spec)
    config = prepare.PrepareConfig(cache_dir=str(tmp_path / "cache"), check_sha256=False)
    assert prepare.wikitext_splits(config) == texts
    assert (tmp_path / "cache" / "wikitext-2-raw-v1.zip").is_file()


def test_data_of_another_tokenizer_is_replaced_only_when_asked(tmp_path):
    config = small_config(tmp_path)
    write_corpus(Path(config.source))
    prepare.prepare_data(config)
    before = (Path(config.out_dir) / "train.bin").read_bytes()
    prepare.prepare_data(config)  # the same tokenizer again: the same data, written again
    with pytest.raises(UserError, match="holds data made with another tokenizer: .* --overwrite=True"):
        prepare.prepare_data(replace(config, vocab_size=280))
    assert (Path(config.out_dir) / "train.bin").read_bytes() == before
    assert prepare.prepare_data(replace(config, vocab_size=280, overwrite=True))["vocab_size"] == 280


def test_gpt2_tokenized_data_gets_a_folder_of_its_own(tmp_path, shared_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small_config(tmp_path, tokenizer="gpt2", gpt2_dir=str(shared_data / "gpt2"), out_dir="")
    write_corpus(Path(config.source))
    prepare.prepare_data(config)
    assert (tmp_path / "data" / "wikitext-2-raw-gpt2" / "meta.json").is_file()
    assert not (tmp_path / "data" / "wikitext-2-raw").exists()


def test_the_tokenized_release_names_its_unknown_word(tmp_path):
    config = small_config(tmp_path, dataset="wikitext-2")
    write_corpus(Path(config.source), ext="tokens")
    assert prepare.prepare_data(config)["unknown_word"] == "<unk>"
