"""dedup.py: a corpus with planted exact and near copies (all exact and >= 90% of near copies
removed, <= 1% of distinct documents lost), the threshold, documents in pieces, the Bloom filter's
error rate, and memory that does not grow with the corpus or with a document."""

import re
import tracemalloc

import numpy as np
import pytest

from dedup import (BloomFilter, Deduplicator, collision_probability, expected_false_positive_rate,
                   lsh_bands)

VOCABULARY = [f"w{i}" for i in range(5000)]


def make_document(rng, words=None):
    n = words or int(rng.integers(100, 500))
    # Zipf-like word frequencies, as in text
    ranks = np.minimum(rng.zipf(1.3, n), len(VOCABULARY)) - 1
    return " ".join(VOCABULARY[r] for r in ranks)


def change_words(document, share, rng):
    """The document with `share` of its words (at least one) replaced by others."""
    words = document.split()
    for i in rng.choice(len(words), max(1, round(share * len(words))), replace=False):
        words[i] = f"new{rng.integers(10 ** 9)}"
    return " ".join(words)


def planted_corpus(distinct=400, exact=60, near=100, seed=0):
    """[(document, what it is)]: distinct documents, then copies of some (exact ones with other
    whitespace, near ones with 1% of their words changed), each placed after its original."""
    rng = np.random.default_rng(seed)
    corpus = [(make_document(rng), "distinct") for _ in range(distinct)]
    copies = [(re.sub(" ", lambda m: rng.choice([" ", "\n", "  ", "\t"]), doc), "exact")
              for doc, _ in (corpus[i] for i in rng.choice(distinct, exact, replace=False))]
    copies += [(change_words(corpus[i][0], 0.01, rng), "near")
               for i in rng.choice(distinct, near, replace=False)]
    for copy in copies:
        corpus.insert(int(rng.integers(distinct, len(corpus) + 1)), copy)
    return corpus


def run(corpus, **settings):
    dedup = Deduplicator(**settings)
    kept = {"distinct": 0, "exact": 0, "near": 0}
    for document, what in corpus:
        kept[what] += dedup.keep(document)
    return dedup, kept


def test_near_removes_the_planted_copies_and_keeps_the_distinct_documents():
    corpus = planted_corpus()
    dedup, kept = run(corpus, mode="near")
    assert kept["exact"] == 0 and dedup.removed_exact == 60
    assert kept["near"] <= 10, kept
    assert kept["distinct"] >= 400 * 0.99, kept
    summary = dedup.summary()
    assert summary | {"bloom_fill": 0} == {
        "mode": "near", "threshold": 0.8, "ngram": 5, "num_perm": 128, "bands": 10, "rows": 12,
        "memory_mb": 64, "documents": 560, "kept": 400 + kept["near"] - (400 - kept["distinct"]),
        "removed_exact": 60, "removed_near": dedup.removed_near, "bloom_fill": 0,
        "false_positive_rate": 0.0}
    assert dedup.seen == 560 and dedup.removed_near == 100 - kept["near"] + 400 - kept["distinct"]


def test_exact_removes_only_identical_documents():
    dedup, kept = run(planted_corpus(), mode="exact")
    assert kept == {"distinct": 400, "exact": 0, "near": 100}
    assert (dedup.removed_exact, dedup.removed_near) == (60, 0)
    assert "threshold" not in dedup.summary()


def shingles(document):
    words = document.split()
    return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}


def test_the_threshold_is_settable_and_copies_go_as_often_as_the_bands_say():
    rng = np.random.default_rng(1)
    originals = [make_document(rng, 400) for _ in range(60)]
    # 10% of the words changed: a Jaccard similarity of about 0.4
    copies = [change_words(doc, 0.10, rng) for doc in originals]
    jaccard = [len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
               for a, b in zip(originals, copies)]
    for threshold in (0.8, 0.3):
        dedup = Deduplicator("near", threshold=threshold)
        assert all(dedup.keep(doc) for doc in originals)
        removed = sum(not dedup.keep(doc) for doc in copies)
        p = np.array([collision_probability(j, dedup.bands, dedup.rows) for j in jaccard])
        # the count removed is the bands' expectation, within 3 standard deviations
        assert abs(removed - p.sum()) <= 3 * np.sqrt((p * (1 - p)).sum()) + 1, (threshold, removed)
        assert removed <= 2 if threshold == 0.8 else removed >= 40


def test_bands_put_the_half_way_point_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128
        assert abs(collision_probability(threshold, bands, rows) - 0.5) < 0.08
        assert collision_probability(threshold + 0.1, bands, rows) > 0.85
        assert collision_probability(threshold - 0.2, bands, rows) < 0.06
    assert lsh_bands(0.8, 128) == (10, 12)
    assert collision_probability(0.9, 10, 12) > 0.96 and collision_probability(0.5, 10, 12) < 0.003


def test_a_document_in_pieces_is_the_same_document():
    rng = np.random.default_rng(2)
    document = "  ".join(make_document(rng, 300) for _ in range(3)) + "\n"
    whole = Deduplicator("near", batch_words=64)._keys([document])
    for seed in range(5):
        cuts = sorted(np.random.default_rng(seed).choice(len(document), 40, replace=False))
        pieces = [document[a:b] for a, b in zip([0, *cuts], [*cuts, len(document)])]
        exact, signature = Deduplicator("near", batch_words=64)._keys(pieces)
        assert exact == whole[0] and np.array_equal(signature, whole[1])
    dedup = Deduplicator("near")
    assert dedup.keep(iter(pieces)) and not dedup.keep(document.replace("  ", " "))


def test_keep_many_answers_as_keep_does():
    corpus = [doc for doc, _ in planted_corpus(distinct=150, exact=20, near=30, seed=6)]
    corpus += ["", "a b", "a  b", "a b c d e", "x", "", "A B"]
    for mode in ("exact", "near"):
        one, many = Deduplicator(mode), Deduplicator(mode)
        answers = many.keep_many(corpus[:100]) + many.keep_many([]) + many.keep_many(corpus[100:])
        assert [one.keep(doc) for doc in corpus] == answers
        assert one.summary() == many.summary()
        keys = [many._keys([doc]) for doc in corpus]
        assert many._keys_many(corpus) == [
            (exact, None if signature is None else many._band_keys(signature))
            for exact, signature in keys]


def test_short_documents():
    dedup = Deduplicator("near")
    assert [dedup.keep(d) for d in ["a b", "a  b", "a c", "", " \n", "a b c d e f"]] == [
        True, False, True, True, False, True]


def test_the_bloom_filter_never_forgets_and_errs_at_its_estimated_rate():
    rng = np.random.default_rng(3)
    bloom = BloomFilter(bits=1 << 16, hashes=4)
    added = rng.integers(0, 2 ** 63, (8000, 2), dtype=np.uint64)
    bloom.add(added)
    assert all(bloom.contains(added))
    fresh = rng.integers(0, 2 ** 63, (20000, 2), dtype=np.uint64)
    measured = np.mean(bloom.contains(fresh))
    # 8,000 keys in 65,536 bits with 4 hashes: fill 1 - e^(-4 * 8000 / 65536), rate fill^4
    assert bloom.fill() == pytest.approx(1 - np.exp(-4 * 8000 / 65536), abs=0.01)
    assert measured == pytest.approx(bloom.false_positive_rate(), abs=0.006)
    assert 0.015 < measured < 0.03


def test_the_documented_loss_table():
    assert expected_false_positive_rate(1_000_000, "exact") < 2e-12
    assert expected_false_positive_rate(10_000_000, "exact") == pytest.approx(1.4e-6, rel=0.05)
    assert expected_false_positive_rate(2_000_000) == pytest.approx(1.2e-3, rel=0.05)
    assert expected_false_positive_rate(5_000_000) == pytest.approx(0.098, rel=0.05)
    assert expected_false_positive_rate(5_000_000, memory_mb=128) == pytest.approx(0.004, rel=0.1)


def traced(work):
    """(what work() returns, the memory allocated while it ran: now, at its peak) in bytes."""
    tracemalloc.start()
    try:
        result = work()
        return result, *tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_corpus():
    rng = np.random.default_rng(4)
    documents = [make_document(rng, 200) for _ in range(600)]
    dedup = Deduplicator("near", memory_mb=2)
    assert len(dedup.bloom.array) == 2 * 2 ** 20
    _, after_100, _ = traced(lambda: [dedup.keep(doc) for doc in documents[:100]])
    _, after_600, _ = traced(lambda: [dedup.keep(doc) for doc in documents[100:]])
    # (the second list of results: 500 references)
    assert dedup.seen == 600 and after_600 - after_100 < 16 * 1024, (after_100, after_600)


def test_memory_does_not_grow_with_a_document_in_pieces():
    rng = np.random.default_rng(5)
    piece = make_document(rng, 10_000) + "\n"

    def pieces(n):
        # each piece differs, as a long file's do
        return (piece.replace("w1 ", f"x{i} ") for i in range(n))
    dedups = {n: Deduplicator("near", memory_mb=1) for n in (4, 32)}
    peaks = [traced(lambda: dedups[n].keep(pieces(n)))[2] for n in (4, 32)]
    # 8 times the text, the same memory
    assert peaks[1] < 1.1 * peaks[0], peaks


def test_bad_settings_say_what_to_give():
    with pytest.raises(ValueError, match="dedup mode 'fuzzy': choose exact or near"):
        Deduplicator("fuzzy")
    with pytest.raises(ValueError, match="dedup threshold 1.5: give a Jaccard similarity"):
        Deduplicator("near", threshold=1.5)
    with pytest.raises(ValueError, match="must be positive"):
        Deduplicator("near", memory_mb=0)
