"""Tests for prepare.py: splitting, encoding round trips, meta.json, downloads (against a local HTTP server), errors."""

import hashlib
import json
import socket
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import clean
import corpus
import data
import prepare
import scrub
from cli import UserError
from data import load_tokenizer
from pii_labelled import lookalikes, positives
from tokenizer import BPETokenizer

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
    docs = corpus.wikitext_articles(text)
    assert "".join(docs) == text
    assert [d.split("\n")[1] for d in docs] == [" = One = ", " = Two = ", " = Three = "]
    assert all(d.startswith(" \n = ") for d in docs)
    assert corpus.wikitext_articles("no heading here\n") == ["no heading here\n"]


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
        stream = corpus.by_tail(corpus.Corpus(files), prepare.PrepareConfig(**{"test_fraction": 0} | kw))
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
        assert eot[0] and eot.sum() == meta["splits"][split]["documents"] == len(corpus.wikitext_articles(text))
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
    config = prepare.PrepareConfig(input=f"{a},{b}", out_dir=str(out), vocab_size=300, val_fraction=0.2,
                                   test_fraction=0)
    meta = prepare.prepare_data(config)
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
    pieces = list(corpus.in_pieces(stream, size=64))
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
    for doc in corpus.wikitext_articles(texts["val"]):
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
    monkeypatch.setattr(corpus, "download", no_work)
    monkeypatch.setattr(corpus, "wikitext_splits", no_work)
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
    assert corpus.wikitext_splits(replace(config, source=str(zip_path))) == texts


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
    monkeypatch.setattr(corpus, "WIKITEXT_MIRRORS", (f"http://127.0.0.1:{port}/",))
    config = prepare.PrepareConfig(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="--source") as e:
        corpus.wikitext_splits(config)
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
    monkeypatch.setattr(corpus, "WIKITEXT_MIRRORS", (http_server.url + "/",))
    spec = corpus.WIKITEXT["wikitext-2-raw"] | {"sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    monkeypatch.setitem(corpus.WIKITEXT, "wikitext-2-raw", spec)
    config = prepare.PrepareConfig(cache_dir=str(tmp_path / "cache"), check_sha256=False)
    assert corpus.wikitext_splits(config) == texts
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


# ----------------------------------------------------------------------------- personal data and duplicates

PII = {"EMAIL": "qqzx.wkwk@example.com", "PHONE": "+44 20 7946 0958", "IP": "203.0.113.7",
       "CARD": "4111 1111 1111 1111", "IBAN": "DE89 3704 0044 0532 0130 00", "SSN": "123-45-6789",
       "SECRET": "AKIAIOSFODNN7EXAMPLE"}
# (no numbers beside a planted one: "1887 4111 1111 1111 1111" is no card)
PLAIN_WORDS = [word for word in WORDS if not any(c.isdigit() for c in word)]
KEY_BLOCK = ("-----BEGIN RSA PRIVATE KEY-----\n"
             + "\n".join(["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"] * 4)
             + "\n-----END RSA PRIVATE KEY-----")


def write_jsonl(path, documents):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")


def split_documents(out_dir):
    """{split: [its documents' texts]}, read back from the .bin files."""
    meta, tok = data.load_meta(out_dir), load_tokenizer(out_dir)
    documents = {}
    for split in meta["splits"]:
        ids = data.load_split(out_dir, split).tolist()
        starts = [i for i, t in enumerate(ids) if t == meta["eot_id"]] + [len(ids)]
        documents[split] = [tok.decode(ids[a + 1:b]) for a, b in zip(starts, starts[1:])]
    return documents


def pii_corpus(n=200, seed=0):
    """n documents of random words, every fifth with a piece of personal data of each kind in turn;
    and the kinds planted."""
    rng = np.random.default_rng(seed)
    documents, planted = [], Counter()
    for i in range(n):
        words = list(rng.choice(PLAIN_WORDS, size=int(rng.integers(8, 30))))
        if i % 5 == 0:
            kind = list(PII)[i // 5 % len(PII)]
            words.insert(int(rng.integers(len(words))), PII[kind])
            planted[kind] += 1
        documents.append(" ".join(words) + "\n")
    return documents, planted


def test_personal_data_is_replaced_before_the_tokenizer_learns_and_counted(tmp_path, monkeypatch,
                                                                            capsys):
    documents, planted = pii_corpus()
    write_jsonl(tmp_path / "c.jsonl", documents)
    learned_from = []
    train = BPETokenizer.train.__func__

    def spy(cls, texts, **kw):
        learned_from.extend(texts)
        return train(cls, learned_from, **kw)
    monkeypatch.setattr(BPETokenizer, "train", classmethod(spy))
    config = prepare.PrepareConfig(input=str(tmp_path / "c.jsonl"), out_dir=str(tmp_path / "out"),
                                   vocab_size=300, workers=2, scrub_pii=True)
    meta = prepare.prepare_data(config)
    assert meta["scrub_pii"] == {kind: planted[kind] for kind in scrub.KINDS}
    assert sum(planted.values()) == 40 and min(planted.values()) >= 5
    assert meta["scrub_pii_backends"] == scrub.backends() and meta == data.load_meta(config.out_dir)
    learned = "".join(learned_from)
    texts = {split: "".join(docs) for split, docs in split_documents(config.out_dir).items()}
    for text in [learned, *texts.values()]:
        assert not any(value in text for value in PII.values())
    # every find, in whichever split, is its placeholder now; the rest of the text is as it was
    assert {kind: sum(t.count(scrub.PLACEHOLDER[kind]) for t in texts.values()) for kind in PII} \
        == planted
    assert "<EMAIL>" in learned and sorted(sum(split_documents(config.out_dir).values(), [])) == \
        sorted(scrub.scrub(d)[0] for d in documents)
    summary = capsys.readouterr().out
    said = f"personal data replaced: {planted['SECRET']} SECRET, {planted['EMAIL']} EMAIL"
    assert said in summary


def test_a_long_document_is_scrubbed_in_pieces_as_it_is_whole():
    """Pieces cut at spaces split spaced numbers and key blocks; scrub_pieces cuts them again where
    no find can run across, and where encoding is unaffected."""
    rng = np.random.default_rng(1)
    values = [*PII.values(), KEY_BLOCK]
    lines = []
    for i in range(300):
        words = list(rng.choice(PLAIN_WORDS, size=int(rng.integers(3, 12))))
        if i % 3 == 0:
            words.insert(int(rng.integers(len(words))), values[i // 3 % len(values)])
        lines.append(" ".join(words) + rng.choice([" ", "\n", " \n", ". ", "\nthe "]))
    document = "".join(lines)
    chunks = [document[i:i + 37] for i in range(0, len(document), 37)]
    pieces = list(corpus.in_pieces([("train", n == 0, c) for n, c in enumerate(chunks)], size=80))
    # scrubbed one by one, the pieces would leave personal data behind
    assert "".join(scrub.scrub(p)[0] for _, _, p in pieces) != scrub.scrub(document)[0]
    found = {}
    out = list(clean.scrubbed(iter(pieces), scrub, None, 1, found))
    whole, counts = scrub.scrub(document)
    assert "".join(text for _, _, text in out) == whole and found == {"train": counts}
    assert counts["SECRET"] >= 10 and len(out) > 20
    assert [starts for _, starts, _ in out] == [True] + [False] * (len(out) - 1)
    tok = BPETokenizer.train(whole, vocab_size=400)
    assert sum((tok.encode(text) for _, _, text in out), []) == tok.encode(whole)


def test_pieces_scrubbed_together_come_out_as_each_alone():
    """scrub_batch finds in a batch's pieces joined: on the labelled set (every kind, and look-alikes
    in many layouts) each piece as scrub.scrub gives it; a key block that would run on into the next
    piece sends the batch back to one piece at a time."""
    texts = [text for _, text, _ in positives()] + [text for _, text in lookalikes()]
    items = [(("train", "val")[i % 2], i % 3 == 0, text) for i, text in enumerate(texts)]
    expected = [(split, starts, *scrub.scrub(text)) for split, starts, text in items]
    assert clean.scrub_batch(scrub.find, scrub.PLACEHOLDER, items) == expected
    # a key block cut before its END, the END in the next piece after a key: joined, the block
    # would run on to that END, and give way to the key found first
    begin, end = KEY_BLOCK.rsplit("\n", 1)
    cut_key = [("train", True, f"a\n{begin}"), ("train", True, f"{PII['SECRET']}\n{end}")]
    assert clean.scrub_batch(scrub.find, scrub.PLACEHOLDER, cut_key) == [
        ("train", True, "a\n<SECRET>", {"SECRET": 1}),
        ("train", True, f"<SECRET>\n{end}", {"SECRET": 1})]
    assert scrub.scrub(clean.SEPARATOR.join(text for _, _, text in cut_key))[1] == {"SECRET": 1}


def test_scrub_pieces_stay_bounded_where_there_is_nowhere_to_cut():
    stream = [("val", n == 0, "12 34 56 78 90 " * 10) for n in range(40)]
    out = list(clean.scrub_pieces(iter(stream), most=1000))
    assert "".join(t for _, _, t in out) == "12 34 56 78 90 " * 400
    assert max(len(t) for _, _, t in out) <= 1000 + 150 and len(out) >= 5
    assert clean.scrub_cut("call 020\n7946 0958 now") == 9 and clean.scrub_cut("a 1 b") == 0


def planted_documents(distinct=300, exact=30, near=30, seed=0):
    """[(document, 'distinct' | 'exact' | 'near')]: distinct documents of 100 to 300 words, then
    copies of some (exact: other whitespace; near: 1% of the words changed) each after its
    original."""
    rng = np.random.default_rng(seed)
    vocabulary = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to")
                  for b in ("de", "fo", "gu", "ha", "ji", "ko", "lu", "ma")]
    documents = [(" ".join(rng.choice(vocabulary, int(rng.integers(100, 300)))), "distinct")
                 for _ in range(distinct)]
    copies = []
    for i in rng.choice(distinct, exact + near, replace=False):
        words = documents[i][0].split()
        if len(copies) < exact:
            copies.append(("\n".join(" ".join(words[j:j + 7]) for j in range(0, len(words), 7)),
                           "exact"))
            continue
        for j in rng.choice(len(words), max(1, round(0.01 * len(words))), replace=False):
            words[j] = f"changed{j}"
        copies.append((" ".join(words), "near"))
    for copy in copies:
        documents.insert(int(rng.integers(distinct, len(documents) + 1)), copy)
    return documents


def normalised(text):
    return " ".join(text.split())


def test_planted_copies_are_removed_and_every_pass_keeps_the_same_documents(tmp_path, capsys):
    planted = planted_documents()
    write_jsonl(tmp_path / "c.jsonl", [document for document, _ in planted])
    out = {}
    for mode in ("exact", "near"):
        out[mode] = tmp_path / mode
        meta = prepare.prepare_data(prepare.PrepareConfig(
            input=str(tmp_path / "c.jsonl"), out_dir=str(out[mode]), vocab_size=300, workers=2,
            dedup=mode))
        kept = Counter(normalised(d) for docs in split_documents(out[mode]).values() for d in docs)
        lost = sum(normalised(doc) not in kept for doc, what in planted if what == "distinct")
        near_left = sum(normalised(doc) in kept for doc, what in planted if what == "near")
        # no text twice, and no exact copy among the documents kept: all of them removed; >= 90% of
        # the near copies (near); <= 1% of the distinct documents lost
        assert max(kept.values()) == 1 and sum(kept.values()) == 300 - lost + near_left
        assert lost <= 3 and near_left == (30 if mode == "exact" else near_left), lost
        assert mode == "exact" or near_left <= 3, near_left
        d = meta["dedup"]
        assert (d["mode"], d["documents"], d["removed_exact"]) == (mode, 360, 30)
        documents = sum(s["documents"] for s in meta["splits"].values())
        assert d["kept"] == sum(kept.values()) == documents
        assert sum(d["removed_by_split"].values()) == 360 - d["kept"]
        assert d["false_positive_rate"] < 1e-6 and meta == data.load_meta(out[mode])
        # the tokenizer learned from the documents that were encoded: the same ones kept
        train = split_documents(out[mode])["train"]
        assert load_tokenizer(out[mode]).fingerprint() == BPETokenizer.train(
            train, vocab_size=300).fingerprint()
        assert f"duplicates ({mode}, found in " in capsys.readouterr().out
    assert d["removed_near"] >= 27 and "threshold" in d


def test_a_held_out_document_that_repeats_a_train_one_is_removed_from_its_split(tmp_path):
    """The first of a document is kept in whatever split it is, its later copies removed from every
    split: no text in two splits, and each kept document in the split it has without --dedup."""
    config = prepare.PrepareConfig(out_dir=str(tmp_path / "off"), vocab_size=300, workers=1)
    rng = np.random.default_rng(2)
    documents = [" ".join(rng.choice(WORDS, 12)) + "\n" for _ in range(60)]
    split = [corpus.split_of(i, config) for i in range(60)]
    train, (first_val, later_val) = 0, [i for i in range(60) if split[i] == "val"][:2]
    later_train = next(i for i in range(60) if split[i] == "train" and i > first_val)
    assert split[train] == "train" and train < later_val
    documents[later_val] = documents[train].replace(" ", "  ")      # a train document in val
    documents[later_train] = documents[first_val]                    # a val document in train
    write_jsonl(tmp_path / "c.jsonl", documents)
    prepare.prepare_data(replace(config, input=str(tmp_path / "c.jsonl")))
    meta = prepare.prepare_data(replace(config, input=str(tmp_path / "c.jsonl"),
                                        out_dir=str(tmp_path / "exact"), dedup="exact"))
    assert meta["dedup"]["removed_by_split"] == {"train": 1, "val": 1, "test": 0}
    without, deduplicated = split_documents(tmp_path / "off"), split_documents(tmp_path / "exact")
    for name, docs in without.items():
        removed = {later_val} if name == "val" else {later_train} if name == "train" else set()
        assert deduplicated[name] == [documents[i] for i in range(60)
                                      if split[i] == name and i not in removed]
        assert len(docs) == len(deduplicated[name]) + len(removed)
    assert documents[train] in deduplicated["train"] and documents[first_val] in deduplicated["val"]


def test_find_duplicates_takes_a_document_in_pieces_and_short_ones_in_batches():
    stream = [("train", True, "a b "), ("train", False, "c d"), ("val", True, "x y"),
              ("train", True, "a  b c\nd"), ("test", True, "x  y"), ("train", True, "z")]
    removed = Counter()
    from dedup import Deduplicator
    kept = Counter()
    keep = clean.find_duplicates(iter(stream), Deduplicator("exact"), kept, removed)
    assert keep == bytearray([0b10011])
    assert clean.find_duplicates(iter(stream), Deduplicator("near"), Counter(), Counter()) == keep
    assert list(clean.kept_only(iter(stream), keep)) == [stream[i] for i in (0, 1, 2, 5)]
    assert removed == {"train": 1, "val": 0, "test": 1}
    assert kept == {"train": 2, "val": 1, "test": 0}


def test_a_full_bloom_filter_is_warned_about(capsys):
    from dedup import Deduplicator
    stream = [("train", True, f"document {i} of a few words") for i in range(1500)]
    stream_ = clean.CleanStream(lambda: iter(stream), Deduplicator("near", memory_mb=0.01))
    assert stream_.dedup["false_positive_rate"] > 0.01
    err = capsys.readouterr().err
    assert err.startswith("warning: the duplicates' Bloom filter is") and "--dedup_memory_mb" in err


def test_a_stopped_run_with_these_flags_starts_over_the_same_and_a_changed_flag_anew(
        tmp_path, monkeypatch, capsys):
    planted = planted_documents(distinct=60, exact=6, near=6)
    documents = [f"{d} mail {PII['EMAIL']}" if i % 4 == 0 else d
                 for i, (d, _) in enumerate(planted)]
    write_jsonl(tmp_path / "c.jsonl", documents)
    config = prepare.PrepareConfig(input=str(tmp_path / "c.jsonl"), vocab_size=300, workers=1,
                                   out_dir=str(tmp_path / "whole"), scrub_pii=True, dedup="near")
    prepare.prepare_data(config)
    encode_stream = prepare.encode_stream

    def stopped(*args):
        raise KeyboardInterrupt

    def stop_then_run(first, then):
        monkeypatch.setattr(prepare, "encode_stream", stopped)
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare_data(first)
        monkeypatch.setattr(prepare, "encode_stream", encode_stream)
        capsys.readouterr()
        meta = prepare.prepare_data(then)
        return meta, capsys.readouterr().err
    stopping = replace(config, out_dir=str(tmp_path / "stopped"))
    _, err = stop_then_run(stopping, stopping)
    assert "holds a run that did not finish: starting over, with the tokenizer it trained" in err
    files = lambda folder: {p.name: p.read_bytes() for p in Path(folder).iterdir()}  # noqa: E731
    assert files(tmp_path / "stopped") == files(tmp_path / "whole")
    # another --dedup: another tokenizer, trained anew
    meta, err = stop_then_run(stopping, replace(stopping, dedup="exact", overwrite=True))
    assert "holds a run that did not finish: starting over\n" in err
    assert meta["dedup"]["mode"] == "exact" and meta["scrub_pii"]["EMAIL"] > 0
