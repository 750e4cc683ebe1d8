"""
Prepare a corpus for training: read its text, train (or load) a BPE tokenizer, encode, and write
the token ids as flat arrays that train.py reads with np.memmap. Memory stays bounded whatever the
corpus's size: the text is read, counted and encoded a piece at a time, on every core.

    python prepare.py                       # WikiText-2 raw: download, train a tokenizer, encode
    python prepare.py --source=DIR          # the same from wiki.{train,valid,test}.raw in DIR
    python prepare.py --dataset=wikitext-2  # the tokenized release (<unk> for rare words)
    python prepare.py --input=a.txt,books/ --out_dir=data/mine    # .txt, .jsonl, .parquet, .gz
    python prepare.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT
    python prepare.py --tokenizer=gpt2      # GPT-2's BPE instead of our own: data/<dataset>-gpt2
    python prepare.py --input=web/ --scrub_pii=True --dedup=near  # <EMAIL>, ...; near copies out

corpus.py reads the documents and puts each in its split; data.py reads the result in out_dir
(default data/<name>): train.bin, val.bin, test.bin (uint16 ids, uint32 past 65,536; each document
after an end-of-text token), the tokenizer and meta.json. Work in progress stays in .partial there:
nothing gets a final name before it is whole, and a stopped run starts over, reusing the tokenizer
it trained. Data that another tokenizer made is replaced only with --overwrite=True.
"""

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cli import UserError, check_settings, parse_config, run_main, setting
from clean import clean_stream
from corpus import (WIKITEXT, Corpus, batched, check_splits, corpus_name, document_stream,
                    first_chars, reading_progress)
from data import SPLITS, count_words, dtype_for, load_tokenizer
from download import download, sha256_of
from files import atomic_write, check_writable, folder_lock, write_json
from tokenizer import GPT2_MERGES_SHA256, GPT2_VOCAB_SHA256, BPETokenizer, check_special_tokens
from workers import cpu_count, end_pool, ordered_map, worker_pool


@dataclass
class PrepareConfig:
    dataset: str = "wikitext-2-raw"  # wikitext-2-raw (plain text), or wikitext-2 (tokenized, <unk>)
    source: str = ""                 # folder (or the upstream .zip) of the WikiText files: offline
    # your own corpus instead of WikiText
    input: str = ""                  # files, folders, globs, comma-separated: .txt (a file is a
                                     # document), .jsonl and .parquet (a record is one), also .gz
    hf_dataset: str = ""             # a Hugging Face dataset, streamed, or json or parquet (a
                                     # builder) with --hf_data_files
    hf_config: str = ""              # the dataset's configuration, e.g. sample-10BT
    hf_split: str = "train"          # the dataset's split to read
    hf_data_files: str = ""          # files for a builder, comma-separated
    text_field: str = "text"         # the field holding the text (JSON lines, Parquet, datasets)
    val_fraction: float = setting(0.1, above=0, below=1)  # the share of documents held out for val
    test_fraction: float = setting(0.1, low=0, below=1)   # the share held out for test
    val_documents: int = setting(0, low=0)   # instead: the corpus's first N documents for val,
    test_documents: int = setting(0, low=0)  # and the N after them for test
    workers: int = setting(0, low=0)         # processes that count and encode; 0: one per core
    # what is left out or replaced (nothing by default)
    scrub_pii: bool = False          # personal data and keys -> <EMAIL>, <PHONE>, ... (scrub.py)
    dedup: str = setting("off", choices=("off", "exact", "near"))  # leave out later copies: the
                                                                   # same words, or near (MinHash)
    dedup_threshold: float = setting(0.8, above=0, high=1)  # near: the Jaccard similarity of a copy
    dedup_memory_mb: int = setting(64, low=1)  # the Bloom filter of the documents kept
    # where it goes
    out_dir: str = ""                # default: data/<name> (data/<name>-gpt2 with GPT-2's tokens)
    overwrite: bool = False          # replace data in out_dir that another tokenizer made
    cache_dir: str = "data/cache"    # where downloads are kept
    # the tokenizer
    tokenizer: str = "bpe"           # bpe: trained on train; gpt2: GPT-2's; or a folder holding
                                     # vocab.json + merges.txt (a data folder)
    vocab_size: int = setting(8192, low=257, high=1 << 20)  # bpe: ids in all (8192: a small
                                                            # embedding table, most words one token)
    min_frequency: int = setting(2, low=1)  # a pair must occur this often to become a merge
    tokenizer_chars: int = setting(100_000_000, low=1)  # bpe: learn from the train split's first
                                                        # N characters (memory grows with them)
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)  # bpe: ids after the merges;
                                                          # <|endoftext|> is required
    gpt2_dir: str = ""               # folder of GPT-2's encoder.json + vocab.bpe (else downloaded)
    check_sha256: bool = True        # refuse WikiText/GPT-2 files that differ from the published


GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {"encoder.json": GPT2_VOCAB_SHA256, "vocab.bpe": GPT2_MERGES_SHA256}


# ----------------------------------------------------------------------------- main

def prepare_data(config):
    """Write out_dir/{train,val,test}.bin, the tokenizer and meta.json; returns meta.json's dict."""
    t0 = time.time()
    check_config(config)
    name = corpus_name(config)
    out_dir = Path(config.out_dir or f"data/{name}{'-gpt2' if config.tokenizer == 'gpt2' else ''}")
    work_dir = out_dir / ".partial"
    # one run at a time: a second would remove this one's work files
    with folder_lock(out_dir):
        stream, source = document_stream(config, out_dir)
        # (stops at the first text)
        if not any(piece.strip() for split, _, piece in stream() if split == "train"):
            raise UserError("the corpus is empty: its train split has no text, only whitespace; "
                            "give more text")
        kept, settings = start_work_dir(work_dir, config, source)
        workers = config.workers or cpu_count()
        pool = worker_pool(workers) if workers > 1 else None
        try:
            stream = clean_stream(config, stream, source, pool, 2 * workers)
            if kept:
                tok = load_tokenizer(work_dir)
            else:
                train_text = first_chars(stream("train"), "train", config.tokenizer_chars)
                tok = get_tokenizer(config, train_text, pool)
                tok.save(work_dir)
                write_json(work_dir / "settings.json", settings)
            check_replaceable(out_dir, tok, config.overwrite)
            t1 = time.time()
            dtype = dtype_for(tok.vocab_size)
            totals, parts = encode_stream(stream(), str(work_dir), dtype, pool, 2 * workers,
                                          *reading_progress(source, "encoding"))
            t2 = time.time()
            check_splits(config, totals, sum(stream.removed.values()))
            meta = new_meta(config, name, tok, dtype) | stream.meta()
            write_dataset(out_dir, work_dir, tok, dtype, totals, parts, meta)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"nothing was written under a final name in {out_dir}; the "
                                    f"same command starts over") from None
        # writing: a full disk, a folder made read-only meanwhile
        except OSError as e:
            raise UserError(f"cannot write in {out_dir} ({e.strerror or e}): nothing was written "
                            f"under a final name; make room and run the same command again") \
                from None
        finally:
            if pool is not None:
                end_pool(pool)
    report(meta, out_dir, workers, t1 - t0 - stream.seconds, t2 - t1, time.time() - t0, stream)
    return meta


def check_config(config):
    """Everything that can be refused before any download or training."""
    check_settings(config)
    check_writable(config.out_dir or "data", "out_dir")
    if config.input and config.hf_dataset:
        raise UserError("give one corpus: --input or --hf_dataset")
    if not (config.input or config.hf_dataset) and config.dataset not in WIKITEXT:
        raise UserError(f"unknown --dataset={config.dataset}: choose {' or '.join(WIKITEXT)}, "
                        f"or give --input=FILE or --hf_dataset=NAME")
    if (config.input or config.hf_dataset) and config.source:
        raise UserError("--source is for WikiText files; your own corpus goes in --input or "
                        "--hf_dataset alone")
    if config.val_fraction + config.test_fraction >= 1:
        raise UserError("--val_fraction and --test_fraction together must be below 1: train "
                        "needs the rest")
    if config.tokenizer == "bpe":
        if "<|endoftext|>" not in config.special_tokens:
            raise UserError("--special_tokens must include <|endoftext|>: it marks where each "
                            "document starts")
        if config.vocab_size < 256 + len(config.special_tokens):
            raise UserError(f"--vocab_size must be at least {256 + len(config.special_tokens)} "
                            f"(256 bytes + the special tokens)")
        try:
            check_special_tokens(config.special_tokens)
        except ValueError as e:
            raise UserError(f"--special_tokens: {e}") from None
    elif config.tokenizer != "gpt2" and not os.path.isdir(config.tokenizer):
        raise UserError(f"--tokenizer must be bpe, gpt2 or a folder holding a tokenizer "
                        f"(vocab.json + merges.txt), got {config.tokenizer!r}")


def start_work_dir(work_dir, config, source):
    """Make work_dir; an earlier run's files there are removed, but for the tokenizer it trained,
    kept if it was trained with the same settings (and files). Returns whether it was kept, and
    the settings that make the tokenizer, as JSON has them."""
    ignored = ("out_dir", "overwrite", "workers", "cache_dir")
    settings = {k: v for k, v in asdict(config).items() if k not in ignored}
    if isinstance(source, Corpus):  # a changed file makes another tokenizer
        settings["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime] for f in source.files]
    # so does a scrubbing library installed or removed meanwhile
    if config.scrub_pii:
        from scrub import backends
        settings["scrub_pii_backends"] = backends()
    settings, kept = json.loads(json.dumps(settings)), False
    try:
        if work_dir.exists():
            with contextlib.suppress(OSError, ValueError):
                kept = json.loads((work_dir / "settings.json").read_bytes()) == settings
            print(f"{work_dir} holds a run that did not finish: starting over"
                  + (", with the tokenizer it trained" if kept else ""), file=sys.stderr)
            for path in work_dir.iterdir():
                if not kept or path.suffix == ".ids":
                    path.unlink()
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a folder we cannot write in: said before any work
        raise UserError(f"cannot write in {work_dir.parent} ({e.strerror or e}): choose another "
                        f"--out_dir") from None
    return kept, settings


# ----------------------------------------------------------------------------- the tokenizer

def get_tokenizer(config, train_text, pool):
    """GPT-2's tokenizer, a tokenizer folder, or a BPE tokenizer trained on train_text (the first
    tokenizer_chars of the train split)."""
    if config.tokenizer == "gpt2":
        return gpt2_tokenizer(config)
    if config.tokenizer != "bpe":
        try:
            tok = BPETokenizer.load(config.tokenizer)
        except ValueError as e:
            raise UserError(f"--tokenizer={config.tokenizer}: {e}") from None
        if tok.eot_id is None:
            raise UserError(f"--tokenizer={config.tokenizer} has no <|endoftext|> token to start "
                            f"each document with")
        return tok
    print(f"training a BPE tokenizer ({config.vocab_size:,} ids) on the first "
          f"{config.tokenizer_chars:,} characters of the train split ...", file=sys.stderr)
    try:
        return BPETokenizer.train(train_text, vocab_size=config.vocab_size, pool=pool,
                                  min_frequency=config.min_frequency,
                                  special_tokens=config.special_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None


def gpt2_tokenizer(config):
    """GPT-2's tokenizer, from --gpt2_dir (checked against the published files), else downloaded."""
    folder = Path(config.gpt2_dir or Path(config.cache_dir) / "gpt2")
    for name, sha in GPT2_FILES.items():
        if not config.gpt2_dir:
            download(GPT2_URL + name, folder / name, sha, desc=f"GPT-2 {name}",
                     offline_hint="pass --gpt2_dir=DIR with GPT-2's encoder.json and vocab.bpe")
        elif not (folder / name).is_file():
            raise UserError(f"--gpt2_dir={folder} has no {name} (GPT-2's encoder.json and "
                            f"vocab.bpe go there)")
        elif config.check_sha256 and sha256_of(folder / name) != sha:
            raise UserError(f"{folder / name} is not GPT-2's (sha256); use the published file, "
                            f"or --check_sha256=False to use it as it is")
    try:
        return BPETokenizer.load(folder / "encoder.json", folder / "vocab.bpe")
    except ValueError as e:
        raise UserError(f"--gpt2_dir={folder}: {e}") from None


def check_replaceable(out_dir, tok, overwrite):
    """Refuse to replace data that another tokenizer made (a model trained on it would no longer
    match its data), unless asked to; data made again with the same tokenizer is the same data."""
    if overwrite or not (out_dir / "meta.json").is_file():
        return
    try:
        same = BPETokenizer.load(out_dir).fingerprint() == tok.fingerprint()
    except ValueError:  # tokenizer files missing or broken: not known to be the same
        same = False
    if not same:
        raise UserError(f"{out_dir} holds data made with another tokenizer: choose another "
                        f"--out_dir, or replace it with --overwrite=True")


# ----------------------------------------------------------------------------- the token files

_tokenizers = {}  # a worker's tokenizer, loaded once from the folder it is saved in


def encode_batch(work_dir, dtype, items):
    """Encode [(split, starts a document, text)] with the tokenizer saved in work_dir, append the
    ids to this process's file of each split there (the end-of-text token before each document),
    and return per split: where they went and what they hold."""
    if work_dir not in _tokenizers:
        _tokenizers[work_dir] = load_tokenizer(work_dir)
    tok = _tokenizers[work_dir]
    ids, stats = {}, {}
    for split, starts, text in items:
        ids.setdefault(split, []).extend([np.array([tok.eot_id], dtype)] * starts
                                         + [tok.encode_to_numpy(text)])
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
            np.concatenate(arrays, dtype=dtype, casting="unsafe").tofile(f)  # ids fit dtype
    return stats


def encode_stream(stream, work_dir, dtype, pool, ahead, progress, position):
    """Encode the stream in batches of ~1M characters on the pool; returns {split: totals} and,
    per split, where its ids are, in order: [(file, offset, tokens)]. The progress line shows
    position() (else the bytes done)."""
    totals, parts, done = {}, {}, 0
    batches = ((work_dir, dtype, batch) for batch in batched(stream))
    for stats in ordered_map(pool, encode_batch, batches, ahead):
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
                    if not block:  # a work file cut short under us: stop, not loop forever
                        raise OSError(f"{work_dir / name} is shorter than the ids written into it")
                    out.write(block)
                    left -= len(block)


def new_meta(config, name, tok, dtype):
    """meta.json but the splits' totals and tokenizer files. splits[...]["words_" + word_convention]
    counts words as the WikiText papers do (classic: + one per line end) or by whitespace;
    unknown_word is the tokenized release's marker for rare words."""
    kind = config.tokenizer if config.tokenizer in ("bpe", "gpt2") else "folder"
    extra = {"bpe": {"min_frequency": config.min_frequency}, "folder": {"from": config.tokenizer}}
    classic = name == "wikitext-2"
    return {"dataset": name, "tokenizer": {"kind": kind, "files": []} | extra.get(kind, {}),
            "vocab_size": tok.vocab_size, "special_tokens": tok.special_tokens,
            "eot_id": tok.eot_id, "dtype": dtype, "layout": "each document is preceded by eot_id",
            "word_convention": "classic" if classic else "whitespace",
            **({"unknown_word": "<unk>"} if classic else {}), "splits": {}}


def write_dataset(out_dir, work_dir, tok, dtype, totals, parts, meta):
    """Move the finished dataset to its final names: each .bin whole, the tokenizer, then
    meta.json (the folder is no finished dataset without it), with the splits' totals."""
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split in SPLITS:
        if split in parts:
            atomic_write(out_dir / f"{split}.bin",
                         lambda tmp: concatenate(parts[split], work_dir, dtype, tmp))
            for file in {file for file, _, _ in parts[split]}:
                (work_dir / file).unlink()
        else:  # a stale split from an earlier run would mislead
            (out_dir / f"{split}.bin").unlink(missing_ok=True)
    meta["tokenizer"]["files"] = tok.save(out_dir)
    for split in (s for s in SPLITS if s in totals):
        t = totals[split]
        meta["splits"][split] = {"documents": t["documents"], "tokens": t["tokens"],
                                 "bytes": t["bytes"], "words_whitespace": t["words"]}
        if meta["word_convention"] == "classic":
            classic = t["words"] + t["lines"] + (0 if t["ends_line"] else 1)
            meta["splits"][split]["words_classic"] = classic
    write_json(out_dir / "meta.json", meta)
    shutil.rmtree(work_dir)


def report(meta, out_dir, workers, tokenizer_seconds, encoding_seconds, seconds, clean):
    """The summary lines: the time taken, what each split holds, what clean (the CleanStream read)
    left out or replaced."""
    text_bytes = sum(s["bytes"] for s in meta["splits"].values())
    speed = text_bytes / 1e6 / max(encoding_seconds, 1e-9)
    print(f"{meta['dataset']}, {meta['tokenizer']['kind']} tokenizer with {meta['vocab_size']:,} "
          f"ids -> {out_dir} in {seconds:.1f} s (tokenizer {tokenizer_seconds:.1f} s, encoding "
          f"{encoding_seconds:.1f} s: {speed:.1f} MB/s on {workers} processes)")
    for split, s in meta["splits"].items():
        megabytes = np.dtype(meta["dtype"]).itemsize * s["tokens"] / 1e6
        print(f"  {split + '.bin':9s} {s['tokens']:>11,} tokens ({megabytes:6.2f} MB) from "
              f"{s['documents']:,} documents, {s['bytes']:,} bytes "
              f"({s['bytes'] / s['tokens']:.2f} bytes/token)")
    for line in clean.summary():
        print("  " + line)


def main():
    prepare_data(parse_config(PrepareConfig))


if __name__ == "__main__":
    run_main(main)
