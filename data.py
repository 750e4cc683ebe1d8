"""
The token files that prepare.py writes and train.py and evaluate.py read: a folder holding
meta.json, the tokenizer, and one flat array of token ids per split (train.bin, val.bin, test.bin;
uint16, or uint32 as meta.json's dtype says), every document preceded by the end-of-text token, so
that decoding a split and dropping those tokens gives its text back byte for byte.

    meta = load_meta("data/wikitext-2")          # vocab size, special tokens; per split: documents,
                                                 # tokens, words
    ids = load_split("data/wikitext-2", "val")   # a read-only np.memmap: nothing is read until used
    tokenizer = load_tokenizer("data/wikitext-2")
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from cli import UserError
from tokenizer import BPETokenizer

SPLITS = ("train", "val", "test")
DTYPES = ("uint16", "uint32")  # uint16 holds 65,536 ids; uint32 the vocabularies beyond


def dtype_for(vocab_size):
    """The smallest dtype of the token files that holds every id: 8192 -> 'uint16';
    100_277 -> 'uint32'."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# What str.split() splits at: these ASCII bytes, and the wider whitespace characters below
ASCII_SPACE = np.zeros(256, dtype=bool)
ASCII_SPACE[list(b" \t\n\v\f\r\x1c\x1d\x1e\x1f")] = True
WIDE_SPACE = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


def count_words(text, convention="whitespace"):
    """Words for word-level perplexity: whitespace-separated words, or 'classic' (the WikiText and
    PTB papers' count): those plus one end-of-line per line, the last one too if it lacks a
    newline.

        count_words("a b\\nc\\n") -> 3;  count_words("a b\\nc\\n", "classic") -> 5

    len(text.split()), counted without making the words: where a space byte is followed by another
    byte (a UTF-8 character's bytes are never ASCII), unless the text holds a wider space."""
    if WIDE_SPACE.search(text):
        words = len(text.split())
    else:
        space = ASCII_SPACE[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]
        starts = np.count_nonzero(space[:-1] & ~space[1:])
        words = int(starts) + int(space.size > 0 and not space[0])
    if convention == "whitespace":
        return words
    if convention == "classic":
        return words + text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    raise ValueError(f"unknown word convention {convention!r}")


def _run_prepare_first(data_dir):
    name = Path(data_dir).name
    wikitext = name in ("wikitext-2", "wikitext-2-raw")
    args = f"--dataset={name}" if wikitext else f"--input=FILE --out_dir={data_dir}"
    return f"run prepare.py first (python prepare.py {args})"


def load_meta(data_dir):
    """The meta.json of a data folder, as a dict."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"no meta.json in {data_dir}: {_run_prepare_first(data_dir)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} ({e}): {_run_prepare_first(data_dir)} again")
    if not (isinstance(meta, dict) and type(meta.get("vocab_size")) is int):
        raise UserError(f"{path} is damaged (no whole-number vocab_size): "
                        f"{_run_prepare_first(data_dir)} again")
    return meta


def load_tokenizer(folder):
    """The tokenizer saved in a data folder (or a model's: the same files), or a UserError that
    says what is wrong with its files."""
    try:
        return BPETokenizer.load(folder)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_split(data_dir, split):
    """A split's token ids as a read-only memmap of meta.json's dtype (nothing is read into memory
    until used)."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(_no_split(data_dir, split))
    meta = load_meta(data_dir)
    dtype = meta.get("dtype", "uint16")
    if dtype not in DTYPES:
        raise UserError(f"{data_dir}/meta.json names the dtype {dtype!r}, not one of "
                        f"{', '.join(DTYPES)}: {_run_prepare_first(data_dir)} again")
    size, item = path.stat().st_size, np.dtype(dtype).itemsize
    if size % item or not size:
        raise UserError(f"{path} holds {size:,} bytes, not whole {dtype} ids: "
                        f"{_run_prepare_first(data_dir)} again")
    largest = largest_id(path, dtype)
    if largest >= meta["vocab_size"]:
        raise UserError(f"{path} holds the id {largest:,}, beyond its vocabulary of "
                        f"{meta['vocab_size']:,} (meta.json): the file is damaged; "
                        f"{_run_prepare_first(data_dir)} again")
    return np.memmap(path, dtype=dtype, mode="r")


def load_training_data(data_dir, block_size):
    """(meta.json, tokenizer, the train and val token ids) of a data folder, refused in one line
    where its tokenizer does not fit its meta.json or a split is not longer than one sequence."""
    meta, tokenizer = load_meta(data_dir), load_tokenizer(data_dir)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise UserError(f"vocab mismatch: the tokenizer in {data_dir} has {tokenizer.vocab_size:,} "
                        f"ids and its meta.json {meta['vocab_size']:,}: prepare it again")
    splits = {split: load_split(data_dir, split) for split in ("train", "val")}
    for name, split in splits.items():
        if len(split) <= block_size + 1:
            raise UserError(f"the {name} split has {len(split)} tokens, fewer than block_size="
                            f"{block_size}: lower --block_size or prepare more data")
    return meta, tokenizer, splits


def _no_split(data_dir, split):
    """Why data_dir has no such split, and what to do: a data folder prepared without a test split
    -> "... has no test split (it has train, val): prepare it with --test_fraction=0.1 ..."."""
    splits = load_meta(data_dir).get("splits") if (Path(data_dir) / "meta.json").is_file() else None
    if not isinstance(splits, dict) or split in splits:
        return f"no {split}.bin in {data_dir}: {_run_prepare_first(data_dir)}"
    flag = {"val": "--val_fraction=0.1", "test": "--test_fraction=0.1"}.get(split)
    again = f": prepare it again with {flag} (or --{split}_documents=N)" if flag else ""
    return f"{data_dir} has no {split} split (it has {', '.join(splits)}){again}"


def largest_id(path, dtype, chunk=1 << 24):
    """The largest id in a token file, read a chunk at a time into one buffer; the file's pages are
    then let go from the page cache, so that a scan of a big file leaves nothing behind for the
    training's memmap to map."""
    buffer, largest = np.empty(chunk, dtype=dtype), 0
    with open(path, "rb") as f:
        while n := f.readinto(memoryview(buffer).cast("B")) // buffer.itemsize:
            largest = max(largest, int(buffer[:n].max()))
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return largest
