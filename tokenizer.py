r"""
Byte-level BPE, GPT-2 style: train it from scratch, save and load it as vocab.json + merges.txt,
encode with tiktoken. This file copies alone (it imports no other file of the project) and raises
ValueError or OSError for bad input; its command line needs cli.py, files.py and workers.py too:

    python tokenizer.py --train=input.txt --vocab_size=8192 --min_frequency=2 --out=out-tokenizer

Training (`BPETokenizer.train`):
1. pre-tokenize: split text with GPT-2's regex into words (" the", "ing", "\n\n") and count the
   distinct ones;
2. start every word as its UTF-8 bytes: ids 0..255 are the bytes by value, so any text can be
   encoded;
3. repeatedly merge the most frequent adjacent pair of ids into a new id (ties: the smallest pair),
   keeping pair counts up to date by touching only the words that hold the merged pair, until
   vocab_size is reached (or no pair occurs min_frequency times).
Id layout of a trained tokenizer: 0..255 the bytes, then the merges in the order learned, then the
special tokens.

Encoding is tiktoken's Rust core fed with our merges (a token's rank is its merge order);
`encode_reference` is the same algorithm in a few lines of plain Python. Files are Hugging Face's
byte-level format (GPT-2's encoder.json + vocab.bpe are the same format under other names), so HF
`tokenizers` and we read each other's files.
"""

import collections
import hashlib
import heapq
import itertools
import json
import operator
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex
import tiktoken

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX = regex.compile(GPT2_PATTERN)
ENDOFTEXT = "<|endoftext|>"
# GPT-2's tokenizer files: OpenAI's encoder.json and vocab.bpe are, byte for byte, Hugging Face's
# vocab.json and merges.txt (the same for every GPT-2 size)
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def bytes_to_unicode():
    """GPT-2's byte -> printable character map, used to write byte strings in vocab.json and
    merges.txt. Printable Latin-1 bytes stand for themselves; the others (space, control bytes) are
    moved up to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


# ----------------------------------------------------------------------------- pre-tokenization

# GPT-2's regex always starts a new word at a space followed by a non-space (" the"): the word
# before cannot run across it (a run of whitespace gives the last space up, by `\s+(?!\S)`) and no
# part of the pattern looks back. So cutting the text there changes nothing, and the slow regex
# needs to run only once per distinct piece: WikiText-2 has 2M pieces but only ~37k distinct ones,
# counted by a fast C-level split + Counter. ([!-~], visible ASCII, is a non-space by any
# definition of whitespace, in `re` as in `regex`.)
SAFE_CUT = re.compile(r" (?=[!-~])")


def count_pretokens(texts):
    """{pre-token: count} over all texts: Counter(GPT2_REGEX.findall(text)) summed over the texts.

        count_pretokens(["the cat, the hat"]) -> {'the': 1, ' cat': 1, ',': 1, ' the': 1, ' hat': 1}
    """
    pieces, words = Counter(), Counter()
    for text in texts:
        # every part but the first lost its leading space to the cut
        parts = SAFE_CUT.split(text)
        pieces.update(parts)
        pieces[parts[0]] -= 1
        words.update(GPT2_REGEX.findall(parts[0]))
    for piece, n in pieces.items():
        # (n is 0 for a first part that occurs nowhere else)
        if n:
            for word in GPT2_REGEX.findall(" " + piece):
                words[word] += n
    return words


def count_pretokens_parallel(texts, min_chars=1 << 20, pool=None, batch_chars=1 << 22, ahead=16):
    """count_pretokens over an iterable of texts, read as it goes: memory grows with the distinct
    words, not with the text. pool: a multiprocessing pool (workers.worker_pool makes one) that
    counts batches of ~batch_chars, at most `ahead` at a time, once the text passes min_chars
    (processes, not threads: the regex holds the GIL); without one, all is counted here. A long
    text is cut at SAFE_CUT points, so that its pieces count as it does."""
    batches = _batches(texts, batch_chars, piece=max(batch_chars // 4, 1))
    first = next(batches, [])
    # no pool, or an input too small to be worth the processes: counted here
    if pool is None or sum(map(len, first)) < min_chars:
        return count_pretokens(itertools.chain(first, itertools.chain.from_iterable(batches)))
    total, pending = Counter(), collections.deque()
    for batch in itertools.chain([first], batches):
        pending.append(pool.apply_async(count_pretokens, (batch,)))
        if len(pending) >= ahead:
            total.update(pending.popleft().get())
    for counts in pending:
        total.update(counts.get())
    return total


def _batches(texts, batch_chars, piece):
    """Lists of texts of about batch_chars characters in all; a longer text is cut into pieces of
    ~`piece`."""
    batch, size = [], 0
    for text in texts:
        for part in (cut_text(text, piece) if len(text) > piece else [text]):
            batch.append(part)
            size += len(part)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def cut_text(text, size):
    """text cut into pieces of about `size` characters at SAFE_CUT points: the pieces count as the
    whole does."""
    pieces, start = [], 0
    while (m := SAFE_CUT.search(text, start + size)) is not None:
        pieces.append(text[start:m.start()])
        start = m.start()
    return pieces + [text[start:]]


# A second kind of cut, for text read in chunks: after a line break between two word characters
# ("end\nNext"): the line break is then a word of its own, whichever way the text is cut there. (\w,
# letters, digits and _, is never whitespace.)
STREAM_CUT = re.compile(SAFE_CUT.pattern + r"|(?<=\w\n)(?=\w)")


def cut_stream(chunks, size=1 << 20, most=64):
    """The text of `chunks` (cut anywhere, e.g. a file read 1 MB at a time) as pieces of about
    `size` characters, cut only where encoding is unaffected: encoding the pieces one by one gives
    the ids of the whole text.

        list(cut_stream(["the c", "at sat on", " it"], size=4)) -> ['the cat', ' sat', ' on it']

    A text with no place to cut in `most` pieces' length (no space before a visible character, no
    line break between letters) is cut where it stands, so that memory stays bounded; only there
    can ids differ."""
    carry = ""
    for chunk in chunks:
        text, start = carry + chunk, 0
        while len(text) - start > size:
            m = STREAM_CUT.search(text, start + size)
            if m is None:
                break
            yield text[start:m.start()]
            start = m.start()
        carry = text[start:]
        if len(carry) > most * size:
            yield carry[:-size]
            carry = carry[-size:]
    if carry:
        yield carry


# ----------------------------------------------------------------------------- learning the merges

def learn_merges(word_counts, n_merges, min_frequency=2):
    """Learn up to n_merges merges [(left id, right id)] from {word: count}; merge i makes the id
    256 + i."""
    # A word is held as a str whose characters are token ids, chr(id): a pair is then a 2-character
    # str, and finding and merging it in a word are str.find and str.replace, which run in C.
    # (latin-1 decodes byte b to chr(b))
    words = [word.encode("utf-8").decode("latin-1") for word in word_counts]
    counts = list(word_counts.values())
    # pair -> its occurrences in the corpus; pair -> the words holding it
    pair_count, where = defaultdict(int), defaultdict(set)
    for w, word in enumerate(words):
        for pair in map(operator.add, word, word[1:]):
            pair_count[pair] += counts[w]
            where[pair].add(w)
    # Max-heap of (count, pair), smallest pair first on equal counts. Entries go stale as counts
    # drop: a popped entry is checked against pair_count, and pushed back with the true count if it
    # was stale.
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([b]) for b in range(256)]
    known, merges = set(token_bytes), []
    while len(merges) < n_merges and heap:
        n, pair = heapq.heappop(heap)
        # stale (or already merged, or skipped below: count 0)
        if pair_count[pair] != -n:
            if pair_count[pair] > 0:
                heapq.heappush(heap, (-pair_count[pair], pair))
            continue
        # the most frequent pair is too rare: so is every other one
        if -n < min_frequency:
            break
        a, b = map(ord, pair)
        # the same bytes as an existing token: one id per byte string
        if token_bytes[a] + token_bytes[b] in known:
            pair_count[pair] = 0
            continue
        new = chr(256 + len(merges))
        merges.append((a, b))
        token_bytes.append(token_bytes[a] + token_bytes[b])
        known.add(token_bytes[-1])
        # the pairs that hold the new token (all of them new) -> the words holding them
        new_where = defaultdict(set)
        for w in where.pop(pair):
            word, n_w = words[w], counts[w]
            # (a word stays in `where` after losing the pair: then find gives -1)
            i, end = word.find(pair), -1
            # each occurrence, left to right: the pairs on either side now hold `new`
            while i >= 0:
                if i > 0:
                    # `new` if the previous occurrence ends here
                    left = new if i == end else word[i - 1]
                    pair_count[left + pair[0]] -= n_w
                    p = left + new
                    pair_count[p] += n_w
                    new_where[p].add(w)
                if i + 2 < len(word):
                    right = word[i + 2]
                    pair_count[pair[1] + right] -= n_w
                    p = new + right
                    pair_count[p] += n_w
                    new_where[p].add(w)
                end = i + 2
                i = word.find(pair, end)
            words[w] = word.replace(pair, new)
        pair_count[pair] = 0
        where.update(new_where)
        # only these pairs gained counts: push each once, with its final count
        for p in new_where:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """Merges + special tokens -> encode/decode. Internally every token has a rank (bytes by value,
    then the merges in order, then the special tokens): tiktoken merges by rank. Ids are the ranks
    unless a loaded file numbers its tokens otherwise (GPT-2 and HF put the 256 bytes in character
    order); then lookup arrays translate."""

    def __init__(self, merges, special_tokens, token_ids=None):
        """merges: [(left bytes, right bytes)] in priority order; special_tokens: {str: id};
        token_ids: {token bytes: id} when a file's ids are not the ranks."""
        self.merges = list(merges)
        self.ranks = {bytes([b]): b for b in range(256)}
        for left, right in self.merges:
            self.ranks[left + right] = len(self.ranks)
        assert len(self.ranks) == 256 + len(self.merges), "two merges make the same token"
        self.token_ids = dict(self.ranks) if token_ids is None else dict(token_ids)
        self.special_tokens = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        self.eot_id = self.special_tokens.get(ENDOFTEXT)
        self.vocab_size = len(self.ranks) + len(self.special_tokens)
        special_ranks = {s: len(self.ranks) + i for i, s in enumerate(self.special_tokens)}
        id_of_rank = [self.token_ids[token] for token in self.ranks]
        id_of_rank += list(self.special_tokens.values())
        if sorted(id_of_rank) != list(range(self.vocab_size)):
            raise ValueError(f"token ids must be 0..{self.vocab_size - 1}, each used once")
        # ids equal to ranks: nothing to translate
        identity = id_of_rank == list(range(self.vocab_size))
        self._rank_to_id = None if identity else np.array(id_of_rank)
        self._id_to_rank = None if identity else np.argsort(id_of_rank)
        # The fast path: tiktoken's Rust BPE with our ranks and GPT-2's pre-tokenization regex.
        self._enc = tiktoken.Encoding(f"bpe{self.vocab_size}", pat_str=GPT2_PATTERN,
                                      mergeable_ranks=self.ranks, special_tokens=special_ranks)

    def _to_ids(self, ranks):
        return ranks if self._rank_to_id is None else self._rank_to_id[ranks].tolist()

    def encode(self, text, allowed_special=frozenset()):
        """Ids of text. Special tokens become single ids only if allowed ("all" or a set of them);
        otherwise text that looks like one is ordinary text."""
        ranks = self._enc.encode(text, allowed_special=allowed_special, disallowed_special=())
        return self._to_ids(ranks)

    def encode_to_numpy(self, text):
        """encode() of ordinary text as a numpy array, with no Python list in between: the fast
        path for corpora."""
        ranks = self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return ranks if self._rank_to_id is None else self._rank_to_id[ranks]

    def encode_document(self, text):
        """Ids of a text as the token files hold every document: the end-of-text token first (if
        the tokenizer has one), so that a model reads the text as the start of a document.

            "Hi" -> [eot_id, ...ids of "Hi"]
        """
        return ([] if self.eot_id is None else [self.eot_id]) + self.encode(text)

    def encode_batch(self, texts, allowed_special=frozenset()):
        """encode() of many texts at once, on tiktoken's thread pool."""
        batch = self._enc.encode_batch(list(texts), allowed_special=allowed_special,
                                       disallowed_special=())
        return [self._to_ids(ranks) for ranks in batch]

    def decode_bytes(self, ids):
        """The bytes of ids: what streaming output needs, since one character can span several
        ids."""
        # numpy arrays and torch tensors too
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        ranks = ids if self._id_to_rank is None else self._id_to_rank[ids].tolist()
        return self._enc.decode_bytes(ranks)

    def decode(self, ids):
        """Text of ids; bytes that do not form whole UTF-8 characters (a cut sequence) become
        U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, out_dir):
        """Write the tokenizer into out_dir as Hugging Face's files, each atomically (a crash
        leaves the old file or the new one): vocab.json + merges.txt (GPT-2's format) and
        tokenizer.json (HF tokenizers' one file, special tokens marked). Returns their names."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        vocab, merges = self._vocab_and_merges()
        files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
                 "merges.txt": "#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges),
                 "tokenizer.json": json.dumps(self.hf_tokenizer_json(), ensure_ascii=False)}
        for name, text in files.items():
            tmp = out_dir / f"{name}.tmp"
            try:
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, out_dir / name)
            finally:
                tmp.unlink(missing_ok=True)
        return list(files)

    def fingerprint(self):
        """A sha256 of the ids, tokens and merges: equal fingerprints, the same tokenizer, whatever
        its files' names."""
        vocab, merges = self._vocab_and_merges()
        data = json.dumps([vocab, merges], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(data).hexdigest()

    def _vocab_and_merges(self):
        """{token as written in the files: id}, ordered by id, and the merges as "left right" lines.
        The files write bytes with GPT-2's printable characters: b" the" -> "Ġthe"."""
        char = bytes_to_unicode()

        def show(token):
            return "".join(char[b] for b in token)
        vocab = {show(token): i for token, i in self.token_ids.items()} | self.special_tokens
        vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        return vocab, [f"{show(a)} {show(b)}" for a, b in self.merges]

    def hf_tokenizer_json(self):
        """The tokenizer as Hugging Face tokenizers' tokenizer.json: byte-level BPE with GPT-2's
        pre-tokenizer (the same regex), our vocab and merges, the special tokens as added tokens
        (so decoding can skip them)."""
        vocab, merges = self._vocab_and_merges()
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for s, i in self.special_tokens.items()]
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                 "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                 "vocab": vocab, "merges": merges}
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": None, "pre_tokenizer": byte_level, "decoder": byte_level,
                "post_processor": {**byte_level, "trim_offsets": False}, "model": model}


class BPETokenizer(Tokenizer):
    """A Tokenizer that can be trained from text, or loaded from vocab.json + merges.txt /
    encoder.json + vocab.bpe."""

    @classmethod
    def train(cls, text_or_path_or_iterable, vocab_size=8192, min_frequency=2,
              special_tokens=(ENDOFTEXT,), verbose=False, pool=None):
        """Learn vocab_size - 256 - len(special_tokens) merges. Input: a file path, a text, or an
        iterable of texts (documents: no word spans two of them), read as it goes. A str is read as
        a path if it names a file and has no newline. pool: a multiprocessing pool to count words
        on (see count_pretokens_parallel); without one, they are counted here.
        If the pairs that occur at least min_frequency times run out first, training stops there
        with a warning on stderr, and the vocab is smaller (as HF tokenizers does). Raises
        ValueError for a text without words, OSError or UnicodeDecodeError for a file it cannot
        read as UTF-8."""
        source = text_or_path_or_iterable
        is_path = isinstance(source, os.PathLike) or (
            isinstance(source, str) and "\n" not in source and os.path.isfile(source))
        if is_path:
            texts = [Path(source).read_text(encoding="utf-8")]
        else:
            texts = [source] if isinstance(source, str) else source
        # unique, in the order given
        special_tokens = list(dict.fromkeys(special_tokens or ()))
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} leaves no room for the 256 bytes "
                             f"and {special_tokens}")
        check_special_tokens(special_tokens)
        t0 = time.time()
        words = count_pretokens_parallel(texts, pool=pool)
        if not any(word.strip() for word in words):
            raise ValueError("the training text is empty: it has no words to learn merges from; "
                             "give a text that has some")
        t1 = time.time()
        merges = learn_merges(words, n_merges, min_frequency)
        if verbose:
            print(f"counted {len(words):,} distinct words in {t1 - t0:.2f} s, "
                  f"learned {len(merges):,} merges in {time.time() - t1:.2f} s")
        if len(merges) < n_merges:
            print(f"warning: only {len(merges):,} merges of pairs seen >= {min_frequency} times; "
                  f"vocab has {256 + len(merges) + len(special_tokens):,} ids, not {vocab_size:,}",
                  file=sys.stderr)
        token_bytes = [bytes([b]) for b in range(256)]
        for a, b in merges:
            token_bytes.append(token_bytes[a] + token_bytes[b])
        specials = {s: len(token_bytes) + i for i, s in enumerate(special_tokens)}
        return cls([(token_bytes[a], token_bytes[b]) for a, b in merges], specials)

    @classmethod
    def load(cls, directory_or_vocab_path, merges_path=None):
        """Load vocab.json + merges.txt (HF) or encoder.json + vocab.bpe (GPT-2), from a folder or
        two paths. Ids are kept as the file has them. A vocab entry that is neither a byte nor made
        by a merge is a special token. A merge that remakes an existing token is dropped (tiktoken
        knows one rank per byte string). Any problem with the files is a ValueError that says what
        to do."""
        vocab_path = Path(directory_or_vocab_path)
        if merges_path is None and not vocab_path.is_dir():
            raise ValueError(f"no tokenizer in {vocab_path}: it is not a folder (one that "
                             f"prepare.py or train.py wrote holds vocab.json + merges.txt)")
        if vocab_path.is_dir():
            hf_names = (vocab_path / "vocab.json").exists()
            names = ("vocab.json", "merges.txt") if hf_names else ("encoder.json", "vocab.bpe")
            vocab_path, merges_path = [vocab_path / name for name in names]
        if merges_path is None:
            raise ValueError("give the merges file too: load(vocab_path, merges_path)")
        merges_path = Path(merges_path)
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise ValueError(f"tokenizer file not found: {path}")
        try:
            vocab = json.loads(_read(vocab_path))
            if not (isinstance(vocab, dict) and all(isinstance(i, int) for i in vocab.values())):
                raise ValueError("not an object of token: id")
        # bad JSON or bad UTF-8
        except ValueError as e:
            raise ValueError(f"{vocab_path} is not a tokenizer's vocabulary ({str(e)[:80]}): "
                             f"copy it again, or run prepare.py again") from None
        try:
            lines = _read(merges_path).splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{merges_path} is not UTF-8 text: copy it again, or run prepare.py "
                             f"again") from None
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        # tokens as written in the files: the 256 byte characters, then merge results
        made = set(byte_of)
        merges = []
        for number, line in enumerate(lines, 1):
            if line and not line.startswith("#version"):
                if line.count(" ") != 1:
                    raise ValueError(f"{merges_path}:{number}: not a merge ('left right'): copy "
                                     f"the file again, or run prepare.py again")
                left, right = line.split(" ")
                if left + right not in made:
                    made.add(left + right)
                    merges.append((left, right))
        missing = [t for t in made if t not in vocab]
        if missing:
            raise ValueError(f"{vocab_path} lacks {len(missing)} byte or merged tokens, "
                             f"e.g. {missing[0]!r}")

        def to_bytes(token):
            return bytes(byte_of[c] for c in token)
        return cls([(to_bytes(a), to_bytes(b)) for a, b in merges],
                   special_tokens={s: i for s, i in vocab.items() if s not in made},
                   token_ids={to_bytes(t): i for t, i in vocab.items() if t in made})

    def encode_reference(self, text):
        """encode() in plain Python, minbpe style, for reading and testing (special tokens are
        ordinary text): split text with the regex, then in each word merge the lowest-ranked
        adjacent pair until none is left."""
        # (left rank, right rank) -> the rank of the merged token
        if not hasattr(self, "_pair_rank"):
            self._pair_rank = {(self.ranks[a], self.ranks[b]): self.ranks[a + b]
                               for a, b in self.merges}
        out = []
        for word in GPT2_REGEX.findall(text):
            # a byte's rank is its value
            parts = list(word.encode("utf-8"))
            while len(parts) > 1:
                pair = min(zip(parts, parts[1:]),
                           key=lambda p: self._pair_rank.get(p, float("inf")))
                if pair not in self._pair_rank:
                    break
                parts = merge(parts, pair, self._pair_rank[pair])
            out.extend(parts)
        return self._to_ids(out)


def check_special_tokens(special_tokens):
    """Refuse a special token that is empty, or that the files could write as an ordinary token: 'a'
    (the byte a), 'Ġthe' (' the', which training may learn); vocab.json cannot hold both under
    one name. A name that GPT-2's regex splits, as <|endoftext|> ('<|', 'endoftext', '|>'), is
    never one: no token spans two pre-tokens."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for special in special_tokens:
        if not special:
            raise ValueError("a special token is empty: give each one a name, like <|endoftext|>")
        if not all(c in byte_of for c in special):
            continue
        try:
            text = bytes(byte_of[c] for c in special).decode("utf-8")
        # part of a character: a token can be that too
        except UnicodeDecodeError:
            text = None
        if text is None or GPT2_REGEX.findall(text) == [text]:
            raise ValueError(f"the special token {special!r} can be the name of an ordinary token "
                             f"in the tokenizer files (a byte, or a token training learns): choose "
                             f"names like <|endoftext|> that no text makes into one token")


def _read(path):
    """The text of a tokenizer file: UnicodeDecodeError if it is not UTF-8, ValueError if it cannot
    be read at all."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def merge(ids, pair, new_id):
    """ids with every occurrence of pair, left to right, replaced by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ----------------------------------------------------------------------------- command line

@dataclass
class TokenizerConfig:
    """The command line's settings; metadata holds the values a setting allows, as cli.setting
    declares them (this module imports no cli at its top, so that it copies alone)."""
    train: str = ""             # UTF-8 text file to train on
    vocab_size: int = field(default=8192, metadata={"low": 257})  # ids in all: 256 bytes + merges
                                                                    # + special tokens
    min_frequency: int = field(default=2, metadata={"low": 1})  # a pair must occur this often to
                                                                # become a merge
    special_tokens: tuple[str, ...] = (ENDOFTEXT,)  # added after the merges, in this order
    out: str = "out-tokenizer"  # folder for vocab.json + merges.txt


def main():
    # the command line's files: the module itself needs none of them
    from cli import UserError, parse_config
    from files import check_writable, read_utf8
    from workers import cpu_count, end_pool, worker_pool

    config = parse_config(TokenizerConfig)
    if not config.train:
        raise UserError("give a text file to train on: --train=FILE")
    check_writable(config.out, "out")
    if config.vocab_size < 256 + len(config.special_tokens):
        raise UserError(f"--vocab_size must be at least {256 + len(config.special_tokens)} "
                        f"(256 bytes + {len(config.special_tokens)} special tokens)")
    text = read_utf8(config.train, "training file")
    t0 = time.time()
    pool = worker_pool(min(8, cpu_count())) if cpu_count() > 1 else None
    try:
        tok = BPETokenizer.train(text, config.vocab_size, config.min_frequency,
                                 config.special_tokens, verbose=True, pool=pool)
    except ValueError as e:
        raise UserError(str(e)) from None
    finally:
        if pool is not None:
            end_pool(pool)
    seconds = time.time() - t0
    files = tok.save(config.out)
    print(f"trained in {seconds:.2f} s: vocab size {tok.vocab_size:,} (256 bytes + "
          f"{len(tok.merges):,} merges + {len(tok.special_tokens)} special) -> "
          f"{', '.join(os.path.join(config.out, f) for f in files)}")


def run_main(main):
    """cli.run_main (a mistake: one `error:` line), imported once the command line runs: the module
    itself imports no project file."""
    from cli import run_main
    run_main(main)


if __name__ == "__main__":
    run_main(main)
