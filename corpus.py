"""
The documents of a corpus, read one piece at a time, so that memory does not grow with its size: text files, JSON
lines and Parquet files (any of them gzipped), folders and globs of them, or a Hugging Face dataset, streamed.

    corpus = Corpus.from_files("books/,web/*.jsonl.gz", text_field="text")
    for chunks in corpus.documents():      # one document: an iterator of str chunks
        for chunk in chunks: ...            # a text file comes in chunks of ~1 MB; a record in one
    corpus.done_bytes, corpus.total_bytes   # how far the reading is, in bytes of the input files

A text file is one document; a JSON line or a Parquet row is one document (its `text_field`); so is a dataset's
example. Errors in the input (a missing file, bytes that are not UTF-8, a line that is not JSON, a record without
the field) are one UserError that names the file and the line.
"""

import codecs
import glob
import gzip
import itertools
import json
import zlib
from pathlib import Path

from cli import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")  # what a folder contributes besides the two above
CHUNK_BYTES = 1 << 20


def kind_of(path):
    """'jsonl', 'parquet' or 'text', from the name (a .gz after it is looked through): 'a.jsonl.gz' -> 'jsonl'."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if name.endswith(PARQUET_SUFFIXES) else "text"


def find_files(spec):
    """The files that a comma-separated list of files, folders (all corpus files below, recursively) and globs
    names, each part in sorted order: 'b.txt,notes/' -> [b.txt, notes/a.md, notes/sub/c.jsonl]."""
    known = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and f.name.lower().removesuffix(".gz").endswith(known))
            if not found:
                raise UserError(f"--input: the folder {path} holds no {', '.join(known)} files (or .gz of them)")
        elif glob.has_magic(part):
            found = sorted(Path(f) for f in glob.glob(part, recursive=True) if Path(f).is_file())
            if not found:
                raise UserError(f"--input: nothing matches {part}")
        elif path.is_file():
            found = [path]
        else:
            raise UserError(f"--input: no file or folder {path}")
        files += found
    if not files:
        raise UserError("--input names no files: give files, folders or globs, comma-separated")
    return files


class Corpus:
    """Documents from files or from a Hugging Face dataset, read lazily; done_bytes/total_bytes tell how far."""

    def __init__(self, files=(), text_field="text", dataset=None, describe=""):
        self.files, self.text_field, self.dataset, self.describe = list(files), text_field, dataset, describe
        self.sizes = {f: f.stat().st_size for f in self.files}
        self._before = dict(zip(self.files, itertools.accumulate([0, *self.sizes.values()])))  # bytes before f
        self.total_bytes = sum(self.sizes.values()) if self.files else None
        self.done_bytes = 0

    @classmethod
    def from_files(cls, spec, text_field="text"):
        return cls(find_files(spec), text_field, describe=spec)

    @classmethod
    def from_hub(cls, name, config="", split="train", data_files="", text_field="text"):
        """A Hugging Face dataset, streamed: a hub name ('HuggingFaceFW/fineweb-edu'), a local dataset folder, or a
        builder for local files ('json', 'parquet', 'text' with data_files): nothing is downloaded ahead."""
        try:
            import datasets
        except ImportError:
            raise UserError("--hf_dataset needs the datasets package: pip install datasets") from None
        files = [f.strip() for f in data_files.split(",") if f.strip()] or None
        try:
            stream = datasets.load_dataset(name, config or None, split=split, data_files=files, streaming=True)
        except Exception as e:  # datasets raises many kinds: no such dataset, config, split, network
            raise UserError(f"cannot open the dataset {name} ({type(e).__name__}: {str(e).splitlines()[0]})") \
                from None
        return cls(text_field=text_field, dataset=stream, describe=name)

    def is_text_files(self):
        """True when every document is a whole text file (so the documents are few and their sizes known)."""
        return self.dataset is None and all(kind_of(f) == "text" for f in self.files)

    def text_sizes(self):
        """The bytes of text in each file (a .gz file is read through to count them)."""
        return [sum(map(len, self._binary_chunks(f))) if f.suffix == ".gz" else self.sizes[f] for f in self.files]

    def documents(self):
        """Each document as an iterator of str chunks; take each one fully before asking for the next."""
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
        """The bytes of a file (decompressed if .gz) in chunks; done_bytes follows the file read so far."""
        try:
            with open(path, "rb") as raw:
                stream = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
                while chunk := stream.read(CHUNK_BYTES):
                    self.done_bytes = self._before[path] + raw.tell()
                    yield chunk
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise UserError(f"{path} is not a whole gzip file ({e}): download or compress it again") from None
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None

    def _text_chunks(self, path):
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        for chunk in self._binary_chunks(path):
            try:
                yield decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (byte {offset + e.start:,}); convert it first") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text (it ends inside a character); convert it first") from None

    def _field(self, record, where):
        if not isinstance(record, dict):
            raise UserError(f"{where}: a record is a {type(record).__name__}, not an object with a "
                            f"{self.text_field!r} field")
        if self.text_field not in record:
            fields = ", ".join(map(str, list(record)[:10])) or "none"
            raise UserError(f"{where}: no {self.text_field!r} field (fields: {fields}); choose one with --text_field")
        text = record[self.text_field]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise UserError(f"{where}: the {self.text_field!r} field is a {type(text).__name__}, not text")
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
            raise UserError(f"{path}:{line_no}: not a JSON line ({e}); each line must hold one JSON object") \
                from None

    def _parquet_texts(self, path):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("Parquet input needs the pyarrow package: pip install pyarrow") from None
        try:
            source = gzip.open(path) if path.suffix == ".gz" else path
            table = pq.ParquetFile(source)
            names = table.schema_arrow.names
            if self.text_field not in names:
                raise UserError(f"{path}: no {self.text_field!r} column (columns: {', '.join(names[:10])}); choose one "
                                f"with --text_field")
            before, groups = self._before[path], max(table.num_row_groups, 1)
            for g in range(table.num_row_groups):
                for batch in table.iter_batches(batch_size=1024, row_groups=[g], columns=[self.text_field]):
                    for text in batch.column(0).to_pylist():
                        if text is not None and not isinstance(text, str):
                            raise UserError(f"{path}: the {self.text_field!r} column holds "
                                            f"{type(text).__name__}, not text")
                        yield text or ""
                self.done_bytes = before + self.sizes[path] * (g + 1) // groups
        except OSError as e:
            raise UserError(f"cannot read {path} as Parquet ({e})") from None
        except Exception as e:
            if type(e).__module__.startswith("pyarrow"):  # ArrowInvalid and kin: not a Parquet file
                raise UserError(f"cannot read {path} as Parquet ({str(e).splitlines()[0]})") from None
            raise

    def _dataset_documents(self):
        for i, example in enumerate(self.dataset):
            text = self._field(example, f"{self.describe}, example {i}")
            self.done_bytes += len(text)  # (characters: the dataset's size in bytes is not known ahead)
            yield iter((text,))
