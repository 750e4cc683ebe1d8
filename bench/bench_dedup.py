"""
dedup.py measured on a corpus with planted copies: how many exact and near copies it removes, how
many distinct documents it loses, and its speed beside no dedup (reading the documents and
normalising their whitespace) in the same run.

    python bench/bench_dedup.py [--wikitext=DIR] [--exact_share=0.1] [--near_share=0.1]

The corpus: the paragraphs of WikiText-2 (train, valid and test, tokenized) of --min_words (100)
words or more, each a document, once each (a paragraph found twice is kept once: these are the
distinct documents); then, for --exact_share of them, a copy with its whitespace changed, and for
--near_share, a copy with --changed (1%) of its words replaced (at least one), each put at a
random place after its original. (Under 100 words, one word is more than 1% of a paragraph: its
copy is less similar.) Speed: best of --repeats passes over the whole corpus, one process, the
documents given ~1 MB at a time to keep_many (and, in the last row, one at a time to keep). Prints
a markdown table.
"""

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cli  # noqa: E402
from dedup import Deduplicator  # noqa: E402

DATA = REPO.parent / "shared" / "data"


@dataclass
class BenchDedupConfig:
    wikitext: str = str(DATA / "wikitext-2")  # wiki.{train,valid,test}.tokens
    min_words: int = cli.setting(100, low=1)  # a paragraph this long or longer is a document
    exact_share: float = cli.setting(0.1, low=0, high=1)  # of the documents, copied exactly
    near_share: float = cli.setting(0.1, low=0, high=1)   # of the documents, copied with changes
    changed: float = cli.setting(0.01, above=0, below=1)  # of a near copy's words, replaced
    threshold: float = cli.setting(0.8, above=0, high=1)  # near: the Jaccard similarity
    memory_mb: float = cli.setting(64, above=0)  # the Bloom filter's size
    repeats: int = cli.setting(3, low=1)      # speed: best of this many passes
    seed: int = 0                             # the planted corpus and its changes


def distinct_paragraphs(folder, min_words):
    seen, documents = set(), []
    for split in ("train", "valid", "test"):
        path = Path(folder) / f"wiki.{split}.tokens"
        if not path.is_file():
            raise cli.UserError(f"{path} not found: give --wikitext=DIR with WikiText-2's files")
        for line in path.read_text(encoding="utf-8").split("\n"):
            words = line.split()
            if len(words) >= min_words and not re.match(r" = .* = $", line):
                key = " ".join(words)
                if key not in seen:
                    seen.add(key)
                    documents.append(line + "\n")
    return documents


def planted_corpus(documents, config):
    """[(document, "distinct" | "exact" | "near")], copies after their originals."""
    rng = np.random.default_rng(config.seed)
    n = len(documents)
    corpus = [(doc, "distinct") for doc in documents]
    copies = []
    for i in rng.choice(n, round(config.exact_share * n), replace=False):
        spaces = iter(rng.choice([" ", "  ", "\n", "\t"], documents[i].count(" ")))
        copies.append((re.sub(" ", lambda m: next(spaces), documents[i]), "exact"))
    for i in rng.choice(n, round(config.near_share * n), replace=False):
        words = documents[i].split()
        for j in rng.choice(len(words), max(1, round(config.changed * len(words))), replace=False):
            words[j] = f"changed{rng.integers(10 ** 9)}"
        copies.append((" ".join(words) + "\n", "near"))
    # each copy at a random place after its original: originals stay first
    places = rng.integers(n, n + np.arange(1, len(copies) + 1))
    for copy, place in zip(copies, places):
        corpus.insert(int(place), copy)
    return corpus


def batches(corpus, size=1 << 20):
    """The corpus in lists of documents of about `size` characters, as prepare.py encodes them."""
    batch, chars = [], 0
    for item in corpus:
        batch.append(item)
        chars += len(item[0])
        if chars >= size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def run(corpus, mode, config):
    """(seconds of the best pass, {what: kept}, the last pass's Deduplicator). mode: off (reading
    each document and normalising its whitespace, as the exact key does), exact, near (documents
    given to keep_many ~1 MB at a time), or "near, keep" (one at a time)."""
    best, kept, dedup = float("inf"), None, None
    for _ in range(config.repeats):
        if mode != "off":
            dedup = Deduplicator(mode.split(",")[0], threshold=config.threshold,
                                 memory_mb=config.memory_mb)
        counts = {"distinct": 0, "exact": 0, "near": 0}
        t0 = time.perf_counter()
        for batch in batches(corpus):
            if mode == "off":
                kept_now = [" ".join(document.split()) != "" for document, _ in batch]
            elif mode.endswith("keep"):
                kept_now = [dedup.keep(document) for document, _ in batch]
            else:
                kept_now = dedup.keep_many([document for document, _ in batch])
            for (_, what), keep in zip(batch, kept_now):
                counts[what] += keep
        best, kept = min(best, time.perf_counter() - t0), counts
    return best, kept, dedup


def main():
    config = cli.parse_config(BenchDedupConfig)
    documents = distinct_paragraphs(config.wikitext, config.min_words)
    corpus = planted_corpus(documents, config)
    total = {what: sum(w == what for _, w in corpus) for what in ("distinct", "exact", "near")}
    mb = sum(len(doc.encode("utf-8")) for doc, _ in corpus) / 1e6
    print(f"{len(corpus):,} documents, {mb:.1f} MB: {total['distinct']:,} distinct WikiText-2 "
          f"paragraphs, {total['exact']:,} exact and {total['near']:,} near copies "
          f"({config.changed:.0%} of the words changed)")
    modes = ("off", "exact", "near", "near, keep")
    results = {mode: run(corpus, mode, config) for mode in modes}
    base = results["off"][0]
    print("\n| --dedup | MB/s | time / off | exact copies removed | near copies removed | "
          "distinct documents lost | Bloom filter fill |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, (seconds, kept, dedup) in results.items():
        removed = {what: total[what] - kept[what] for what in total}
        share = {what: removed[what] / max(1, total[what]) for what in total}
        fill = f"{dedup.summary()['bloom_fill']:.2e}" if dedup else "-"
        print(f"| {mode} | {mb / seconds:.1f} | {seconds / base:.2f} | {removed['exact']:,} "
              f"({share['exact']:.1%}) | {removed['near']:,} ({share['near']:.1%}) | "
              f"{removed['distinct']:,} ({share['distinct']:.2%}) | {fill} |")


if __name__ == "__main__":
    cli.run_main(main)
