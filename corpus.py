"""
The documents of a corpus, read one piece at a time so that memory does not grow with its size,
and the split each one goes to. A corpus is WikiText-2 (downloaded, or its files), text files, JSON
lines or Parquet files (any of them gzipped), folders and globs of them, or a Hugging Face dataset,
streamed.

    corpus = Corpus.from_files("books/,web/*.jsonl.gz", text_field="text")
    for chunks in corpus.documents():      # one document: an iterator of str chunks
        for chunk in chunks: ...            # a text file comes in chunks of ~1 MB; a record in one
    corpus.done_bytes, corpus.total_bytes   # how far the reading is, in bytes of the input files

A text file is one document; a JSON line or a Parquet row is one document (its `text_field`); so is
a dataset's example, and a WikiText article. Errors in the input (a missing file, bytes that are not
UTF-8, a line that is not JSON, a record without the field) are one UserError that names the file
and the line.

The documents of every split then come as one stream of (split, starts a document, text): val and
test are whole documents spread evenly through the corpus (`split_of`), or the tail of text files
too few to give whole ones (`by_tail`); a long document comes in pieces cut where encoding is
unaffected (`in_pieces`). clean.py leaves duplicates and personal data out of that stream.
"""

import codecs
import contextlib
import fnmatch
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import zipfile
import zlib
from pathlib import Path

from cli import UserError
from data import SPLITS
from download import download
from files import Progress, decode_utf8
from tokenizer import cut_stream

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
# what a folder contributes besides the two above
TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")
CHUNK_BYTES = 1 << 20
# what json.loads turns a lone surrogate into (an escaped \ud800, or its bytes): no UTF-8 text
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def gzipped(path):
    """Whether a file is read through gzip, from its name: 'a.TXT.GZ' -> True."""
    return path.name.lower().endswith(".gz")


def kind_of(path):
    """'jsonl', 'parquet' or 'text', from the name (a .gz after it is looked through):
    'a.jsonl.gz' -> 'jsonl'."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if name.endswith(PARQUET_SUFFIXES) else "text"


def find_files(spec, skip=None):
    """The files that a comma-separated list of files, folders (all corpus files below,
    recursively) and globs names, each part in sorted order, each file once:

        'b.txt,notes/' -> [b.txt, notes/a.md, notes/sub/c.jsonl]

    A path that exists is that path, even with glob characters or commas in its name ('[1].txt',
    'a,b.txt'). Folders and '**' go through symbolic links, into each real folder once, and pass
    over hidden folders and files (.git/, .venv/) and the folder `skip` (the output's).
    """
    known = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    skipped = {identity(skip)} if skip and Path(skip).is_dir() else set()
    files, seen = [], set()
    for part in spec_parts(spec):
        path = Path(part)
        if path.is_dir():
            found = sorted(folder / name for folder, names in walk(path, skipped) for name in names
                           if name.lower().removesuffix(".gz").endswith(known))
            if not found:
                raise UserError(f"--input: the folder {path} holds no {', '.join(known)} files "
                                f"(or .gz of them)")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(part):
            found = sorted(f for f in glob_files(Path(), Path(part).parts, skipped) if f.is_file())
            if not found:
                raise UserError(f"--input: nothing matches {part}")
        else:
            raise UserError(f"--input: no file or folder {path}")
        for file in found:
            if identity(file) not in seen:
                seen.add(identity(file))
                files.append(file)
    if not files:
        raise UserError("--input names no files: give files, folders or globs, comma-separated")
    return files


def spec_parts(spec):
    """The comma-separated parts of --input, where a part that is no path joins the ones after it
    if that makes one: 'a,b.txt,c.txt' -> ['a,b.txt', 'c.txt'] (where a,b.txt exists)."""
    pieces, parts = spec.split(","), []
    while pieces:
        part = pieces.pop(0)
        if not os.path.exists(part.strip()):
            more = next((n for n in range(1, len(pieces) + 1)
                         if os.path.exists(",".join([part, *pieces[:n]]).strip())), 0)
            part, pieces = ",".join([part, *pieces[:more]]), pieces[more:]
        if part.strip():
            parts.append(part.strip())
    return parts


def identity(path):
    """What makes a file or folder itself, however it is reached: (device, inode)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def walk(top, skip=()):
    """(folder, its file names) for top and each folder below it, in name order, through symbolic
    links but into each real folder once (a link to a folder above ends there), passing over hidden
    names and the folders whose identity() is in skip."""
    seen, todo = set(skip), [Path(top)]
    while todo:
        folder = todo.pop()
        try:
            key = identity(folder)
            if key in seen:
                continue
            seen.add(key)
            entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                             key=lambda e: e.name)
        # a broken link, a folder we may not read
        except OSError:
            continue
        todo += reversed([Path(e.path) for e in entries if e.is_dir()])
        yield folder, [e.name for e in entries if e.is_file()]


def glob_files(folder, parts, skip):
    """The paths below folder that the glob's parts match, '**' any folders (walk's rules); a hidden
    name matches only a part that starts with a dot, as in glob.glob."""
    if not parts:
        yield folder
        return
    with contextlib.suppress(OSError):
        if identity(folder) in skip:
            return
    head, rest = parts[0], parts[1:]
    if head == "**":
        for below, names in walk(folder, skip):
            yield from glob_files(below, rest, skip)
            if not rest:
                yield from (below / name for name in names)
    elif glob.has_magic(head):
        try:
            names = sorted(fnmatch.filter(os.listdir(folder), head))
        except OSError:
            names = []
        for name in names:
            if not name.startswith(".") or head.startswith("."):
                yield from glob_files(folder / name, rest, skip)
    else:
        yield from glob_files(folder / head, rest, skip)


class Corpus:
    """Documents from files or from a Hugging Face dataset, read lazily; done_bytes/total_bytes tell
    how far."""

    def __init__(self, files=(), text_field="text", dataset=None, describe=""):
        self.files, self.text_field = list(files), text_field
        self.dataset, self.describe = dataset, describe
        self.sizes = {f: f.stat().st_size for f in self.files}
        # {file: the bytes of the files before it}
        self._before = dict(zip(self.files, itertools.accumulate([0, *self.sizes.values()])))
        self.total_bytes = sum(self.sizes.values()) if self.files else None
        self.done_bytes = 0

    @classmethod
    def from_files(cls, spec, text_field="text", skip=None):
        return cls(find_files(spec, skip), text_field, describe=spec)

    @classmethod
    def from_hub(cls, name, config="", split="train", data_files="", text_field="text"):
        """A Hugging Face dataset, streamed: a hub name ('HuggingFaceFW/fineweb-edu'), a local
        dataset folder, or a builder for local files ('json', 'parquet', 'text' with data_files):
        nothing is downloaded ahead. It is opened where it is read (see _dataset_documents)."""
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise UserError("--hf_dataset needs the datasets package: pip install datasets") \
                from None
        files = [f.strip() for f in data_files.split(",") if f.strip()] or None
        dataset = {"path": name, "name": config or None, "split": split, "data_files": files}
        return cls(text_field=text_field, dataset=dataset, describe=name)

    def is_text_files(self):
        """True when every document is a whole text file (so the documents are few and their sizes
        known)."""
        return self.dataset is None and all(kind_of(f) == "text" for f in self.files)

    def text_sizes(self):
        """The bytes of text in each file (a .gz file is read through to count them)."""
        return [sum(map(len, self._binary_chunks(f))) if gzipped(f) else self.sizes[f]
                for f in self.files]

    def documents(self):
        """Each document as an iterator of str chunks; take each one fully before asking for the
        next."""
        self.done_bytes = 0
        if self.dataset is not None:
            yield from self._dataset_documents()
            return
        for path in self.files:
            kind = kind_of(path)
            if kind == "text":
                yield self._text_chunks(path)
            else:
                records = self._jsonl_texts(path) if kind == "jsonl" else self._parquet_texts(path)
                for text in records:
                    yield iter((text,))
            self.done_bytes = self._before[path] + self.sizes[path]

    def _binary_chunks(self, path):
        """The bytes of a file (decompressed if .gz) in chunks; done_bytes follows the file read so
        far."""
        try:
            with open(path, "rb") as raw:
                stream = gzip.GzipFile(fileobj=raw) if gzipped(path) else raw
                while chunk := stream.read(CHUNK_BYTES):
                    self.done_bytes = self._before[path] + raw.tell()
                    yield chunk
        except GZIP_ERRORS as e:
            raise not_gzip(path, e) from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None

    def _text_chunks(self, path):
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        for chunk in self._binary_chunks(path):
            try:
                yield decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (byte {offset + e.start:,}); convert it "
                                f"first") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text (it ends inside a character); convert it "
                            f"first") from None

    def _field(self, record, where):
        if not isinstance(record, dict):
            raise UserError(f"{where}: a record is a {type(record).__name__}, not an object with a "
                            f"{self.text_field!r} field")
        if self.text_field not in record:
            fields = ", ".join(map(str, list(record)[:10])) or "none"
            raise UserError(f"{where}: no {self.text_field!r} field (fields: {fields}); choose one "
                            f"with --text_field")
        text = record[self.text_field]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise UserError(f"{where}: the {self.text_field!r} field is a {type(text).__name__}, "
                            f"not text")
        if LONE_SURROGATE.search(text):
            raise UserError(f"{where}: the text holds a lone surrogate (\\ud800 to \\udfff: half a "
                            f"character, which UTF-8 cannot hold); fix or drop that record")
        return text

    def _jsonl_texts(self, path):
        line_no, tail = 0, b""
        for chunk in self._binary_chunks(path):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                line_no += 1
                if line.strip():
                    yield self._field(self._json(line, path, line_no), f"{path}:{line_no}")
        if tail.strip():
            yield self._field(self._json(tail, path, line_no + 1), f"{path}:{line_no + 1}")

    @staticmethod
    def _json(line, path, line_no):
        try:
            return json.loads(line)
        except UnicodeDecodeError:
            raise UserError(f"{path}:{line_no}: not UTF-8 text; convert the file first") from None
        except ValueError as e:
            raise UserError(f"{path}:{line_no}: not a JSON line ({e}); each line must hold one "
                            f"JSON object") from None
        except RecursionError:
            raise UserError(f"{path}:{line_no}: a JSON line nested too deeply to read; fix or "
                            f"drop that record") from None

    def _parquet_texts(self, path):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("Parquet input needs the pyarrow package: pip install pyarrow") \
                from None
        try:
            source = gzip.open(path) if gzipped(path) else path
            table = pq.ParquetFile(source)
            names = table.schema_arrow.names
            if self.text_field not in names:
                raise UserError(f"{path}: no {self.text_field!r} column (columns: "
                                f"{', '.join(names[:10])}); choose one with --text_field")
            before, groups = self._before[path], max(table.num_row_groups, 1)
            for g in range(table.num_row_groups):
                batches = table.iter_batches(batch_size=1024, row_groups=[g],
                                             columns=[self.text_field])
                for batch in batches:
                    for text in batch.column(0).to_pylist():
                        if text is not None and not isinstance(text, str):
                            raise UserError(f"{path}: the {self.text_field!r} column holds "
                                            f"{type(text).__name__}, not text")
                        yield text or ""
                self.done_bytes = before + self.sizes[path] * (g + 1) // groups
        except GZIP_ERRORS as e:
            raise not_gzip(path, e) from None
        except OSError as e:
            raise UserError(f"cannot read {path} as Parquet ({e})") from None
        except Exception as e:
            # ArrowInvalid and kin: not a Parquet file
            if type(e).__module__.startswith("pyarrow"):
                raise UserError(f"cannot read {path} as Parquet ({str(e).splitlines()[0]})") \
                    from None
            raise

    def _dataset_documents(self):
        """The dataset's examples, opened and read in a child process (workers.in_child): whatever
        the datasets library or pyarrow raises, or a segfault (pyarrow's, on a JSON line nested
        100,000 deep), is one UserError here."""
        from workers import in_child
        count = 0
        try:
            for text in in_child(self._dataset_texts):
                # (characters: the dataset's size in bytes is not known ahead)
                self.done_bytes += len(text)
                count += 1
                yield iter((text,))
        except UserError:
            raise
        except Exception as e:
            crashed = isinstance(e, ChildProcessError)
            problem = f"the process reading it {e}" if crashed else \
                f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            raise UserError(f"cannot read {self.describe} after {count:,} examples ({problem}): "
                            f"check its files (--input reads JSON lines and Parquet and names a "
                            f"bad line)") from None

    def _dataset_texts(self):
        """The text of each example (in the child process of _dataset_documents)."""
        import datasets
        try:
            stream = datasets.load_dataset(**self.dataset, streaming=True)
        # datasets raises many kinds: no such dataset, config, split, network
        except Exception as e:
            raise UserError(f"cannot open the dataset {self.describe} "
                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
        for i, example in enumerate(stream):
            where = f"{self.describe}, example {i:,}"
            # a dataset holds None where a record lacks a field
            if isinstance(example, dict) and example.get(self.text_field, "") is None:
                fields = ", ".join(k for k, v in example.items() if v is not None) or "none"
                raise UserError(f"{where}: no {self.text_field!r} (missing or null; fields with a "
                                f"value: {fields}); choose one with --text_field, or drop it")
            yield self._field(example, where)


GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def not_gzip(path, error):
    return UserError(f"{path} is not a whole gzip file ({error}): download or compress it again")


# ----------------------------------------------------------------------------- WikiText-2

# the author's mirror first: the S3 bucket answers 403 today
WIKITEXT_MIRRORS = ("https://wikitext.smerity.com/",
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
# ' = Title = ' opens an article; ' = = Section = = ' does not
_ARTICLE = re.compile(r"^ = [^=].* = $", re.M)


def wikitext_splits(config):
    """{split: text} of WikiText-2 (config.dataset): from config.source (a folder or the upstream
    zip), else downloaded into config.cache_dir; checked against the published sha256s unless
    config.check_sha256 is False."""
    spec = WIKITEXT[config.dataset]
    names = {split: f"wiki.{theirs}.{spec['ext']}"
             for split, theirs in zip(SPLITS, ("train", "valid", "test"))}
    if config.source:
        source = Path(config.source)
        if not source.exists():
            raise UserError(f"--source={source} does not exist")
    else:
        urls = [mirror + spec["zip"] for mirror in WIKITEXT_MIRRORS]
        hint = f"get {spec['zip']} or its {', '.join(names.values())} and pass --source=PATH"
        source = download(urls, Path(config.cache_dir) / spec["zip"], spec["sha256"],
                          offline_hint=hint)
    if source.is_dir():
        listing = {path.name: path for path in source.iterdir()}
        read = lambda name: listing[name].read_bytes()  # noqa: E731
    elif zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        listing = {Path(member).name: member for member in archive.namelist()}
        read = lambda name: archive.read(listing[name])  # noqa: E731
    else:
        raise UserError(f"--source={source} is neither a folder nor a zip file")
    missing = [name for name in names.values() if name not in listing]
    if missing:
        other = next(d for d in WIKITEXT if d != config.dataset)
        looks_other = any(n.endswith("." + WIKITEXT[other]["ext"]) for n in listing)
        hint = f"; it looks like --dataset={other}" if looks_other else ""
        raise UserError(f"{source} has no {', '.join(missing)} (files of {spec['zip']}; without "
                        f"--source they are downloaded){hint}")
    texts = {}
    for split, name in names.items():
        data = read(name)
        if config.check_sha256 and hashlib.sha256(data).hexdigest() != spec[name.split(".")[1]]:
            raise UserError(f"{name} in {source} differs from the published WikiText file "
                            f"(sha256); use a fresh copy, or --check_sha256=False to use it as it "
                            f"is")
        texts[split] = decode_utf8(data, f"{source}/{name}")
    return texts


def wikitext_articles(text):
    """Split a WikiText file into articles, each starting at the blank line above its title;
    nothing is dropped."""
    starts = [0]
    for m in _ARTICLE.finditer(text):
        line_above = text.rfind("\n", 0, max(m.start() - 1, 0)) + 1
        start = line_above if text[line_above:m.start()].isspace() else m.start()
        if start > starts[-1]:
            starts.append(start)
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def wikitext_stream(splits):
    """(split, True, article) for every article of every split: an article is a document."""
    return ((split, True, doc) for split, text in splits.items() for doc in wikitext_articles(text))


# ----------------------------------------------------------------------------- splits
# `config` below is prepare.py's settings (PrepareConfig).

def corpus_name(config):
    """A name for the data folder: 'a.txt,b.txt' -> 'a+b'; 'web/*.jsonl.gz' -> 'web';
    'org/name' -> 'name'."""
    if config.hf_dataset:
        return Path(config.hf_dataset).name + (f"-{config.hf_config}" if config.hf_config else "")
    if config.input:
        parts = [Path(p.split("*")[0].rstrip("/\\") or "corpus") for p in spec_parts(config.input)]
        return "+".join(Path(p.name[:-3] if gzipped(p) else p.name).stem for p in parts)
    return config.dataset


def document_stream(config, out_dir):
    """A function that streams the corpus that prepare.py's config names as (split, starts a
    document, piece), from the start at each call; and where it reads from: a Corpus, or
    WikiText's {split: text}. Folders and globs pass over out_dir."""
    if config.input or config.hf_dataset:
        if config.input:
            corpus = Corpus.from_files(config.input, config.text_field, skip=out_dir)
        else:
            corpus = Corpus.from_hub(config.hf_dataset, config.hf_config, config.hf_split,
                                     config.hf_data_files, config.text_field)
        return lambda: split_stream(corpus, config), corpus
    texts = wikitext_splits(config)
    return lambda: in_pieces(wikitext_stream(texts)), texts


def reading_progress(source, desc):
    """A progress line for a pass over the corpus (document_stream's source), and a function that
    says how far the reading is (None for WikiText, in memory: the bytes done tell)."""
    if isinstance(source, Corpus):
        return Progress(desc, source.total_bytes), lambda: source.done_bytes
    return Progress(desc, sum(len(t.encode()) for t in source.values())), None


def batched(stream, size=1 << 20):
    """The (split, starts, piece) stream in lists of about `size` characters."""
    batch, chars = [], 0
    for item in stream:
        batch.append(item)
        chars += len(item[2])
        if chars >= size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def first_chars(stream, split, limit):
    """The text of one split's pieces, up to `limit` characters in all: what the tokenizer learns
    from."""
    for piece_split, _, piece in stream:
        if piece_split == split:
            yield piece[:limit]
            limit -= len(piece)
            if limit <= 0:
                return


def counted(config):
    """Whether held-out documents are counted from the corpus's start (--val_documents,
    --test_documents) rather than spread by shares (--val_fraction, --test_fraction)."""
    return bool(config.val_documents or config.test_documents)


def split_of(i, config):
    """The split of a corpus's i-th document (from 0): its first val_documents, then
    test_documents, documents; or, by fraction, documents spread evenly: with val_fraction=0.1
    (and no test), documents 4, 14, 24, ... go to val."""
    if counted(config):
        if i < config.val_documents:
            return "val"
        return "test" if i < config.val_documents + config.test_documents else "train"
    held = config.val_fraction + config.test_fraction

    def takes(n, share):
        return math.floor((n + 1) * share + 0.5) > math.floor(n * share + 0.5)
    if not takes(i, held):
        return "train"
    return "test" if takes(math.floor(i * held + 0.5), config.test_fraction / held) else "val"


def held_out_splits(config):
    """The splits besides train: ['val'] or ['val', 'test']."""
    test = config.test_documents if counted(config) else config.test_fraction
    return ["val"] + (["test"] if test else [])


def check_splits(config, totals, duplicates=0):
    """Refuse a corpus that leaves train or a held-out split without a document (once `duplicates`
    documents were left out)."""
    empty = [split for split in ["train"] + held_out_splits(config) if split not in totals]
    if empty:
        documents = sum(t["documents"] for t in totals.values())
        left_out = f" once {duplicates:,} copies were left out (--dedup)" if duplicates else ""
        raise UserError(f"the corpus leaves the {' and '.join(empty)} split empty ({documents:,} "
                        f"documents in all{left_out}): give more text, or change --val_fraction/"
                        f"--test_fraction (or --val_documents/--test_documents)")


def split_stream(corpus, config):
    """A Corpus's (split, starts a document, piece): whole documents in the split that split_of
    gives them or, for text files too few to hold whole ones out, the tail of their text."""
    by_fraction = {split_of(i, config) for i in range(len(corpus.files))}
    tail = (corpus.is_text_files() and not counted(config)
            and not set(held_out_splits(config)) <= by_fraction)
    return in_pieces(by_tail(corpus, config) if tail else by_document(corpus, config))


def by_document(corpus, config):
    """The corpus's documents, each whole in the split that split_of gives it."""
    for i, chunks in enumerate(corpus.documents()):
        split = split_of(i, config)
        for n, chunk in enumerate(chunks):
            yield split, n == 0, chunk


def by_tail(corpus, config):
    """Text files' documents, the tail of their text held out: val starts at the first line break
    after (1 - test_fraction - val_fraction) of the bytes, test after (1 - test_fraction); a
    document cut there continues as a document of the next split. Without a line break after the
    point in its document, the next document starts the next split."""
    total = sum(corpus.text_sizes())
    cuts = [(round(total * (1 - config.test_fraction - config.val_fraction)), "val")]
    if config.test_fraction:
        cuts.append((round(total * (1 - config.test_fraction)), "test"))
    split, pos = "train", 0
    for chunks in corpus.documents():
        # the point passed without a line break: this document starts the split
        if cuts and pos >= cuts[0][0]:
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
    """The stream with each document's text re-cut into pieces of about `size` characters, where
    encoding is unaffected (tokenizer.cut_stream); a document with no text is dropped."""
    n = 0

    # a number for each document, so that groupby gives one document at a time
    def document(item):
        nonlocal n
        n += item[1]
        return n, item[0]
    for (_, split), items in itertools.groupby(stream, document):
        for i, piece in enumerate(cut_stream((text for _, _, text in items), size)):
            yield split, i == 0, piece
