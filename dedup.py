"""
Duplicate documents out of a corpus, in one pass and in a fixed amount of memory: the first
occurrence of each document is kept, the later ones are removed.

    dedup = Deduplicator("near")
    [dedup.keep(doc) for doc in ["the cat sat on the mat today", "the  cat sat on the mat today\\n",
                                 "a dog"]]
    -> [True, False, True]
    dedup.seen, dedup.removed_exact, dedup.removed_near -> (3, 1, 0)

Two modes:
- exact: a document with the words of an earlier one (split on whitespace: spaces, tabs and line
  breaks do not count), in the same order, is removed.
- near: also a document whose word 5-grams are, by their MinHash, at least `threshold` (0.8)
  Jaccard-similar to those of an earlier kept one: the same text with a few words changed, added or
  dropped (1% of the words changed makes a Jaccard similarity of about 0.9, as a changed word
  changes the five 5-grams that hold it). Words are lower-cased (ASCII letters) first. MinHash: the
  5-grams are hashed into 128 bins, each keeping its smallest hash (one permutation hashing). LSH:
  the 128 minima are cut into bands of rows (10 bands of 12 rows for 0.8), and a document is a
  near copy when one of its bands equals that band of an earlier document, which happens with
  probability 1 - (1 - J^rows)^bands at Jaccard similarity J: 0.96 at J = 0.9, 0.51 at 0.8, 0.13
  at 0.7, 0.002 at 0.5.

Memory: whatever the corpus's size, one Bloom filter (a bit array of memory_mb MiB, 64 by
default) holds every kept document's keys: its exact hash and, for near, one hash per band; a
document is looked up by its keys, and nothing else is kept. A Bloom filter may answer "seen" for a
key it never got (never the other way round): a distinct document is then removed. The chance grows
with the documents kept per MB; with 64 MB and 6 bit positions per key, the share of distinct
documents lost (expected_false_positive_rate) is:

    documents kept    1M        2M        5M        10M
    exact             1.9e-12   1.2e-10   2.6e-8    1.4e-6
    near              2.6e-5    1.2e-3    0.098     0.77

so near wants memory_mb=128 for 5M documents (0.4%), 256 for 10M (0.4%); summary() reports the
rate that follows from the filter's fill. A document's own work is bounded too: it is hashed a few
thousand words at a time, and it may come in pieces (keep(iterable of str)), as a long file does.
keep_many(list of str) decides for a batch of whole documents, hashed together: the same answers,
nearly twice as fast for paragraph-sized documents.

This file imports only the standard library and numpy: it runs copied alone.
"""

import hashlib
import itertools
import math
import zlib

import numpy as np

MODES = ("exact", "near")
# a MinHash bin that no n-gram reached
_EMPTY = np.uint64(2 ** 64 - 1)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def lsh_bands(threshold, num_perm):
    """(bands, rows), bands * rows <= num_perm, whose collision probability 1 - (1 - J^rows)^bands
    is 1/2 at a Jaccard similarity J within 0.01 of threshold, using the most of the num_perm values
    (the steepest curve); failing that, the one whose J is closest.

        lsh_bands(0.8, 128) -> (10, 12)
    """
    best = None
    for rows in range(1, num_perm + 1):
        for bands in range(1, num_perm // rows + 1):
            # the J where the probability is 1/2
            off = abs((1 - 0.5 ** (1 / bands)) ** (1 / rows) - threshold)
            key = (off > 0.01, -bands * rows if off <= 0.01 else 0, off)
            if best is None or key < best[0]:
                best = (key, (bands, rows))
    return best[1]


def collision_probability(jaccard, bands, rows):
    """The probability that two documents with this Jaccard similarity share a band:
    collision_probability(0.9, 10, 12) -> 0.964..."""
    return 1 - (1 - jaccard ** rows) ** bands


class BloomFilter:
    """A set of 128-bit keys (h1, h2) in a fixed bit array: `contains` answers, for each key,
    whether it was added: always right for added keys, wrong for others with probability
    fill ** hashes.

        bloom = BloomFilter(bits=1 << 20)
        bloom.add([(1, 2)]); bloom.contains([(1, 2), (3, 4)]) -> [True, False]
    """

    def __init__(self, bits, hashes=6):
        if bits < 64 or hashes < 1:
            raise ValueError(f"a Bloom filter needs 64 bits or more and a hash or more (got {bits} "
                             f"bits, {hashes} hashes)")
        self.bits, self.hashes = bits // 8 * 8, hashes
        # a bytearray: a document sets a few dozen bits, which plain Python indexes faster than
        # numpy's calls start
        self.array = bytearray(self.bits // 8)

    def positions(self, keys):
        """Each key's bit positions h1 + i * h2 (mod bits), i = 0 .. hashes - 1."""
        bits, steps = self.bits, range(self.hashes)
        keys = [(int(h1), int(h2) | 1) for h1, h2 in keys]
        return [[(h1 + i * h2) % bits for i in steps] for h1, h2 in keys]

    def contains(self, keys, positions=None):
        array = self.array
        return [all(array[p >> 3] >> (p & 7) & 1 for p in key_positions)
                for key_positions in positions or self.positions(keys)]

    def add(self, keys, positions=None):
        array = self.array
        for key_positions in positions or self.positions(keys):
            for p in key_positions:
                array[p >> 3] |= 1 << (p & 7)

    def fill(self):
        """The share of bits set (counted 4 MB at a time)."""
        array = np.frombuffer(self.array, np.uint8)
        ones = sum(int(_POPCOUNT[array[i:i + (1 << 22)]].sum(dtype=np.int64))
                   for i in range(0, len(array), 1 << 22))
        return ones / self.bits

    def false_positive_rate(self):
        """The probability that a key never added is found: fill ** hashes."""
        return self.fill() ** self.hashes


def _key(digest):
    """A 16-byte digest as a Bloom key (h1, h2)."""
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h):
    """A uint64 array with each value's bits spread over all its bits (splitmix64's finaliser)."""
    h = (h ^ (h >> _S30)) * _M1
    h = (h ^ (h >> _S27)) * _M2
    return h ^ (h >> _S31)


class Deduplicator:
    """Decides, document after document, whether each is kept (True) or is a duplicate of an earlier
    kept one (False).

        dedup = Deduplicator("exact")
        dedup.keep("a b  c"), dedup.keep("a b c\\n"), dedup.keep("a b d") -> (True, False, True)
        dedup.summary()["removed_exact"] -> 1
    """

    def __init__(self, mode="exact", threshold=0.8, ngram=5, num_perm=128, memory_mb=64, hashes=6,
                 seed=0, batch_words=4096):
        if mode not in MODES:
            raise ValueError(f"dedup mode {mode!r}: choose exact or near")
        if not 0 < threshold <= 1:
            raise ValueError(f"dedup threshold {threshold}: give a Jaccard similarity above 0 and "
                             f"at most 1")
        if min(ngram, num_perm, memory_mb, batch_words) <= 0:
            raise ValueError(f"dedup settings: ngram ({ngram}), num_perm ({num_perm}), memory_mb "
                             f"({memory_mb}) and batch_words ({batch_words}) must be positive")
        self.mode, self.threshold, self.ngram, self.num_perm = mode, threshold, ngram, num_perm
        self.memory_mb, self.batch_words = memory_mb, batch_words
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.bloom = BloomFilter(int(memory_mb * 8 * 2 ** 20), hashes)
        rng = np.random.default_rng(seed)

        def odd(n):
            return rng.integers(0, 2 ** 63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        # an n-gram's hash: its words' hashes times these, summed (mod 2^64), mixed with a salt
        self.weights, self.salt = odd(ngram), np.uint64(rng.integers(0, 2 ** 63))
        # where an empty bin takes its value from: the first non-empty bin in its row
        self.borrow = rng.integers(0, num_perm, (num_perm, 32))
        # a band's hash: its rows times these, summed (mod 2^64), mixed with the band's number
        self.row_weights = odd(self.rows)
        numbers = np.arange(1, self.bands + 1, dtype=np.uint64)
        self.band_numbers = numbers * np.uint64(0x9E3779B97F4A7C15)
        self.seen = self.removed_exact = self.removed_near = 0

    # ----------------------------------------------------------------------- a document's keys

    def _words(self, pieces):
        """The document's words (bytes), a batch at a time, the same however it is cut in pieces."""
        carry = b""
        for piece in pieces:
            data = carry + piece.encode("utf-8")
            words = data.split()
            # a piece that does not end in whitespace may end inside a word, which goes on in the
            # next piece
            carry = words.pop() if words and not data[-1:].isspace() else b""
            for i in range(0, len(words), self.batch_words):
                yield words[i:i + self.batch_words]
        if carry:
            yield [carry]

    def _keys(self, pieces):
        """The document's exact key (h1, h2), and for near its MinHash signature (num_perm
        minima)."""
        exact = hashlib.blake2b(digest_size=16, person=b"exact")
        signature = np.full(self.num_perm, _EMPTY, np.uint64) if self.mode == "near" else None
        # the last ngram - 1 word hashes: their n-grams end in the next batch
        tail = np.zeros(0, np.uint64)
        grams = 0
        for words in self._words(pieces):
            exact.update(b" ".join(words) + b" ")
            if signature is None:
                continue
            lowered = b" ".join(words).lower().split()
            hashes = np.fromiter(map(zlib.crc32, lowered), np.uint64, len(lowered))
            hashes = np.concatenate([tail, _mix(hashes)])
            n = len(hashes) - self.ngram + 1
            if n > 0:
                self._update(signature, hashes, n)
                grams += n
            tail = hashes[max(0, len(hashes) - self.ngram + 1):] if self.ngram > 1 else tail
        if signature is not None:
            if grams == 0 and len(tail):
                # fewer words than an n-gram: the words are the one n-gram
                padding = np.zeros(self.ngram - len(tail), np.uint64)
                self._update(signature, np.concatenate([tail, padding]), 1)
            self._densify(signature)
        return _key(exact.digest()), signature

    def _update(self, signature, word_hashes, n):
        """Fold the n n-grams of word_hashes into the signature. One permutation hashing (Li, Owen
        and Zhang 2012): an n-gram's hash picks a bin (the hash mod num_perm) and a value (the
        rest); a bin keeps its smallest value. Two documents' bins agree with probability J, as
        with num_perm hash functions, at 1/num_perm of the work."""
        grams = np.zeros(n, np.uint64)
        for j in range(self.ngram):
            grams += word_hashes[j:j + n] * self.weights[j]
        grams = _mix(grams ^ self.salt)
        size = np.uint64(self.num_perm)
        np.minimum.at(signature, (grams % size).astype(np.intp), grams // size)

    def _densify(self, signatures):
        """Give each empty bin (a document with few n-grams leaves some) the value of the first
        non-empty bin in its row of self.borrow, the same rows for every document, so that bins
        still agree with probability J (Shrivastava 2017, optimal densification); past its 32
        tries, the next non-empty bin. signatures: one, or one per row."""
        signatures = signatures.reshape(-1, self.num_perm)
        empty = signatures == _EMPTY
        # (a document with no words stays empty)
        docs, bins = np.nonzero(empty & ~empty.all(axis=1, keepdims=True))
        if not len(docs):
            return
        rows = self.borrow[bins]
        found = ~empty[docs[:, None], rows]
        source = rows[np.arange(len(rows)), found.argmax(axis=1)]
        # the next non-empty bin, round the end: the smallest non-empty index from each one on
        size = self.num_perm
        index = np.where(empty, 2 * size, np.arange(size))
        following = np.minimum.accumulate(index[:, ::-1], axis=1)[:, ::-1]
        following = np.where(following == 2 * size, following[:, :1], following)
        source = np.where(found.any(axis=1), source, following[docs, bins])
        signatures[docs, bins] = signatures[docs, source]

    def _band_keys(self, signatures):
        """For each signature (a row of signatures, or a single one), its bands' Bloom keys
        [(h1, h2)]: each band's rows times self.row_weights, summed (mod 2^64), mixed with the
        band's number."""
        single = signatures.ndim == 1
        rows = signatures.reshape(-1, self.num_perm)[:, :self.bands * self.rows]
        rows = rows.reshape(len(rows), self.bands, self.rows)
        h1 = _mix((rows * self.row_weights).sum(axis=2) ^ self.band_numbers)
        h2 = _mix(h1 ^ np.uint64(0xD6E8FEB86659FD93))
        keys = [list(zip(a, b)) for a, b in zip(h1.tolist(), h2.tolist())]
        return keys[0] if single else keys

    def _keys_many(self, documents):
        """[(exact key, band keys or None)] of whole documents, as _keys and _band_keys give them,
        hashed all together: a few numpy calls for the lot instead of a few dozen per document."""
        words = [doc.encode("utf-8").split() for doc in documents]
        exact = [_key(hashlib.blake2b(b" ".join(w) + b" " if w else b"", digest_size=16,
                                      person=b"exact").digest()) for w in words]
        if self.mode != "near":
            return [(key, None) for key in exact]
        lowered = [b" ".join(w).lower().split() for w in words]
        lengths = np.array([len(w) for w in lowered])
        all_words = itertools.chain.from_iterable(lowered)
        hashes = _mix(np.fromiter(map(zlib.crc32, all_words), np.uint64, int(lengths.sum())))
        # the n-grams of all documents at once, less those that run across two documents
        n = max(0, len(hashes) - self.ngram + 1)
        grams = np.zeros(n, np.uint64)
        for j in range(self.ngram):
            grams += hashes[j:j + n] * self.weights[j]
        owner = np.repeat(np.arange(len(documents)), lengths)
        whole = owner[:n] == owner[self.ngram - 1:]
        grams, owner = grams[whole], owner[:n][whole]
        # a document with fewer words than an n-gram: its words are the one n-gram
        short = np.flatnonzero((lengths > 0) & (lengths < self.ngram))
        if len(short):
            starts = np.concatenate([[0], np.cumsum(lengths)])
            padded = np.zeros((len(short), self.ngram), np.uint64)
            for row, d in enumerate(short):
                padded[row, :lengths[d]] = hashes[starts[d]:starts[d + 1]]
            grams = np.concatenate([grams, (padded * self.weights).sum(axis=1)])
            owner = np.concatenate([owner, short])
        grams = _mix(grams ^ self.salt)
        size = np.uint64(self.num_perm)
        signatures = np.full((len(documents), self.num_perm), _EMPTY, np.uint64)
        bins = owner * self.num_perm + (grams % size).astype(np.intp)
        np.minimum.at(signatures.reshape(-1), bins, grams // size)
        self._densify(signatures)
        return list(zip(exact, self._band_keys(signatures)))

    # ----------------------------------------------------------------------- deciding

    def keep(self, document):
        """Whether the document (a str, or an iterable of str pieces) is kept: False for a duplicate
        of one kept earlier. A kept document is remembered."""
        pieces = [document] if isinstance(document, str) else document
        exact, signature = self._keys(pieces)
        return self._decide(exact, None if signature is None else self._band_keys(signature))

    def keep_many(self, documents):
        """[keep(document) for document in documents] for a list of str, faster: the documents are
        hashed together (WikiText-2's paragraphs, ~1 MB at a time: 1.8 times as fast).

            Deduplicator("near").keep_many(["a b c", "a  b c", "d e"]) -> [True, False, True]
        """
        if not documents:
            return []
        return [self._decide(exact, bands) for exact, bands in self._keys_many(documents)]

    def _decide(self, exact, bands):
        """Whether a document with these keys is new (then its keys are remembered)."""
        self.seen += 1
        positions = self.bloom.positions([exact] + (bands or []))
        if self.bloom.contains(None, positions[:1])[0]:
            self.removed_exact += 1
            return False
        if bands is not None and any(self.bloom.contains(None, positions[1:])):
            self.removed_near += 1
            return False
        self.bloom.add(None, positions)
        return True

    def summary(self):
        """The settings and counts, for a dataset's meta.json:
        {'mode': 'near', 'threshold': 0.8, ..., 'documents': 3, 'kept': 2, 'removed_exact': 1,
         'removed_near': 0, 'bloom_fill': 1.6e-06, 'false_positive_rate': 0.0}"""
        key_rate = self.bloom.false_positive_rate()
        keys = 1 + (self.bands if self.mode == "near" else 0)
        return {
            "mode": self.mode,
            **({"threshold": self.threshold, "ngram": self.ngram, "num_perm": self.num_perm,
                "bands": self.bands, "rows": self.rows} if self.mode == "near" else {}),
            "memory_mb": self.memory_mb,
            "documents": self.seen,
            "kept": self.seen - self.removed_exact - self.removed_near,
            "removed_exact": self.removed_exact,
            "removed_near": self.removed_near,
            "bloom_fill": round(self.bloom.fill(), 6),
            # the probability that a new distinct document is taken for a duplicate, at this fill
            "false_positive_rate": float(f"{1 - (1 - key_rate) ** keys:.3g}"),
        }


def expected_false_positive_rate(documents, mode="near", threshold=0.8, num_perm=128, memory_mb=64,
                                 hashes=6):
    """The share of distinct documents taken for duplicates once `documents` are kept (the Bloom
    filter's standard estimate), as in the table above:
    expected_false_positive_rate(2_000_000) -> 0.00118..."""
    keys = 1 + (lsh_bands(threshold, num_perm)[0] if mode == "near" else 0)
    bits = memory_mb * 8 * 2 ** 20
    key_rate = (1 - math.exp(-hashes * documents * keys / bits)) ** hashes
    return 1 - (1 - key_rate) ** keys
