"""
What is left out of a corpus before it is tokenized: its duplicate documents (dedup.py) and its
personal data (scrub.py), for prepare.py's --dedup and --scrub_pii. prepare.py reads every piece of
the corpus through a CleanStream, which with neither flag set gives the stream as it is.

    clean = clean_stream(config, stream, source, pool, ahead)
    for split, starts, piece in clean(): ...      # every call keeps the same documents
    clean.meta() -> {'scrub_pii': {'EMAIL': 3, ...}, 'dedup': {...}}   # what meta.json records

prepare.py reads the corpus more than once (its tokenizer's text, then all of it to encode), and
every pass must keep the same documents: the duplicates are found first, in a pass of their own,
which leaves one bit per document. Personal data is replaced as each pass reads, on the worker
processes, in pieces cut where no find of scrub.py runs across.
"""

import bisect
import itertools
import re
import sys
import time
from collections import Counter

from cli import UserError
from corpus import batched, reading_progress
from data import SPLITS
from tokenizer import STREAM_CUT


def clean_stream(config, stream, source, pool, ahead):
    """The stream as the tokenizer and the encoding read it (a CleanStream): the duplicates
    found first, in a pass of their own (--dedup), the personal data replaced (--scrub_pii)."""
    deduplicator = scrub = None
    if config.dedup != "off":
        from dedup import Deduplicator
        deduplicator = Deduplicator(config.dedup, config.dedup_threshold,
                                    memory_mb=config.dedup_memory_mb)
    if config.scrub_pii:
        import scrub
    progress = reading_progress(source, "finding duplicates") if deduplicator else ()
    return CleanStream(stream, deduplicator, scrub, pool, ahead, *progress)


class CleanStream:
    """prepare.py's stream of a corpus (document_stream's) with its duplicate documents left out and
    its personal data replaced, the same at every call:

        clean = CleanStream(stream, deduplicator=Deduplicator("exact"), scrub=scrub)
        for split, starts, piece in clean(): ...
        clean.removed -> Counter({'train': 12, 'val': 1});  clean.found -> {'train': {'EMAIL': 3}}
        clean.meta() -> {'scrub_pii': {...}, 'dedup': {...}}: what meta.json records of them

    prepare.py reads the corpus more than once (its tokenizer's text, then all of it to encode), and
    every pass must keep the same documents: the duplicates are found here first, in a pass of their
    own, which leaves one bit per document. The first of each document is kept, whatever its split:
    the splits were given before (a kept document stays in its split), and a later copy is removed
    from train, val and test alike, so that no text is in two splits. Duplicates are looked for in
    the text as it is, before scrubbing. Personal data is replaced as each pass reads (`scrub` is
    scrub.py), on the pool's workers, in the pieces of scrub_pieces; `found` holds what the last
    call's pass found in each split.
    """

    def __init__(self, stream, deduplicator=None, scrub=None, pool=None, ahead=8, progress=None,
                 position=None):
        self.stream, self.scrub, self.pool, self.ahead = stream, scrub, pool, ahead
        self.keep, self.removed, self.found, self.dedup = None, Counter(), {}, None
        start = time.time()
        if deduplicator is not None:
            kept = Counter()
            self.keep = find_duplicates(stream(), deduplicator, kept, self.removed, progress,
                                        position)
            self.dedup = deduplicator.summary()
            self.check(kept["train"])
        # (the duplicates pass)
        self.seconds = time.time() - start

    def check(self, train_kept):
        """Refuse a train split that the duplicates pass emptied; warn of a Bloom filter so full
        that distinct documents are taken for copies more often than 1 in 100."""
        if not train_kept:
            raise UserError(f"--dedup leaves the train split empty: its {self.removed['train']:,} "
                            f"documents all repeat earlier ones, held out; hold out others "
                            f"(--val_documents, --test_documents), or leave --dedup off")
        if self.dedup["false_positive_rate"] > 0.01:
            print(f"warning: the duplicates' Bloom filter is {self.dedup['bloom_fill']:.0%} full: "
                  f"about {self.dedup['false_positive_rate']:.1%} of the distinct documents were "
                  f"taken for copies; give it more memory (--dedup_memory_mb)", file=sys.stderr)

    def __call__(self, split=None):
        """The stream; only `split`'s pieces where given (the others are not scrubbed)."""
        stream = self.stream()
        if self.keep is not None:
            stream = kept_only(stream, self.keep)
        if split is not None:
            stream = (item for item in stream if item[0] == split)
        if self.scrub is not None:
            self.found = {}
            stream = scrubbed(stream, self.scrub, self.pool, self.ahead, self.found)
        return stream

    def meta(self):
        """What meta.json records: scrub_pii, the finds of each kind in the last pass, and what
        finds them (scrub.backends()); dedup, dedup.py's summary and the documents removed from
        each split."""
        meta = {}
        if self.scrub is not None:
            found = sum(self.found.values(), Counter())
            meta["scrub_pii"] = {kind: found[kind] for kind in self.scrub.KINDS}
            meta["scrub_pii_backends"] = self.scrub.backends()
        if self.dedup is not None:
            removed = {split: self.removed[split] for split in SPLITS if split in self.removed}
            meta["dedup"] = self.dedup | {"removed_by_split": removed}
        return meta

    def summary(self):
        """Lines for prepare.py's summary: what was replaced, what was left out."""
        lines = []
        if self.scrub is not None:
            found = sum(self.found.values(), Counter())
            lines.append("personal data replaced: " + (", ".join(
                f"{found[kind]:,} {kind}" for kind in self.scrub.KINDS if found[kind]) or "none"))
        if self.dedup is not None:
            d = self.dedup
            splits = ", ".join(f"{self.removed[s]:,} {s}" for s in SPLITS if s in self.removed)
            lines.append(f"duplicates ({d['mode']}, found in {self.seconds:.1f} s): "
                         f"{d['documents'] - d['kept']:,} of {d['documents']:,} documents left out "
                         f"({splits}), {d['removed_exact']:,} of them exact copies")
        return lines


def documents_of(stream):
    """(split, an iterator of its pieces) for each document of a (split, starts, piece) stream; take
    each document's pieces before asking for the next."""
    n = 0

    def document(item):
        nonlocal n
        n += item[1]
        return n
    for _, items in itertools.groupby(stream, document):
        split, _, first = next(items)
        yield split, itertools.chain([first], (piece for _, _, piece in items))


def find_duplicates(stream, deduplicator, kept, removed, progress=None, position=None):
    """Which documents of the stream deduplicator keeps: a bytearray with bit n (of byte n // 8) set
    when the n-th document is kept; kept[split] and removed[split] count them. Documents of one
    piece go to deduplicator.keep_many ~1 MB at a time (faster), a longer one to keep, piece by
    piece (bounded memory): the same answers. progress (a files.Progress) shows position(), else
    the characters read."""
    bits, count, waiting, chars = bytearray(), 0, [], 0

    def decide(splits, answers):
        nonlocal count
        for split, keep in zip(splits, answers):
            if count % 8 == 0:
                bits.append(0)
            bits[count >> 3] |= keep << (count & 7)
            kept[split] += keep
            removed[split] += not keep
            count += 1

    def decide_waiting():
        nonlocal chars
        if waiting:
            decide([s for s, _ in waiting], deduplicator.keep_many([t for _, t in waiting]))
        waiting.clear()
        chars = 0
    for split, pieces in documents_of(stream):
        first, second = next(pieces), next(pieces, None)
        if second is None:
            waiting.append((split, first))
            chars += len(first)
            if chars >= 1 << 20:
                decide_waiting()
        else:
            decide_waiting()
            decide([split], [deduplicator.keep(itertools.chain([first, second], pieces))])
        if progress:
            progress.update(position() if position else progress.done + len(first))
    decide_waiting()
    if progress:
        progress.close(position() if position else progress.total)
    return bits


def kept_only(stream, keep):
    """The stream without the documents whose bit in keep (find_duplicates's) is not set."""
    n = -1
    for item in stream:
        n += item[1]
        if keep[n >> 3] >> (n & 7) & 1:
            yield item


# A find of scrub.py never runs across a line break (a private-key block aside), and every find
# or the context it needs (40 characters before it) holds one of these characters; so a document
# may be cut before it is scrubbed after a line break, or amid text without them
RISKY = re.compile(r"[\d@\[\]():=]")
# the blocks scrub.py replaces whole, lines and all (PEM, PuTTY), and how far they reach
BLOCKS = (("-----BEGIN", "-----END"), ("Private-Lines:", "Private-MAC:"))
BLOCK_CHARS = 25_000


def scrub_cut(text, look=1 << 16, margin=64):
    """Where text may be cut before it is scrubbed (0: nowhere): the last place, within `look`
    characters of its end, where encoding is unaffected (tokenizer.STREAM_CUT) and no find of
    scrub.py can run across: after a line break, or amid `margin` characters on each side without
    a RISKY character; never inside a block.

        scrub_cut("call 020\\n7946 0958 now") -> 9;  scrub_cut("a 1 b") -> 0
    """
    places = [m.start() for m in STREAM_CUT.finditer(text, max(1, len(text) - look))]
    for place in reversed(places):
        if text[place - 1] != "\n" and RISKY.search(text, max(0, place - margin), place + margin):
            continue
        if not any(in_block(text, place, *block) for block in BLOCKS):
            return place
    return 0


def in_block(text, place, begin, end):
    """Whether place is after a `begin` (at most BLOCK_CHARS before it) and before the line break
    after its `end`."""
    opened = text.rfind(begin, max(0, place - BLOCK_CHARS), place)
    closed = text.find(end, opened, place)
    return opened >= 0 and (closed < 0 or text.find("\n", closed, place) < 0)


def scrub_pieces(stream, most=16 << 20):
    """The stream with each document's pieces (cut at spaces, where a spaced phone number or IBAN
    can run across) joined and cut again where scrub_cut says, as they come: a document of one
    piece stays whole. Past `most` characters without such a place, a piece ends where it did."""
    held = None
    for split, starts, text in stream:
        if held is not None and starts:
            yield held
            held = None
        if held is None:
            held = (split, starts, text)
            continue
        text = held[2] + text
        cut = scrub_cut(text) or (len(text) if len(text) > most else 0)
        if cut:
            yield split, held[1], text[:cut]
        held = (split, held[1] and not cut, text[cut:]) if cut < len(text) else None
    if held is not None:
        yield held


# Between the pieces of a batch, scrubbed as one text: no word, no space and no line break, which
# every pattern of scrub.py stops at but a private-key block's ("-----BEGIN" to "-----END", any
# characters between), and longer than the context it looks at (40 characters)
SEPARATOR = "\x00" * 64


def scrub_batch(find, placeholders, items):
    """[(split, starts, text scrubbed, {kind: count})] of [(split, starts, text)], a worker's task:
    the finds of find (scrub.find) in the pieces joined by SEPARATOR, twice as fast as one by one
    for paragraphs (or, with a private key among them, in each alone), each replaced by
    placeholders[kind]: what scrub.scrub gives each piece."""
    texts = [text for _, _, text in items]
    offsets = list(itertools.accumulate((len(t) + len(SEPARATOR) for t in texts), initial=0))
    if any("PRIVATE KEY" in text for text in texts):
        spans = [find(text) for text in texts]
    else:
        spans = [[] for _ in items]
        for start, end, kind in find(SEPARATOR.join(texts)):
            i = bisect.bisect_right(offsets, start) - 1
            spans[i].append((start - offsets[i], end - offsets[i], kind))
    return [(split, starts, *replaced(text, found, placeholders))
            for (split, starts, text), found in zip(items, spans)]


def replaced(text, spans, placeholders):
    """(text with each (start, end, kind) of spans replaced by placeholders[kind], {kind: count}),
    as scrub.scrub gives them."""
    out, last = [], 0
    for start, end, kind in spans:
        out += [text[last:start], placeholders[kind]]
        last = end
    return "".join(out) + text[last:], Counter(kind for _, _, kind in spans)


def scrubbed(stream, scrub, pool, ahead, found):
    """The stream with its pieces scrubbed (scrub is scrub.py) ~1 MB at a time on the pool (here
    without one), in order; found[split] adds up the kinds found."""
    from workers import ordered_map

    tasks = ((scrub.find, scrub.PLACEHOLDER, batch) for batch in batched(scrub_pieces(stream)))
    for results in ordered_map(pool, scrub_batch, tasks, ahead):
        for split, starts, text, counts in results:
            found.setdefault(split, Counter()).update(counts)
            yield split, starts, text
