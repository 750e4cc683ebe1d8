"""
Prepare a text dataset for training: get the text, train (or load) a BPE tokenizer, and write the token ids as flat
uint16 arrays that train.py reads with np.memmap.

    python prepare.py                                     # WikiText-2 raw: download, train a tokenizer, encode
    python prepare.py --source=DIR                        # the same from wiki.{train,valid,test}.raw in DIR (offline)
    python prepare.py --dataset=wikitext-2                # the tokenized release (<unk> for rare words): the benchmark
    python prepare.py --input=a.txt,b.txt --out_dir=data/mine     # text files of your own
    python prepare.py --tokenizer=gpt2                    # GPT-2's BPE instead of training our own

out_dir (default data/<dataset>) receives train.bin, val.bin, test.bin, the tokenizer (vocab.json + merges.txt) and
meta.json (tokenizer, special-token ids, and per split: documents, tokens, bytes, words). Every document (a WikiText
article, or one input file) starts with the end-of-text token, so decoding a .bin and dropping those tokens gives the
split's text back byte for byte. Downloads are cached in cache_dir and checked against their sha256.
"""

import hashlib
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

import cli
from cli import UserError
from tokenizer import BPETokenizer


@dataclass
class Config:
    dataset: str = "wikitext-2-raw"     # wikitext-2-raw (plain text) or wikitext-2 (the tokenized release)
    source: str = ""                    # folder (or the upstream .zip) holding the WikiText files: no download
    input: str = ""                     # your own UTF-8 text file(s), comma-separated, instead of WikiText
    val_fraction: float = 0.1           # --input: the last part of the text (cut at a line break) held out for val
    test_fraction: float = 0.0          # --input: the part after val held out for test (none by default)
    out_dir: str = ""                   # default: data/<dataset>
    cache_dir: str = "data/cache"       # where downloads are kept
    tokenizer: str = "bpe"              # bpe (train our own on the train split) or gpt2 (GPT-2's 50,257 ids)
    # 8192 ids: the embedding table stays small next to a ~10M-parameter model, yet most words are one token
    vocab_size: int = 8192
    min_frequency: int = 2              # a pair must occur this often to become a merge
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    gpt2_dir: str = ""                  # folder with GPT-2's encoder.json + vocab.bpe (else downloaded)
    check_sha256: bool = True           # refuse WikiText/GPT-2 files that differ from the published ones


SPLITS = ("train", "val", "test")
MAX_IDS = 1 << 16  # ids are stored as uint16

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
GPT2_FILES = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}

# ----------------------------------------------------------------------------- downloads


class Progress:
    """A one-line progress report on stderr, redrawn at most 5 times a second (every 30 s into a log file)."""

    def __init__(self, desc, total, unit_name="MB"):
        self.desc, self.total, self.unit_name, self.last, self.shown = desc, total, unit_name, 0.0, None
        self.interval = 0.2 if sys.stderr.isatty() else 30.0

    def update(self, done, force=False):
        if (force and done != self.shown) or time.time() - self.last > self.interval:
            self.last, self.shown = time.time(), done
            size = f"{done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f}" if self.total else "")
            pct = f"{100 * done / self.total:3.0f}% " if self.total else ""
            print(f"\r{self.desc}: {pct}({size} {self.unit_name})", end="", file=sys.stderr, flush=True)

    def close(self, done):
        self.update(done, force=True)
        print(file=sys.stderr)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url, part, desc):
    """Stream url into `part`, continuing an existing partial file with an HTTP Range request if the server can."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte ranges and lengths must refer to the file itself
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=30) as r:
        if have and r.status_code == 416:  # nothing left to send: the .part is complete (the checksum decides)
            return
        resumed = have > 0 and r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if not resumed and r.status_code != 200:
            raise requests.HTTPError(f"HTTP {r.status_code} {r.reason}")
        have = have if resumed else 0
        length = r.headers.get("Content-Length")
        total = have + int(length) if length else None
        progress = Progress(desc, total)
        with open(part, "ab" if resumed else "wb") as f:
            for block in r.iter_content(1 << 16):
                f.write(block)
                have += len(block)
                progress.update(have)
        progress.close(have)
        if total and have < total:
            raise requests.ConnectionError(f"connection closed after {have:,} of {total:,} bytes")


def _reason(e):
    text = str(e)
    return text if len(text) < 100 else type(e).__name__  # urllib3's messages run to several hundred characters


def download(url_or_urls, dest, sha256=None, desc=None, offline_hint=""):
    """Fetch a file to `dest`, trying mirror URLs in order; check its sha256, then rename it into place. Returns dest.

    A file already at dest with the right checksum is reused, one with the wrong checksum is fetched again. Bytes go to
    dest + ".part" first, so an interrupted download resumes next time and dest never holds a partial file.
    `offline_hint` tells the user how to do without the network (e.g. "pass --source=DIR ...").
    """
    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    dest, desc = Path(dest), desc or Path(dest).name
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            return dest
        print(f"{dest} fails its sha256 check: fetching it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problems = []
    for url in urls:
        for _ in range(2):  # the second try resumes an interrupted transfer, or restarts after a stale .part
            had = part.stat().st_size if part.exists() else 0
            try:
                _fetch(url, part, desc)
            except requests.RequestException as e:
                problems.append(f"{url}: {_reason(e)}")
                if part.exists() and part.stat().st_size > had:
                    continue  # it was making progress: pick up where it stopped
                break
            if sha256 is None or sha256_of(part) == sha256:
                os.replace(part, dest)
                return dest
            part.unlink()
            problems.append(f"{url}: sha256 mismatch")
            if not had:
                break  # a fresh copy was wrong: this mirror serves another file
    raise UserError(f"could not download {desc} ({'; '.join(problems)}); "
                    f"{offline_hint or f'download it yourself to {dest}'}")

# ----------------------------------------------------------------------------- the text of each split


def _utf8(data, name):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text (byte {e.start}); convert it first")


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


def wikitext_splits(cfg):
    """{split: text} of WikiText-2: from --source (a folder or the upstream zip), else downloaded and cached."""
    spec = WIKITEXT[cfg.dataset]
    names = {split: f"wiki.{theirs}.{spec['ext']}" for split, theirs in zip(SPLITS, ("train", "valid", "test"))}
    if cfg.source:
        source = Path(cfg.source)
        if not source.exists():
            raise UserError(f"--source={source} does not exist")
    else:
        urls = [mirror + spec["zip"] for mirror in WIKITEXT_MIRRORS]
        source = download(urls, Path(cfg.cache_dir) / spec["zip"], spec["sha256"], offline_hint=(
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
        other = next(d for d in WIKITEXT if d != cfg.dataset)
        looks_other = any(n.endswith("." + WIKITEXT[other]["ext"]) for n in listing)
        hint = f"; it looks like --dataset={other}" if looks_other else ""
        raise UserError(f"{source} has no {', '.join(missing)} (files of {spec['zip']}; without --source they are "
                        f"downloaded){hint}")
    texts = {}
    for split, name in names.items():
        data = read(name)
        if cfg.check_sha256 and hashlib.sha256(data).hexdigest() != spec[name.split(".")[1]]:
            raise UserError(f"{name} in {source} differs from the published WikiText file (sha256); use a fresh "
                            f"copy, or --check_sha256=False to use it as it is")
        texts[split] = _utf8(data, f"{source}/{name}")
    return texts


def _cut(docs, at):
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


def input_splits(cfg):
    """{split: [documents]} from --input files: each file a document; the text's tail becomes val (then test)."""
    docs = []
    for name in cfg.input.split(","):
        path = Path(name.strip())
        if not path.is_file():
            raise UserError(f"--input: no file {path}")
        docs.append(_utf8(path.read_bytes(), path))
    total = sum(map(len, docs))
    rest, test = _cut(docs, round(total * (1 - cfg.test_fraction)))
    train, val = _cut(rest, round(total * (1 - cfg.test_fraction - cfg.val_fraction)))
    splits = {"train": train, "val": val} | ({"test": test} if cfg.test_fraction else {})
    empty = [split for split, part in splits.items() if not "".join(part).strip()]
    if empty:
        raise UserError(f"--input leaves the {' and '.join(empty)} split empty: give more text (more lines) "
                        f"or change --val_fraction/--test_fraction")
    return splits


def count_words(text, convention="whitespace"):
    """Words for word-level perplexity: whitespace-separated words, or 'classic' (WikiText/PTB papers): + 1 per line."""
    words = len(text.split())
    if convention == "whitespace":
        return words
    if convention == "classic":  # every line ends with an <eos> token, the last one too if it lacks a newline
        return words + text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    raise ValueError(f"unknown word convention {convention!r}")

# ----------------------------------------------------------------------------- tokenizer and encoding


def check_vocab_fits(vocab_size):
    if vocab_size > MAX_IDS:
        raise UserError(f"vocab_size={vocab_size:,} does not fit the uint16 token files (at most {MAX_IDS:,} ids): "
                        f"lower --vocab_size")


def get_tokenizer(cfg, train_docs):
    """GPT-2's tokenizer (from --gpt2_dir, else downloaded), or a BPE tokenizer trained on the train split only."""
    if cfg.tokenizer == "gpt2":
        folder = Path(cfg.gpt2_dir or Path(cfg.cache_dir) / "gpt2")
        for name, sha in GPT2_FILES.items():
            if not cfg.gpt2_dir:
                download(GPT2_URL + name, folder / name, sha, desc=f"GPT-2 {name}",
                         offline_hint="pass --gpt2_dir=DIR with GPT-2's encoder.json and vocab.bpe")
            elif not (folder / name).is_file():
                raise UserError(f"--gpt2_dir={folder} has no {name} (GPT-2's encoder.json and vocab.bpe go there)")
            elif cfg.check_sha256 and sha256_of(folder / name) != sha:
                raise UserError(f"{folder / name} is not GPT-2's (sha256); use the published file, "
                                f"or --check_sha256=False to use it as it is")
        return BPETokenizer.load(folder / "encoder.json", folder / "vocab.bpe")
    print(f"training a BPE tokenizer ({cfg.vocab_size:,} ids) on the train split ...", file=sys.stderr)
    return BPETokenizer.train(train_docs, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                              special_tokens=cfg.special_tokens)


CHUNK_CHARS = 1 << 20
_SAFE_CUT = re.compile(r" (?=[!-~])")  # GPT-2's pre-tokenizer always starts a piece at a space before a visible char


def _chunks(doc):
    """Cut a long document where encoding is unaffected into ~CHUNK_CHARS pieces, so encode_batch can share it out."""
    pieces, start = [], 0
    while len(doc) - start > CHUNK_CHARS and (m := _SAFE_CUT.search(doc, start + CHUNK_CHARS)):
        pieces.append(doc[start:m.start()])
        start = m.start()
    return pieces + [doc[start:]]


def encode_split(tok, docs, desc, batch_chars=1 << 22):
    """All documents of a split as one uint16 array of ids, each document preceded by the end-of-text token."""
    chunked = [_chunks(doc) for doc in docs]
    flat = [piece for pieces in chunked for piece in pieces]
    batches, size = [[]], 0
    for piece in flat:  # batches of ~batch_chars, so the progress line moves on long inputs
        if size >= batch_chars:
            batches, size = batches + [[]], 0
        batches[-1].append(piece)
        size += len(piece)
    progress = Progress(f"encoding {desc}", sum(map(len, flat)), unit_name="M chars")
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

# ----------------------------------------------------------------------------- reading what prepare.py wrote


def _run_first(data_dir):
    name = Path(data_dir).name
    args = f"--dataset={name}" if name in WIKITEXT else f"--input=FILE --out_dir={data_dir}"
    return f"run prepare.py first (python prepare.py {args})"


def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"no meta.json in {data_dir}: {_run_first(data_dir)}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(data_dir, split):
    """A split's token ids as a read-only uint16 memmap (nothing is read into memory until used)."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"no {split}.bin in {data_dir}: {_run_first(data_dir)}")
    return np.memmap(path, dtype=np.uint16, mode="r")

# ----------------------------------------------------------------------------- main


def _write_atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def check_config(cfg):
    """Everything that can be refused before any download or training."""
    if not cfg.input and cfg.dataset not in WIKITEXT:
        raise UserError(f"unknown --dataset={cfg.dataset}: choose {' or '.join(WIKITEXT)}, or give --input=FILE")
    if cfg.input and cfg.source:
        raise UserError("--source is for WikiText files; your own files go in --input alone")
    if cfg.tokenizer not in ("bpe", "gpt2"):
        raise UserError(f"unknown --tokenizer={cfg.tokenizer}: choose bpe or gpt2")
    if not (0 < cfg.val_fraction and 0 <= cfg.test_fraction and cfg.val_fraction + cfg.test_fraction < 1):
        raise UserError("--val_fraction must be > 0, --test_fraction >= 0, and together below 1")
    if cfg.tokenizer == "bpe":
        check_vocab_fits(cfg.vocab_size)
        if "<|endoftext|>" not in cfg.special_tokens:
            raise UserError("--special_tokens must include <|endoftext|>: it marks where each document starts")
        if cfg.vocab_size < 256 + len(cfg.special_tokens):
            raise UserError(f"--vocab_size must be at least {256 + len(cfg.special_tokens)} "
                            f"(256 bytes + the special tokens)")


def prepare_data(cfg):
    """Write out_dir/{train,val,test}.bin, the tokenizer files and meta.json; returns the meta dict."""
    t0 = time.time()
    check_config(cfg)
    if cfg.input:
        name = "+".join(Path(f.strip()).stem for f in cfg.input.split(","))
        splits = input_splits(cfg)
    else:
        name = cfg.dataset
        splits = {split: wikitext_articles(text) for split, text in wikitext_splits(cfg).items()}
    convention = "classic" if name == "wikitext-2" else "whitespace"
    out_dir = Path(cfg.out_dir or f"data/{name}")

    tok = get_tokenizer(cfg, splits["train"])
    check_vocab_fits(tok.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # until the new one is written, this is no finished dataset
    stats = {}
    for split, docs in splits.items():
        ids = encode_split(tok, docs, split)
        _write_atomic(out_dir / f"{split}.bin", ids.tofile)
        text = "".join(docs)
        stats[split] = {"documents": len(docs), "tokens": len(ids), "bytes": len(text.encode("utf-8")),
                        "words_whitespace": count_words(text, "whitespace")}
        if convention == "classic":
            stats[split]["words_classic"] = count_words(text, "classic")
    for split in set(SPLITS) - set(splits):
        (out_dir / f"{split}.bin").unlink(missing_ok=True)  # a stale split from an earlier run would mislead

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # saved aside, then moved in: no half-written vocab
        files = [Path(f).name for f in tok.save(tmp)]
        for f in files:
            os.replace(Path(tmp) / f, out_dir / f)
    meta = {
        "dataset": name,
        "tokenizer": {"kind": cfg.tokenizer, "files": files} | (
            {"min_frequency": cfg.min_frequency} if cfg.tokenizer == "bpe" else {}),
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special_tokens,
        "eot_id": tok.eot_id,
        "dtype": "uint16",
        "layout": "each document is preceded by eot_id",
        "word_convention": convention,  # word-level perplexity divides by splits[...]["words_" + word_convention]
        "splits": stats,
    }
    _write_atomic(out_dir / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8"))

    print(f"{name}, {cfg.tokenizer} tokenizer with {tok.vocab_size:,} ids -> {out_dir} in {time.time() - t0:.1f} s")
    for split, s in stats.items():
        print(f"  {split + '.bin':9s} {s['tokens']:>11,} tokens ({2 * s['tokens'] / 1e6:6.2f} MB) from "
              f"{s['documents']:,} documents, {s['bytes']:,} bytes ({s['bytes'] / s['tokens']:.2f} bytes/token)")
    return meta


def main():
    prepare_data(cli.parse_config(Config))


if __name__ == "__main__":
    cli.run_main(main)
