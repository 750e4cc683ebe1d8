"""
Prepare a text dataset for training: get the text, train (or load) a BPE tokenizer, and write the token ids as flat
uint16 arrays that train.py reads with np.memmap.

    python prepare.py                                     # WikiText-2 raw: download, train a tokenizer, encode
    python prepare.py --source=DIR                        # the same from wiki.{train,valid,test}.raw in DIR (offline)
    python prepare.py --dataset=wikitext-2                # the tokenized release (<unk> for rare words): the benchmark
    python prepare.py --input=a.txt,b.txt --out_dir=data/mine     # text files of your own
    python prepare.py --tokenizer=gpt2                    # GPT-2's BPE instead of our own: data/<dataset>-gpt2

out_dir (default data/<dataset>) receives train.bin, val.bin, test.bin, the tokenizer (vocab.json + merges.txt) and
meta.json (tokenizer, special-token ids, and per split: documents, tokens, bytes, words). Every document (a WikiText
article, or one input file) starts with the end-of-text token, so decoding a .bin and dropping those tokens gives the
split's text back byte for byte (data.py reads the format). Downloads are cached in cache_dir and checked against
their sha256. Data that another tokenizer made is replaced only with --overwrite=True.
"""

import hashlib
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import (Progress, UserError, atomic_write, check_settings, decode_utf8, parse_config, read_utf8, run_main,
                 setting, write_json)
from data import MAX_IDS, SPLITS, count_words
from download import download, sha256_of
from tokenizer import GPT2_MERGES_SHA256, GPT2_VOCAB_SHA256, BPETokenizer, cut_text, load_tokenizer


@dataclass
class PrepareConfig:
    dataset: str = "wikitext-2-raw"         # wikitext-2-raw (plain text) or wikitext-2 (the tokenized release)
    source: str = ""                        # folder (or the upstream .zip) of the WikiText files: no download
    input: str = ""                         # your own UTF-8 text file(s), comma-separated, instead of WikiText
    val_fraction: float = setting(0.1, above=0, below=1)  # --input: the end of the text (at a line break), for val
    test_fraction: float = setting(0.0, low=0, below=1)  # --input: the part after val held out for test
    out_dir: str = ""                       # default: data/<dataset>, or data/<dataset>-gpt2 with GPT-2's tokenizer
    overwrite: bool = False                 # replace data in out_dir that another tokenizer made
    cache_dir: str = "data/cache"           # where downloads are kept
    tokenizer: str = setting("bpe", choices=("bpe", "gpt2"))  # bpe: trained on the train split; gpt2: GPT-2's 50,257
                                                              # ids
    vocab_size: int = setting(8192, low=257, high=65536)  # bpe: ids in all; 8192 keeps the embedding table small, yet
                                                          # most words are one token
    min_frequency: int = setting(2, low=1)  # a pair must occur this often to become a merge
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


def split_at_line(docs, at):
    """Split a list of documents at character offset `at`, moved to a line start; returns (head, tail)."""
    head, tail = [], []
    for doc in docs:
        if at >= len(doc):
            head.append(doc)
        elif at <= 0:
            tail.append(doc)
        else:
            nl = doc.find("\n", at - 1)
            cut = (nl if nl >= 0 else doc.rfind("\n", 0, at)) + 1  # no later line break: use the one before
            head += [doc[:cut]] if cut else []
            tail += [doc[cut:]] if cut < len(doc) else []
        at -= len(doc)
    return head, tail


def input_splits(config):
    """{split: [documents]} from --input files: each file a document; the text's tail becomes val (then test)."""
    docs = []
    for name in config.input.split(","):
        path = Path(name.strip())
        if not path.is_file():
            raise UserError(f"--input: no file {path}")
        docs.append(read_utf8(path, "--input file"))
    total = sum(map(len, docs))
    rest, test = split_at_line(docs, round(total * (1 - config.test_fraction)))
    train, val = split_at_line(rest, round(total * (1 - config.test_fraction - config.val_fraction)))
    splits = {"train": train, "val": val} | ({"test": test} if config.test_fraction else {})
    empty = [split for split, part in splits.items() if not "".join(part).strip()]
    if empty:
        raise UserError(f"--input leaves the {' and '.join(empty)} split empty: give more text (more lines) "
                        f"or change --val_fraction/--test_fraction")
    return splits


# ----------------------------------------------------------------------------- tokenizer and encoding


def check_vocab_fits(vocab_size):
    if vocab_size > MAX_IDS:
        raise UserError(f"vocab_size={vocab_size:,} does not fit the uint16 token files (at most {MAX_IDS:,} ids): "
                        f"lower --vocab_size")


def get_tokenizer(config, train_docs):
    """GPT-2's tokenizer (from --gpt2_dir, else downloaded), or a BPE tokenizer trained on the train split only."""
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
    print(f"training a BPE tokenizer ({config.vocab_size:,} ids) on the train split ...", file=sys.stderr)
    return BPETokenizer.train(train_docs, vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                              special_tokens=config.special_tokens)


CHUNK_CHARS = 1 << 20  # long documents are cut (where encoding is unaffected) so that encode_batch can share them


def encode_split(tok, docs, desc, batch_chars=1 << 22):
    """All documents of a split as one uint16 array of ids, each document preceded by the end-of-text token."""
    chunked = [cut_text(doc, CHUNK_CHARS) for doc in docs]
    flat = [piece for pieces in chunked for piece in pieces]
    batches, size = [[]], 0
    for piece in flat:  # batches of ~batch_chars, so the progress line moves on long inputs
        if size >= batch_chars:
            batches, size = batches + [[]], 0
        batches[-1].append(piece)
        size += len(piece)
    progress = Progress(f"encoding {desc}", sum(map(len, flat)), "M chars")
    encoded, done = [], 0
    for batch in batches:
        encoded += tok.encode_batch(batch)
        done += sum(map(len, batch))
        progress.update(done)
    progress.close(done)
    arrays, pos = [], 0
    for pieces in chunked:
        arrays += [np.array([tok.eot_id], dtype=np.uint16)] + [np.array(ids, dtype=np.uint16)
                                                               for ids in encoded[pos:pos + len(pieces)]]
        pos += len(pieces)
    return np.concatenate(arrays)

# ----------------------------------------------------------------------------- main


def check_config(config):
    """Everything that can be refused before any download or training."""
    check_settings(config)
    if config.out_dir and os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise UserError(f"--out_dir={config.out_dir} is a file: choose a folder")
    if not config.input and config.dataset not in WIKITEXT:
        raise UserError(f"unknown --dataset={config.dataset}: choose {' or '.join(WIKITEXT)}, or give --input=FILE")
    if config.input and config.source:
        raise UserError("--source is for WikiText files; your own files go in --input alone")
    if config.val_fraction + config.test_fraction >= 1:
        raise UserError("--val_fraction and --test_fraction together must be below 1: train needs the rest")
    if config.tokenizer == "bpe":
        if "<|endoftext|>" not in config.special_tokens:
            raise UserError("--special_tokens must include <|endoftext|>: it marks where each document starts")
        if config.vocab_size < 256 + len(config.special_tokens):
            raise UserError(f"--vocab_size must be at least {256 + len(config.special_tokens)} "
                            f"(256 bytes + the special tokens)")


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


def prepare_data(config):
    """Write out_dir/{train,val,test}.bin, the tokenizer files and meta.json; returns the meta dict."""
    t0 = time.time()
    check_config(config)
    if config.input:
        name = "+".join(Path(f.strip()).stem for f in config.input.split(","))
        splits = input_splits(config)
    else:
        name = config.dataset
        splits = {split: wikitext_articles(text) for split, text in wikitext_splits(config).items()}
    convention = "classic" if name == "wikitext-2" else "whitespace"
    out_dir = Path(config.out_dir or f"data/{name}" + ("-gpt2" if config.tokenizer == "gpt2" else ""))

    tok = get_tokenizer(config, splits["train"])
    check_vocab_fits(tok.vocab_size)
    check_replaceable(out_dir, tok, config.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # until the new one is written, this is no finished dataset
    stats = {}
    for split, docs in splits.items():
        ids = encode_split(tok, docs, split)
        atomic_write(out_dir / f"{split}.bin", ids.tofile)
        text = "".join(docs)
        stats[split] = {"documents": len(docs), "tokens": len(ids), "bytes": len(text.encode("utf-8")),
                        "words_whitespace": count_words(text, "whitespace")}
        if convention == "classic":
            stats[split]["words_classic"] = count_words(text, "classic")
    for split in set(SPLITS) - set(splits):
        (out_dir / f"{split}.bin").unlink(missing_ok=True)  # a stale split from an earlier run would mislead

    files = tok.save(out_dir)
    meta = {
        "dataset": name,
        "tokenizer": {"kind": config.tokenizer, "files": files} | (
            {"min_frequency": config.min_frequency} if config.tokenizer == "bpe" else {}),
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special_tokens,
        "eot_id": tok.eot_id,
        "dtype": "uint16",
        "layout": "each document is preceded by eot_id",
        "word_convention": convention,  # word-level perplexity divides by splits[...]["words_" + word_convention]
        **({"unknown_word": "<unk>"} if name == "wikitext-2" else {}),  # the release's marker for rare words
        "splits": stats,
    }
    write_json(out_dir / "meta.json", meta)

    print(f"{name}, {config.tokenizer} tokenizer with {tok.vocab_size:,} ids -> {out_dir} in {time.time() - t0:.1f} s")
    for split, s in stats.items():
        print(f"  {split + '.bin':9s} {s['tokens']:>11,} tokens ({2 * s['tokens'] / 1e6:6.2f} MB) from "
              f"{s['documents']:,} documents, {s['bytes']:,} bytes ({s['bytes'] / s['tokens']:.2f} bytes/token)")
    return meta


def main():
    prepare_data(parse_config(PrepareConfig))


if __name__ == "__main__":
    run_main(main)
