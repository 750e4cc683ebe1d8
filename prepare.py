"""
Prepare a text corpus for training: read it, train (or load) a BPE tokenizer, and write the token ids as flat arrays
that train.py reads with np.memmap. Memory stays bounded whatever the corpus's size: the text is read, counted and
encoded a piece at a time, on every core, and the ids go straight to disk.

    python prepare.py                                     # WikiText-2 raw: download, train a tokenizer, encode
    python prepare.py --source=DIR                        # the same from wiki.{train,valid,test}.raw in DIR (offline)
    python prepare.py --dataset=wikitext-2                # the tokenized release (<unk> for rare words): the benchmark
    python prepare.py --input=a.txt,books/ --out_dir=data/mine    # your files: .txt, .jsonl, .parquet, .gz of them
    python prepare.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --out_dir=data/fineweb
    python prepare.py --tokenizer=gpt2                    # GPT-2's BPE instead of our own: data/<dataset>-gpt2

A document is a WikiText article, a text file, a JSON line, a Parquet row or a dataset's example; in the token files
each one starts with the end-of-text token, so decoding a .bin and dropping those tokens gives the split's text back
byte for byte (data.py reads the format). Val and test are whole documents, spread evenly through the corpus
(--val_fraction) or its first ones (--val_documents); text files too few to give whole ones give the tail of their
text, cut at a line break. out_dir (default data/<name>) receives train.bin, val.bin, test.bin (uint16 ids; uint32
beyond 65,536), the tokenizer (vocab.json + merges.txt) and meta.json. The work in progress stays in out_dir/.partial:
nothing appears under a final name before it is whole, and a run that was stopped starts over when run again,
reusing the tokenizer it trained. Downloads are cached in cache_dir and checked against their sha256. Data that
another tokenizer made is replaced only with --overwrite=True.
"""

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cli import (Progress, UserError, atomic_write, check_settings, check_writable, cpu_count, decode_utf8,
                 end_pool, ordered_map, parse_config, run_main, setting, worker_pool, write_json)
from corpus import Corpus
from data import SPLITS, count_words, dtype_for
from download import download, sha256_of
from tokenizer import GPT2_MERGES_SHA256, GPT2_VOCAB_SHA256, BPETokenizer, cut_stream, load_tokenizer


@dataclass
class PrepareConfig:
    dataset: str = "wikitext-2-raw"         # wikitext-2-raw (plain text) or wikitext-2 (the tokenized release)
    source: str = ""                        # folder (or the upstream .zip) of the WikiText files: no download
    # your own corpus instead of WikiText
    input: str = ""                         # files, folders and globs, comma-separated: .txt (a file is a document),
                                            # .jsonl and .parquet (a record is one), each also .gz
    hf_dataset: str = ""                    # a Hugging Face dataset, streamed (HuggingFaceFW/fineweb-edu), or a
                                            # builder for local files (json, parquet) with --hf_data_files
    hf_config: str = ""                     # the dataset's configuration, e.g. sample-10BT
    hf_split: str = "train"                 # the dataset's split to read
    hf_data_files: str = ""                 # files for a builder, comma-separated
    text_field: str = "text"                # the field holding the text in JSON lines, Parquet and datasets
    val_fraction: float = setting(0.1, above=0, below=1)  # the share of documents held out for val
    test_fraction: float = setting(0.0, low=0, below=1)   # the share held out for test
    val_documents: int = setting(0, low=0)  # instead of the fractions: the corpus's first N documents for val,
    test_documents: int = setting(0, low=0)  # and the N after them for test
    workers: int = setting(0, low=0)        # processes that count and encode; 0: one per core
    # where it goes
    out_dir: str = ""                       # default: data/<name>, or data/<name>-gpt2 with GPT-2's tokenizer
    overwrite: bool = False                 # replace data in out_dir that another tokenizer made
    cache_dir: str = "data/cache"           # where downloads are kept
    # the tokenizer
    tokenizer: str = "bpe"                  # bpe: trained on the train split; gpt2: GPT-2's 50,257 ids; or a folder
                                            # holding a tokenizer (vocab.json + merges.txt), e.g. another data folder
    vocab_size: int = setting(8192, low=257, high=1 << 20)  # bpe: ids in all; 8192 keeps the embedding table
                                                            # small, yet most words are one token
    min_frequency: int = setting(2, low=1)  # a pair must occur this often to become a merge
    tokenizer_chars: int = setting(100_000_000, low=1)  # bpe: learn from the first N characters of the train split
                                                        # (memory grows with their distinct words)
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)  # bpe: ids after the merges; <|endoftext|> is required
    gpt2_dir: str = ""                      # folder with GPT-2's encoder.json + vocab.bpe (else downloaded)
    check_sha256: bool = True               # refuse WikiText/GPT-2 files that differ from the published ones


WIKITEXT_MIRRORS = ("https://wikitext.smerity.com/",  # the author's mirror; the S3 bucket below answers 403 today
                    "https://s3.amazonaws.com/research.metamind.io/wikitext/")
WIKITEXT = {
    "wikitext-2-raw": {"zip": "wikitext-2-raw-v1.zip", "ext": "raw",
                       "sha256": "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
                       "train": "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57",
                       "valid": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
                       "test": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"},
    "wikitext-2": {"zip": "wikitext-2-v1.zip", "ext": "tokens",
                   "sha256": "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
                   "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                   "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                   "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"},
}
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {"encoder.json": GPT2_VOCAB_SHA256, "vocab.bpe": GPT2_MERGES_SHA256}

# ----------------------------------------------------------------------------- the text of each split


_ARTICLE = re.compile(r"^ = [^=].* = $", re.M)  # ' = Title = ' opens an article; ' = = Section = = ' does not


def wikitext_articles(text):
    """Split a WikiText file into articles, each starting at the blank line above its title; nothing is dropped."""
    starts = [0]
    for m in _ARTICLE.finditer(text):
        line_above = text.rfind("\n", 0, max(m.start() - 1, 0)) + 1
        start = line_above if text[line_above:m.start()].isspace() else m.start()
        if start > starts[-1]:
            starts.append(start)
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def wikitext_splits(config):
    """{split: text} of WikiText-2: from --source (a folder or the upstream zip), else downloaded and cached."""
    spec = WIKITEXT[config.dataset]
    names = {split: f"wiki.{theirs}.{spec['ext']}" for split, theirs in zip(SPLITS, ("train", "valid", "test"))}
    if config.source:
        source = Path(config.source)
        if not source.exists():
            raise UserError(f"--source={source} does not exist")
    else:
        urls = [mirror + spec["zip"] for mirror in WIKITEXT_MIRRORS]
        source = download(urls, Path(config.cache_dir) / spec["zip"], spec["sha256"], offline_hint=(
            f"get {spec['zip']} or its {', '.join(names.values())} and pass --source=PATH"))
    if source.is_dir():
        listing = {path.name: path for path in source.iterdir()}
        read = lambda name: listing[name].read_bytes()
    elif zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        listing = {Path(member).name: member for member in archive.namelist()}
        read = lambda name: archive.read(listing[name])
    else:
        raise UserError(f"--source={source} is neither a folder nor a zip file")
    missing = [name for name in names.values() if name not in listing]
    if missing:
        other = next(d for d in WIKITEXT if d != config.dataset)
        looks_other = any(n.endswith("." + WIKITEXT[other]["ext"]) for n in listing)
        hint = f"; it looks like --dataset={other}" if looks_other else ""
        raise UserError(f"{source} has no {', '.join(missing)} (files of {spec['zip']}; without --source they are "
                        f"downloaded){hint}")
    texts = {}
    for split, name in names.items():
        data = read(name)
        if config.check_sha256 and hashlib.sha256(data).hexdigest() != spec[name.split(".")[1]]:
            raise UserError(f"{name} in {source} differs from the published WikiText file (sha256); use a fresh "
                            f"copy, or --check_sha256=False to use it as it is")
        texts[split] = decode_utf8(data, f"{source}/{name}")
    return texts


# The documents of every split come as one stream of (split, starts a document, text): a document may come in
# several pieces (a long text file does), each ending where encoding is unaffected (tokenizer.cut_stream).


def wikitext_stream(splits):
    """(split, True, article) for every article of every split: an article is a document."""
    return ((split, True, doc) for split, text in splits.items() for doc in wikitext_articles(text))


def split_of(i, config):
    """The split of a corpus's i-th document (from 0): its first val_documents, then test_documents, documents; or,
    by fraction, documents spread evenly: with val_fraction=0.1, documents 4, 14, 24, ... go to val."""
    if config.val_documents or config.test_documents:
        return "val" if i < config.val_documents else "test" if i < config.val_documents + config.test_documents \
            else "train"
    held = config.val_fraction + config.test_fraction
    takes = lambda n, share: math.floor((n + 1) * share + 0.5) > math.floor(n * share + 0.5)  # noqa: E731
    if not takes(i, held):
        return "train"
    return "test" if takes(math.floor(i * held + 0.5), config.test_fraction / held) else "val"


def by_document(corpus, config):
    """The corpus's documents, each whole in the split that split_of gives it."""
    for i, chunks in enumerate(corpus.documents()):
        split = split_of(i, config)
        for n, chunk in enumerate(chunks):
            yield split, n == 0, chunk


def by_tail(corpus, config):
    """Text files' documents, the tail of their text held out: val starts at the first line break after
    (1 - test_fraction - val_fraction) of the bytes, test after (1 - test_fraction); a document cut there continues
    as a document of the next split. Without a line break after the point in its document, the next document starts
    the next split."""
    total = sum(corpus.text_sizes())
    cuts = [(round(total * (1 - config.test_fraction - config.val_fraction)), "val")] + (
        [(round(total * (1 - config.test_fraction)), "test")] if config.test_fraction else [])
    split, pos = "train", 0
    for chunks in corpus.documents():
        if cuts and pos >= cuts[0][0]:  # the point passed without a line break: this document starts the split
            split = cuts.pop(0)[1]
        starts = True
        for chunk in chunks:
            data = chunk.encode("utf-8")
            while cuts and pos + len(data) >= cuts[0][0]:
                nl = data.find(b"\n", max(cuts[0][0] - 1 - pos, 0))
                if nl < 0:
                    break
                yield split, starts, data[:nl + 1].decode("utf-8")
                split, starts, pos, data = cuts.pop(0)[1], True, pos + nl + 1, data[nl + 1:]
            if data:
                yield split, starts, data.decode("utf-8")
                starts, pos = False, pos + len(data)


def in_pieces(stream, size=1 << 20):
    """The stream with each document's text re-cut into pieces of about `size` characters, where encoding is
    unaffected; a document with no text is dropped."""
    n = 0

    def document(item):  # a number for each document, so that groupby gives one document at a time
        nonlocal n
        n += item[1]
        return n, item[0]
    for (_, split), items in itertools.groupby(stream, document):
        for i, piece in enumerate(cut_stream((text for _, _, text in items), size)):
            yield split, i == 0, piece


def first_chars(stream, split, limit):
    """The text of one split's pieces, up to `limit` characters in all: what the tokenizer learns from."""
    for piece_split, _, piece in stream:
        if piece_split == split:
            yield piece[:limit]
            limit -= len(piece)
            if limit <= 0:
                return


# ----------------------------------------------------------------------------- tokenizer and encoding


def get_tokenizer(config, train_text, pool):
    """GPT-2's tokenizer (from --gpt2_dir, else downloaded), a tokenizer folder, or a BPE tokenizer trained on the
    first tokenizer_chars of the train split."""
    if config.tokenizer == "gpt2":
        folder = Path(config.gpt2_dir or Path(config.cache_dir) / "gpt2")
        for name, sha in GPT2_FILES.items():
            if not config.gpt2_dir:
                download(GPT2_URL + name, folder / name, sha, desc=f"GPT-2 {name}",
                         offline_hint="pass --gpt2_dir=DIR with GPT-2's encoder.json and vocab.bpe")
            elif not (folder / name).is_file():
                raise UserError(f"--gpt2_dir={folder} has no {name} (GPT-2's encoder.json and vocab.bpe go there)")
            elif config.check_sha256 and sha256_of(folder / name) != sha:
                raise UserError(f"{folder / name} is not GPT-2's (sha256); use the published file, "
                                f"or --check_sha256=False to use it as it is")
        return BPETokenizer.load(folder / "encoder.json", folder / "vocab.bpe")
    if config.tokenizer != "bpe":
        try:
            tok = load_tokenizer(config.tokenizer)
        except ValueError as e:
            raise UserError(f"--tokenizer={config.tokenizer}: {e}") from None
        if tok.eot_id is None:
            raise UserError(f"--tokenizer={config.tokenizer} has no <|endoftext|> token to start each document with")
        return tok
    print(f"training a BPE tokenizer ({config.vocab_size:,} ids) on the first {config.tokenizer_chars:,} "
          f"characters of the train split ...", file=sys.stderr)
    return BPETokenizer.train(train_text, vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                              special_tokens=config.special_tokens, pool=pool)


_tokenizers = {}  # a worker's tokenizer, loaded once from the folder it is saved in


def encode_batch(work_dir, dtype, items):
    """Encode [(split, starts a document, text)] with the tokenizer saved in work_dir, append the ids to this
    process's file of each split there (the end-of-text token before each document), and return per split: where
    they went and what they hold."""
    if work_dir not in _tokenizers:
        _tokenizers[work_dir] = load_tokenizer(work_dir)
    tok = _tokenizers[work_dir]
    ids, stats = {}, {}
    for split, starts, text in items:
        ids.setdefault(split, []).extend([np.array([tok.eot_id], dtype)] * starts + [tok.encode_to_numpy(text)])
        s = stats.setdefault(split, dict.fromkeys(("documents", "bytes", "words", "lines"), 0))
        s["documents"] += starts
        s["bytes"] += len(text.encode("utf-8"))
        s["words"] += count_words(text)
        s["lines"] += text.count("\n")
        s["ends_line"] = text.endswith("\n")
    for split, arrays in ids.items():
        path = Path(work_dir) / f"{split}.{os.getpid()}.ids"
        with open(path, "ab") as f:
            stats[split] |= {"file": path.name, "offset": f.tell(), "tokens": sum(map(len, arrays))}
            np.concatenate(arrays, dtype=dtype, casting="unsafe").tofile(f)  # (ids < vocab_size fit dtype)
    return stats


def encode_stream(stream, work_dir, dtype, pool, ahead, progress, position):
    """Encode the stream in batches of ~1M characters on the pool; returns {split: totals} and, per split, where
    its ids are, in order: [(file, offset, tokens)]. The progress line shows position() (else the bytes done)."""
    def batches():
        batch, size = [], 0
        for item in stream:
            batch.append(item)
            size += len(item[2])
            if size >= 1 << 20:
                yield work_dir, dtype, batch
                batch, size = [], 0
        if batch:
            yield work_dir, dtype, batch
    totals, parts, done = {}, {}, 0
    for stats in ordered_map(pool, encode_batch, batches(), ahead):
        for split, s in stats.items():
            done += s["bytes"]
            parts.setdefault(split, []).append((s.pop("file"), s.pop("offset"), s["tokens"]))
            ends_line = s.pop("ends_line")
            totals.setdefault(split, Counter()).update(s)
            totals[split]["ends_line"] = ends_line
        progress.update(position() if position else done)
    progress.close(position() if position else done)
    return totals, parts


def concatenate(parts, work_dir, dtype, path):
    """Write the ids of parts [(file, offset, tokens)] one after another into path."""
    size = np.dtype(dtype).itemsize
    with open(path, "wb") as out:
        for name, offset, tokens in parts:
            with open(work_dir / name, "rb") as f:
                f.seek(offset)
                left = tokens * size
                while left:
                    block = f.read(min(left, 1 << 24))
                    if not block:  # (a work file cut short under us: stop, rather than loop forever)
                        raise OSError(f"{work_dir / name} is shorter than the ids written into it")
                    out.write(block)
                    left -= len(block)


# ----------------------------------------------------------------------------- main


def check_config(config):
    """Everything that can be refused before any download or training."""
    check_settings(config)
    check_writable(config.out_dir or "data", "out_dir")
    if config.input and config.hf_dataset:
        raise UserError("give one corpus: --input or --hf_dataset")
    if not (config.input or config.hf_dataset) and config.dataset not in WIKITEXT:
        raise UserError(f"unknown --dataset={config.dataset}: choose {' or '.join(WIKITEXT)}, or give --input=FILE "
                        f"or --hf_dataset=NAME")
    if (config.input or config.hf_dataset) and config.source:
        raise UserError("--source is for WikiText files; your own corpus goes in --input or --hf_dataset alone")
    if config.val_fraction + config.test_fraction >= 1:
        raise UserError("--val_fraction and --test_fraction together must be below 1: train needs the rest")
    if config.tokenizer == "bpe":
        if "<|endoftext|>" not in config.special_tokens:
            raise UserError("--special_tokens must include <|endoftext|>: it marks where each document starts")
        if config.vocab_size < 256 + len(config.special_tokens):
            raise UserError(f"--vocab_size must be at least {256 + len(config.special_tokens)} "
                            f"(256 bytes + the special tokens)")
    elif config.tokenizer != "gpt2" and not os.path.isdir(config.tokenizer):
        raise UserError(f"--tokenizer must be bpe, gpt2 or a folder holding a tokenizer (vocab.json + merges.txt), "
                        f"got {config.tokenizer!r}")


def check_replaceable(out_dir, tok, overwrite):
    """Refuse to replace data that another tokenizer made (a model trained on it would no longer match its data),
    unless asked to; data made again with the same tokenizer is the same data."""
    if overwrite or not (out_dir / "meta.json").is_file():
        return
    try:
        same = load_tokenizer(out_dir).fingerprint() == tok.fingerprint()
    except (UserError, ValueError):  # tokenizer files missing or broken: not known to be the same
        same = False
    if not same:
        raise UserError(f"{out_dir} holds data made with another tokenizer: choose another --out_dir, or replace it "
                        f"with --overwrite=True")


def corpus_name(config):
    """A name for the data folder: 'a.txt,b.txt' -> 'a+b'; 'web/*.jsonl.gz' -> 'web'; 'org/name' -> 'name'."""
    if config.hf_dataset:
        return Path(config.hf_dataset).name + (f"-{config.hf_config}" if config.hf_config else "")
    if config.input:
        parts = [Path(p.strip().split("*")[0].rstrip("/\\") or "corpus") for p in config.input.split(",") if p.strip()]
        return "+".join(Path(p.name.removesuffix(".gz")).stem for p in parts)
    return config.dataset


def held_out_splits(config):
    return ["val"] + (["test"] if config.test_fraction or config.test_documents else [])


def document_stream(config):
    """A function that streams the corpus's (split, starts a document, piece) from the start at each call."""
    if config.input or config.hf_dataset:
        corpus = Corpus.from_files(config.input, config.text_field) if config.input else Corpus.from_hub(
            config.hf_dataset, config.hf_config, config.hf_split, config.hf_data_files, config.text_field)
        by_fraction = {split_of(i, config) for i in range(len(corpus.files))}
        tail = (corpus.is_text_files() and not (config.val_documents or config.test_documents)
                and not set(held_out_splits(config)) <= by_fraction)  # too few files to hold out whole ones
        return lambda: in_pieces(by_tail(corpus, config) if tail else by_document(corpus, config)), corpus
    texts = wikitext_splits(config)
    return lambda: in_pieces(wikitext_stream(texts)), texts


def start_work_dir(work_dir, settings):
    """Make work_dir; an earlier run's files there are removed, but for the tokenizer it trained, kept if it was
    trained with these settings. Returns whether it was kept."""
    kept = False
    try:
        if work_dir.exists():
            try:
                kept = json.loads((work_dir / "settings.json").read_text(encoding="utf-8")) == settings
            except (OSError, ValueError):
                pass
            print(f"{work_dir} holds a run that did not finish: starting over"
                  + (", with the tokenizer it trained" if kept else ""), file=sys.stderr)
            for path in work_dir.iterdir():
                if not kept or path.suffix == ".ids":
                    path.unlink()
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (a folder we cannot write in: said before any work)
        raise UserError(f"cannot write in {work_dir.parent} ({e.strerror or e}): choose another --out_dir") from None
    return kept


def write_dataset(out_dir, work_dir, tok, dtype, totals, parts, meta):
    """Move the finished dataset to its final names: each .bin whole, the tokenizer, then meta.json (the folder is
    no finished dataset without it), with the splits' totals; returns meta."""
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split in SPLITS:
        if split in parts:
            atomic_write(out_dir / f"{split}.bin", lambda tmp: concatenate(parts[split], work_dir, dtype, tmp))
            for file in {file for file, _, _ in parts[split]}:
                (work_dir / file).unlink()
        else:
            (out_dir / f"{split}.bin").unlink(missing_ok=True)  # a stale split from an earlier run would mislead
    meta["tokenizer"]["files"] = tok.save(out_dir)
    for split in (s for s in SPLITS if s in totals):
        t = totals[split]
        meta["splits"][split] = {"documents": t["documents"], "tokens": t["tokens"], "bytes": t["bytes"],
                                 "words_whitespace": t["words"]}
        if meta["word_convention"] == "classic":  # the WikiText papers' count: + one end of line per line
            meta["splits"][split]["words_classic"] = t["words"] + t["lines"] + (0 if t["ends_line"] else 1)
    write_json(out_dir / "meta.json", meta)
    shutil.rmtree(work_dir)
    return meta


def prepare_data(config):
    """Write out_dir/{train,val,test}.bin, the tokenizer files and meta.json; returns the meta dict."""
    t0 = time.time()
    check_config(config)
    name = corpus_name(config)
    out_dir = Path(config.out_dir or f"data/{name}" + ("-gpt2" if config.tokenizer == "gpt2" else ""))
    work_dir = out_dir / ".partial"
    stream, source = document_stream(config)
    if not any(piece.strip() for split, _, piece in stream() if split == "train"):  # (stops at the first text)
        raise UserError("the corpus is empty: its train split has no text, only whitespace; give more text")
    settings = {k: v for k, v in asdict(config).items() if k not in ("out_dir", "overwrite", "workers", "cache_dir")}
    if isinstance(source, Corpus):  # the files too: a changed file makes another tokenizer
        settings["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime] for f in source.files]
    kept = start_work_dir(work_dir, json.loads(json.dumps(settings)))

    workers = config.workers or cpu_count()
    pool = worker_pool(workers) if workers > 1 else None
    try:
        if kept:
            tok = load_tokenizer(work_dir)
        else:
            tok = get_tokenizer(config, first_chars(stream(), "train", config.tokenizer_chars), pool)
            tok.save(work_dir)
            write_json(work_dir / "settings.json", settings)
        check_replaceable(out_dir, tok, config.overwrite)
        t1 = time.time()

        dtype = dtype_for(tok.vocab_size)
        if isinstance(source, Corpus):
            progress, position = Progress("encoding", source.total_bytes), lambda: source.done_bytes
        else:  # WikiText, in memory
            progress, position = Progress("encoding", sum(len(t.encode()) for t in source.values())), None
        totals, parts = encode_stream(stream(), str(work_dir), dtype, pool, 2 * workers, progress, position)
        t2 = time.time()
        empty = [split for split in ["train"] + held_out_splits(config) if split not in totals]
        if empty:
            documents = sum(t["documents"] for t in totals.values())
            raise UserError(f"the corpus leaves the {' and '.join(empty)} split empty ({documents:,} documents in "
                            f"all): give more text, or change --val_fraction/--test_fraction (or --val_documents)")

        kind = config.tokenizer if config.tokenizer in ("bpe", "gpt2") else "folder"
        meta = write_dataset(out_dir, work_dir, tok, dtype, totals, parts, {
            "dataset": name,
            "tokenizer": {"kind": kind, "files": []} | (
                {"min_frequency": config.min_frequency} if kind == "bpe" else {}) | (
                {"from": config.tokenizer} if kind == "folder" else {}),
            "vocab_size": tok.vocab_size,
            "special_tokens": tok.special_tokens,
            "eot_id": tok.eot_id,
            "dtype": dtype,
            "layout": "each document is preceded by eot_id",
            "word_convention": "classic" if name == "wikitext-2" else "whitespace",  # splits[...]["words_" + this]
            **({"unknown_word": "<unk>"} if name == "wikitext-2" else {}),  # the release's marker for rare words
            "splits": {},
        })
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"nothing was written under a final name in {out_dir}; the same command starts "
                                f"over") from None
    except OSError as e:  # writing: a full disk, a folder made read-only meanwhile
        raise UserError(f"cannot write in {out_dir} ({e.strerror or e}): nothing was written under a final name; "
                        f"make room and run the same command again") from None
    finally:
        if pool is not None:
            end_pool(pool)

    text_bytes = sum(s["bytes"] for s in meta["splits"].values())
    print(f"{name}, {kind} tokenizer with {tok.vocab_size:,} ids -> {out_dir} in {time.time() - t0:.1f} s "
          f"(tokenizer {t1 - t0:.1f} s, encoding {t2 - t1:.1f} s: {text_bytes / 1e6 / max(t2 - t1, 1e-9):.1f} MB/s "
          f"on {workers} processes)")
    for split, s in meta["splits"].items():
        print(f"  {split + '.bin':9s} {s['tokens']:>11,} tokens ({np.dtype(dtype).itemsize * s['tokens'] / 1e6:6.2f} "
              f"MB) from {s['documents']:,} documents, {s['bytes']:,} bytes ({s['bytes'] / s['tokens']:.2f} "
              f"bytes/token)")
    return meta


def main():
    prepare_data(parse_config(PrepareConfig))


if __name__ == "__main__":
    run_main(main)
