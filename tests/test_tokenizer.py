"""Tests of tokenizer.py: training, encoding/decoding, special tokens, files, and agreement with HF and tiktoken."""

import random
from collections import Counter

import numpy as np
import pytest

import data
import tokenizer
from cli import UserError
from tokenizer import GPT2_REGEX, BPETokenizer, count_pretokens, count_pretokens_parallel, learn_merges
from workers import end_pool, worker_pool

VARIED = [
    "Hello, world! It's 2024; we're testing BPE.",
    "Café naïve façade, Ærøskøbing — über straße",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "emoji 🙂🚀 and flags 🇫🇷 and a family 👨‍👩‍👧",
    "  spaces   inside\tand\ttabs\n\nparagraphs \n trailing spaces   ",
    "\n\n\n",
    "x",
    "",
]


def make_corpus(n_lines=400, seed=0):
    """A small varied corpus: made-up words, punctuation, numbers, accents, CJK, emoji, odd whitespace."""
    rng = random.Random(seed)
    syllables = ["the", "an", "ing", "re", "to", "ba", "ké", "lo", "mi", "ya", "zu", "ér", "中", "文", "🙂"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        line += rng.choice([".", ",", "!", " 42", " 3.14", "'s", " ", "  ", "\t"])
        lines.append(line)
    return "\n".join(lines) + "\n\n" + "\n".join(VARIED)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return BPETokenizer.train(corpus, vocab_size=600, min_frequency=2)


def naive_merges(word_counts, n_merges, min_frequency):
    """The textbook trainer: recount every pair after every merge. Returns the merges and each one's count."""
    words = {tuple(w.encode("utf-8")): n for w, n in word_counts.items()}
    merges, counts = [], []
    for new in range(256, 256 + n_merges):
        stats = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                stats[pair] += n
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))  # most frequent, then the smallest pair
        if stats[pair] < min_frequency:
            break
        merges.append(pair)
        counts.append(stats[pair])
        words = {tuple(tokenizer.merge(list(w), pair, new)): n for w, n in words.items()}
    return merges, counts


# ----------------------------------------------------------------------------- training

def test_pretoken_counts_are_exactly_the_regex_counts():
    rng = random.Random(1)
    alphabet = [" ", " ", "  ", "\n", "\t", "\u00a0", "\u3000", "a", "b", "é", "中", "1", "'", "s", "'s", ".", "!", "🙂"]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 60))) for _ in range(300)]
    for text in texts:
        assert count_pretokens([text]) == Counter(GPT2_REGEX.findall(text)), repr(text)
    expected = Counter(w for t in texts for w in GPT2_REGEX.findall(t))
    assert count_pretokens(texts) == expected
    assert count_pretokens_parallel(texts, min_chars=0) == expected  # no pool: counted here
    long_text = "".join(texts)  # one text cut into pieces for the workers
    pool = worker_pool(2)
    try:
        assert count_pretokens_parallel(texts, min_chars=0, pool=pool) == expected
        assert count_pretokens_parallel([long_text], min_chars=0, pool=pool, batch_chars=64,
                                        ahead=2) == Counter(GPT2_REGEX.findall(long_text))
    finally:
        end_pool(pool)


def test_fast_training_equals_naive_training(corpus):
    words = count_pretokens([corpus])
    expected, _ = naive_merges(words, 150, 2)
    assert learn_merges(words, 150, 2) == expected


def test_min_frequency_is_respected(corpus, capsys):
    words = count_pretokens([corpus[:3000]])
    expected, counts = naive_merges(words, 10_000, 5)
    assert min(counts) >= 5 and len(expected) < 10_000  # ran out of pairs seen 5+ times
    assert learn_merges(words, 10_000, 5) == expected
    t = BPETokenizer.train(corpus[:3000], vocab_size=10_000, min_frequency=5)
    assert t.vocab_size == 256 + len(expected) + 1 < 10_000
    assert "warning:" in capsys.readouterr().err


def test_exact_vocab_size_and_id_layout(corpus):
    t = BPETokenizer.train(corpus, vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert t.vocab_size == 300 and len(t.merges) == 300 - 256 - 2
    assert t.special_tokens == {"<|endoftext|>": 298, "<|pad|>": 299} and t.eot_id == 298
    assert [t.decode_bytes([i]) for i in range(256)] == [bytes([b]) for b in range(256)]  # ids 0..255: the bytes
    assert [t.decode_bytes([256 + i]) for i in range(len(t.merges))] == [a + b for a, b in t.merges]
    assert t.decode([298, 299]) == "<|endoftext|><|pad|>"


def test_train_from_path_text_and_documents(tmp_path, corpus):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus, encoding="utf-8")
    from_text = BPETokenizer.train(corpus, vocab_size=400)
    assert BPETokenizer.train(path, vocab_size=400).merges == from_text.merges
    assert BPETokenizer.train(str(path), vocab_size=400).merges == from_text.merges
    docs = BPETokenizer.train(iter(["ab", "c"] * 20), vocab_size=300, min_frequency=1)  # any iterable of texts
    assert docs.merges == [(b"a", b"b")]  # no pair spans two documents: "abcabc..." would also have (b, c)


# ----------------------------------------------------------------------------- encoding and decoding

@pytest.mark.parametrize("text", VARIED)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode("utf-8")
    assert ids == tok.encode_reference(text)


def test_encode_batch_and_array_inputs(tok):
    assert tok.encode_batch(VARIED) == [tok.encode(t) for t in VARIED]
    ids = tok.encode(VARIED[1])
    assert tok.decode(np.array(ids, dtype=np.uint16)) == VARIED[1]


def test_cut_utf8_sequence_decodes_to_replacement_char(tok):
    cut = [ord("a"), 0xE2, 0x82]  # "a€" without the last byte of "€" (ids 0..255 are the bytes)
    assert tok.decode_bytes(cut) == b"a\xe2\x82" and tok.decode(cut) == "a\ufffd"
    assert tok.decode(cut + [0xAC]) == "a€"


def test_special_tokens_only_when_allowed(tok):
    text = "one<|endoftext|>two"
    eot = tok.eot_id
    assert eot == tok.vocab_size - 1
    assert eot not in tok.encode(text)  # looks like the special token, but is ordinary text by default
    assert tok.decode(tok.encode(text)) == text
    for allowed in ("all", {"<|endoftext|>"}):
        ids = tok.encode(text, allowed_special=allowed)
        assert ids.count(eot) == 1 and tok.decode(ids) == text
        assert ids == tok.encode("one") + [eot] + tok.encode("two")
    assert tok.encode_batch([text], allowed_special="all") == [tok.encode(text, allowed_special="all")]


# ----------------------------------------------------------------------------- files

def test_save_load_same_ids(tok, tmp_path):
    assert tok.save(tmp_path) == ["vocab.json", "merges.txt", "tokenizer.json"]
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    loaded = BPETokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.special_tokens == tok.special_tokens
    for text in VARIED + ["<|endoftext|>"]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_hf_reads_our_files(tok, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok.save(tmp_path)
    hf = tokenizers.ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in VARIED + [make_corpus(50, seed=7)]:
        assert hf.encode(text).ids == tok.encode(text)


def test_we_read_hf_files(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.ByteLevelBPETokenizer()
    hf.train_from_iterator([corpus], vocab_size=500, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"],
                           show_progress=False)
    hf.save_model(str(tmp_path))
    ours = BPETokenizer.load(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert ours.special_tokens == {"<|endoftext|>": 0, "<pad>": 1} and ours.vocab_size == 500
    for text in VARIED + [make_corpus(50, seed=7)]:
        assert ours.encode(text) == hf.encode(text).ids == ours.encode_reference(text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("a<pad>b", allowed_special="all") == hf.encode("a<pad>b").ids


def test_gpt2_files_match_tiktoken(monkeypatch, tmp_path, shared_data):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files, no cache copy (get_encoding would download)
    gpt2_dir = shared_data / "gpt2"
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(gpt2_dir / "vocab.bpe"),
                                            encoder_json_file=str(gpt2_dir / "encoder.json"))
    ref = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    ours = BPETokenizer.load(gpt2_dir)  # finds encoder.json + vocab.bpe
    assert ours.vocab_size == 50257 and ours.eot_id == 50256
    text = "\n".join(VARIED) + " def f(x):\n    return x**2  # I'm sure they'll've  done it 1,234.5 times\r\n"
    assert ours.encode(text) == ref.encode_ordinary(text)
    assert ours.encode_reference(text) == ref.encode_ordinary(text)
    assert ours.encode(text + "<|endoftext|>", allowed_special="all") == ref.encode(text + "<|endoftext|>",
                                                                                    allowed_special="all")
    assert ours.decode(ours.encode(text)) == text
    ours.save(tmp_path)  # HF names, GPT-2's ids
    assert BPETokenizer.load(tmp_path).encode(text) == ref.encode_ordinary(text)


def test_reference_equals_fast_on_wikitext_valid(shared_data):
    train = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    valid = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    t = BPETokenizer.train(train, vocab_size=4096)
    ids = t.encode(valid)  # the whole split: ~1.1 MB, a few seconds of plain Python
    assert ids == t.encode_reference(valid)
    assert t.decode(ids) == valid


def test_loading_missing_files_is_one_error_with_its_message(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        BPETokenizer.load(tmp_path)
    with pytest.raises(UserError, match="not found"):  # as the scripts load a folder's tokenizer
        data.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- command line

def test_cli_missing_file_is_one_error_line(tmp_path, run_script):
    result = run_script("tokenizer.py", f"--train={tmp_path / 'missing.txt'}")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_trains_and_saves(tmp_path, corpus, run_script):
    (tmp_path / "c.txt").write_text(corpus, encoding="utf-8")
    result = run_script("tokenizer.py", f"--train={tmp_path / 'c.txt'}", "--vocab_size=300", f"--out={tmp_path / 'out'}",
                        "--special_tokens=('<|endoftext|>', '<|pad|>')")
    assert result.returncode == 0, result.stderr
    assert "vocab size 300" in result.stdout
    loaded = BPETokenizer.load(tmp_path / "out")
    assert loaded.vocab_size == 300 and loaded.special_tokens == {"<|endoftext|>": 298, "<|pad|>": 299}


def test_tokenizer_py_runs_copied_alone_into_an_empty_folder(tmp_path):
    """The module imports no other file of the project: train, save, load, encode, and its errors
    are ValueErrors (its command line is what needs cli.py, files.py and workers.py)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    shutil.copy(Path(tokenizer.__file__), tmp_path / "tokenizer.py")
    code = """
import multiprocessing, sys
from tokenizer import BPETokenizer, count_pretokens, count_pretokens_parallel
text = "the cat sat on the mat, the dog sat on the log. " * 200
tok = BPETokenizer.train(text, vocab_size=300)
tok.save("tok")
again = BPETokenizer.load("tok")
assert again.fingerprint() == tok.fingerprint() and again.decode(again.encode(text)) == text
with multiprocessing.Pool(2) as pool:
    assert count_pretokens_parallel([text], min_chars=0, pool=pool, batch_chars=100) == count_pretokens([text])
for bad in (lambda: BPETokenizer.load("nowhere"), lambda: BPETokenizer.train("   ", vocab_size=300)):
    try:
        bad()
        raise AssertionError("no error")
    except ValueError:
        pass
assert not [m for m in ("cli", "files", "workers") if m in sys.modules]
print("ok")
"""
    r = subprocess.run([sys.executable, "-E", "-s", "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
