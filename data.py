"""
The token files that prepare.py writes and train.py and evaluate.py read: a folder holding meta.json and one flat
array of token ids per split (train.bin, val.bin, test.bin; uint16, or uint32 as meta.json's dtype says), every document preceded by the end-of-text
token, so that decoding a split and dropping those tokens gives its text back byte for byte.

    meta = load_meta("data/wikitext-2")          # vocab size, special tokens; per split: documents, tokens, words
    ids = load_split("data/wikitext-2", "val")   # a read-only np.memmap: nothing is read until used
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from cli import UserError

SPLITS = ("train", "val", "test")
DTYPES = ("uint16", "uint32")  # uint16 holds 65,536 ids; uint32 the vocabularies beyond


def dtype_for(vocab_size):
    """The smallest dtype of the token files that holds every id: 8192 -> 'uint16'; 100_277 -> 'uint32'."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# What str.split() splits at: these ASCII bytes, and the wider whitespace characters below
ASCII_SPACE = np.zeros(256, dtype=bool)
ASCII_SPACE[list(b" \t\n\v\f\r\x1c\x1d\x1e\x1f")] = True
WIDE_SPACE = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


def count_words(text, convention="whitespace"):
    """Words for word-level perplexity: whitespace-separated words, or 'classic' (the WikiText and PTB papers' count):
    those plus one end-of-line per line, the last one too if it lacks a newline.

        count_words("a b\\nc\\n") -> 3;  count_words("a b\\nc\\n", "classic") -> 5

    len(text.split()), counted without making the words: where a space byte is followed by another byte (a UTF-8
    character's bytes are never ASCII), unless the text holds a wider space."""
    if WIDE_SPACE.search(text):
        words = len(text.split())
    else:
        space = ASCII_SPACE[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]
        words = int(np.count_nonzero(space[:-1] & ~space[1:])) + int(space.size > 0 and not space[0])
    if convention == "whitespace":
        return words
    if convention == "classic":
        return words + text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    raise ValueError(f"unknown word convention {convention!r}")


def _run_prepare_first(data_dir):
    name = Path(data_dir).name
    args = f"--dataset={name}" if name in ("wikitext-2", "wikitext-2-raw") else f"--input=FILE --out_dir={data_dir}"
    return f"run prepare.py first (python prepare.py {args})"


def load_meta(data_dir):
    """The meta.json of a data folder, as a dict."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"no meta.json in {data_dir}: {_run_prepare_first(data_dir)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} ({e}): {_run_prepare_first(data_dir)} again")


def load_split(data_dir, split):
    """A split's token ids as a read-only memmap of meta.json's dtype (nothing is read into memory until used)."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"no {split}.bin in {data_dir}: {_run_prepare_first(data_dir)}")
    dtype = load_meta(data_dir).get("dtype", "uint16")
    if dtype not in DTYPES:
        raise UserError(f"{data_dir}/meta.json names the dtype {dtype!r}, not one of {', '.join(DTYPES)}: "
                        f"{_run_prepare_first(data_dir)} again")
    size, item = path.stat().st_size, np.dtype(dtype).itemsize
    if size % item or not size:
        raise UserError(f"{path} holds {size:,} bytes, not whole {dtype} ids: {_run_prepare_first(data_dir)} again")
    largest = largest_id(path, dtype)
    vocab_size = load_meta(data_dir).get("vocab_size")
    if isinstance(vocab_size, int) and largest >= vocab_size:
        raise UserError(f"{path} holds the id {largest:,}, beyond its vocabulary of {vocab_size:,} (meta.json): "
                        f"the file is damaged; {_run_prepare_first(data_dir)} again")
    return np.memmap(path, dtype=dtype, mode="r")


def largest_id(path, dtype, chunk=1 << 24):
    """The largest id in a token file, read a chunk at a time into one buffer; the file's pages are then let go
    from the page cache, so that a scan of a big file leaves nothing behind for the training's memmap to map."""
    buffer, largest = np.empty(chunk, dtype=dtype), 0
    with open(path, "rb") as f:
        while n := f.readinto(memoryview(buffer).cast("B")) // buffer.itemsize:
            largest = max(largest, int(buffer[:n].max()))
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return largest
