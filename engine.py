"""
Batched generation for a server: one thread owns the model and decodes every active sequence in a
single forward pass per step. A request joins between two steps (its prompt runs alone, into a free
row of the KV cache) and leaves as soon as it is done, so nobody waits for a whole batch to finish:
continuous batching. Each sequence keeps its own row, position, sampling settings, seed and stopping
rule: its tokens do not depend on what else is in the batch. The engine owns the rows: it points the
model's caches at one row to run a prompt, at rows 0..n-1 to decode.

    engine = BatchEngine(model, max_batch_size=32)
    sequence = engine.submit(prompt_ids, max_new_tokens=64, temperature=0.8, seed=1, stop_id=eot_id)
    for token in sequence:      # new token ids as they come; sequence.close() gives the row back
        ...
    sequence.finish_reason      # "stop" (stop_id) or "length" (max_new_tokens)

With logprobs=k, each new token's log-probability under the model (its raw distribution, whatever
the sampling settings) and the k likeliest tokens' come in sequence.scores; with score_prompt, the
prompt's tokens' in sequence.scored_prompt() (None for the first, which has no context).
max_new_tokens=0 then just scores the prompt.

Waiting sequences run first come, first served, by rank: a request of many choices gives its i-th
rank i, so that its later choices wait behind other requests' first ones. It submits them with
after=its first choice's Sequence: they join the line once that one has decoded FOLLOWERS_AFTER (2)
tokens, or left. By then a stream has sent its first event, and its reader, woken by the first
token (unless it holds half a character), has seen a client that hung up on it and closed every
choice: a client gone at once costs one prompt, not n. (A count of steps, not the reader's pace:
the batches, and so the numbers, are the same from run to run.) Choices of one prompt run it once:
the others copy its positions from an active row that holds it, a copy in the KV cache instead of
the model over the prompt again. Between two steps, at most PROMPTS_PER_STEP prompts run (copies
not counted): a burst of new requests delays the running ones by a few prompts only.

Decoding one token for 32 sequences reads the weights once, as for one sequence: on a small model
the step costs little more than a single sequence's step, so the server's throughput grows with the
batch. A step reads the sampled tokens back once, for every row together. With compile=True (for
GPUs) the step is compiled for a few batch sizes (1, 2, 4, ... up to max_batch_size: on a GPU one
CUDA graph each), the active rows padded up to the next size with rows that are free.
"""

import itertools
import math
import queue
import threading

import torch

from model import sample_next_token

PROMPTS_PER_STEP = 4
FOLLOWERS_AFTER = 2


def scores(logits, tokens, k):
    """For each row of logits (T, vocab) and the token that followed it: (its log-probability,
    [(id, logprob)] of the k likeliest tokens), as Python numbers."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not k:
        return [(logprob, []) for logprob in chosen]
    top = logprobs.topk(k, dim=-1)
    alternatives = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    return list(zip(chosen, alternatives))


class Sequence:
    """One request: its tokens so far, sampling settings, and the queue its new token ids arrive on.
    Iterate over it for the new ids; close() (or leaving the loop early) frees its row at the
    engine's next step."""

    def __init__(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_id, device,
                 logprobs=None, score_prompt=False):
        self.ids, self.max_new_tokens, self.stop_id = list(ids), max_new_tokens, stop_id
        self.logprobs, self.score_prompt = logprobs, score_prompt
        # [(logprob, [(id, logprob) of the likeliest]) per token]
        self.scores, self.prompt_scores = [], None
        self.temperature, self.top_k, self.top_p = temperature, top_k or None, top_p
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        # length: the positions of this sequence in the KV cache
        self.generated, self.length, self.logits = 0, 0, None
        # once active: (the k of its prompt's scores or None, its prompt), while its row holds it
        self.prompt, self.prompt_logits = None, None
        self.finish_reason, self.cancelled, self.error = None, False, None
        # new ids, then None when done (or an exception if the engine failed)
        self.tokens = queue.SimpleQueue()
        self.prompt_ran = threading.Event()  # set once the engine has run the prompt (or failed to)
        # the entries of its request's later choices (BatchEngine.submit's after), held until it
        # has decoded FOLLOWERS_AFTER tokens or left the engine; None once let into the line
        self.followers, self.lock = [], threading.Lock()

    def __iter__(self):
        try:
            while (token := self.tokens.get()) is not None:
                if isinstance(token, BaseException):
                    raise token
                yield token
        finally:
            self.close()

    def close(self):
        self.cancelled = True

    def hold(self, entry):
        """Keep a later choice's entry for the engine's line until take_followers; False if that
        has happened already."""
        with self.lock:
            if self.followers is not None:
                self.followers.append(entry)
            return self.followers is not None

    def take_followers(self):
        """The entries held, handed over once: from now on hold keeps none."""
        with self.lock:
            followers, self.followers = self.followers, None
        return followers or []

    def scored_prompt(self):
        """prompt_scores (with score_prompt), once the engine has run the prompt (this waits)."""
        self.prompt_ran.wait()
        if self.error is not None:
            raise self.error
        return self.prompt_scores


class BatchEngine:
    """A thread that decodes the active sequences together, up to max_batch_size at a time (rows of
    the KV cache); the others wait in line (see the module's docstring). suppress_ids are never
    sampled (the ids that start the data's marker for rare words, say)."""

    def __init__(self, model, max_batch_size=32, compile=False, suppress_ids=None):
        self.model, self.max_batch_size, self.suppress_ids = model, max_batch_size, suppress_ids
        self.device = model.token_emb.weight.device
        self.waiting = queue.PriorityQueue()  # (rank, arrival, sequence or [such entries])
        self.arrivals = itertools.count()
        self.active = []  # self.active[i] owns row i of the KV cache
        self.peak_batch = 0  # the most sequences decoded together so far
        model.setup_kv_cache(max_batch_size)
        # every row; the model sees some of them
        self.caches = [block.attn.kv_cache for block in model.blocks]
        self.views = {}  # (start, stop) -> each layer's cache of those rows
        # the decode step and the batch sizes it runs at (None: any, eager)
        self.decode, self.batch_sizes = model.decode_one_token, None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(compile, ready), name="batch-engine",
                                       daemon=True)
        self.thread.start()
        ready.wait()

    def submit(self, ids, max_new_tokens, temperature=0.8, top_k=None, top_p=None, seed=None,
               stop_id=None, logprobs=None, score_prompt=False, rank=0, after=None):
        """Queue a prompt (token ids); returns its Sequence. Greedy when temperature is 0; top_k
        0/None and top_p None/1.0 switch those filters off; a seed makes the sample reproducible,
        whatever else is in the batch. logprobs (the number of alternatives), score_prompt, rank
        and after (the Sequence of the request's first choice): see the module's docstring."""
        sequence = Sequence(ids, max_new_tokens, temperature, top_k, top_p, seed, stop_id,
                            self.device, logprobs, score_prompt)
        entry = (rank, next(self.arrivals), sequence)
        if max_new_tokens < 1 and not score_prompt:
            sequence.finish_reason, sequence.followers = "length", None
            sequence.tokens.put(None)
        elif after is None or not after.hold(entry):
            self.waiting.put(entry)
        return sequence

    def close(self):
        """Stop the thread once the waiting and active sequences are done (None, last in line, is
        the signal)."""
        self.waiting.put((math.inf, next(self.arrivals), None))
        self.thread.join()

    # ------------------------------------------------------------------------- the thread

    @torch.no_grad()
    def _run(self, compile, ready):
        try:
            if compile:  # in this thread: a CUDA graph replays in the thread that recorded it
                from runtime import compile_batch_decoding
                top = self.max_batch_size
                self.batch_sizes = [2**i for i in range(top.bit_length()) if 2**i < top] + [top]
                self.decode = compile_batch_decoding(self.model, self._use_rows, self.batch_sizes)
        finally:
            ready.set()
        while True:
            if not self._admit():
                return
            try:
                self._step()
            except Exception as e:  # tell every client of the batch, then serve the next ones
                for sequence in self.active:
                    sequence.tokens.put(e)
                    self._let_followers_in(sequence)
                self.active = []

    def _admit(self):
        """Move waiting sequences into free rows, running each one's prompt (PROMPTS_PER_STEP at
        most: a prompt that an active row holds already is copied from it, not run); waits while
        nothing is active. Returns False when told to stop."""
        prompts = 0
        while len(self.active) < self.max_batch_size and prompts < PROMPTS_PER_STEP:
            try:
                _, _, sequence = self.waiting.get(block=not self.active)
            except queue.Empty:
                break
            if sequence is None:
                return False
            if isinstance(sequence, list):  # a request's later choices, let in (Sequence.hold)
                for entry in sequence:
                    if not entry[-1].cancelled:
                        self.waiting.put(entry)
                continue
            if sequence.cancelled:
                self._let_followers_in(sequence)
                continue
            context = sequence.ids[-self.model.config.block_size:]  # a long prompt keeps its end
            scored = (sequence.logprobs or 0) if sequence.score_prompt else None
            twin = next((other for other in self.active if other.prompt == (scored, context)), None)
            prompts += twin is None
            try:
                if twin is None:
                    self._run_prompt(sequence, context)
                else:
                    self._copy_prompt(twin, sequence, len(context))
            except Exception as e:  # this request fails alone
                sequence.error = e
                sequence.tokens.put(e)
                self._let_followers_in(sequence)
                continue
            finally:
                sequence.prompt_ran.set()
            if sequence.max_new_tokens < 1:  # only the prompt's scores were asked for
                sequence.finish_reason = "length"
                sequence.tokens.put(None)
                self._let_followers_in(sequence)
                continue
            sequence.length, sequence.prompt = len(context), (scored, context)
            self.active.append(sequence)
            self.peak_batch = max(self.peak_batch, len(self.active))
        return True

    def _let_followers_in(self, sequence):
        """Put the later choices held behind a sequence into the line, as one entry: _admit queues
        those still wanted when it reaches it (a request that failed, or whose client left, has
        closed them by then)."""
        if followers := sequence.take_followers():
            self.waiting.put((*followers[0][:2], followers))

    def _run_prompt(self, sequence, context):
        """Run a prompt into the next free row: its next-token logits (and its scores)."""
        self._use_rows(len(self.active), len(self.active) + 1)
        logits = self.model.prefill(self._tensor([context]),
                                    every_position=sequence.score_prompt)[0]
        if sequence.score_prompt:
            k = sequence.logprobs or 0
            sequence.prompt_scores = [None] + scores(logits[:-1], context[1:], k)
            # kept while the sequence is active: the last position's, not the whole prompt's
            logits = logits[-1].clone()
        sequence.logits = sequence.prompt_logits = logits

    def _copy_prompt(self, twin, sequence, length):
        """What _run_prompt would give, from an active sequence that ran the same prompt (the n
        choices of a request, say): its row's first `length` positions into the next free row."""
        source, row = self.active.index(twin), len(self.active)
        for cache in self.caches:
            cache[:, row, :, :length] = cache[:, source, :, :length]
        sequence.prompt_scores, sequence.prompt_logits = twin.prompt_scores, twin.prompt_logits
        sequence.logits = twin.prompt_logits

    def _step(self):
        """Sample every active sequence's next token, drop the finished ones, then decode the rest
        in one pass."""
        for sequence, token in zip(self.active, self._sample()):
            if sequence.cancelled:
                continue
            # (the stop token's too: it ends the text, and has its probability)
            if sequence.logprobs is not None:
                sequence.scores += scores(sequence.logits[None], [token], sequence.logprobs)
            if token == sequence.stop_id:
                sequence.finish_reason = "stop"
                continue
            sequence.ids.append(token)
            sequence.generated += 1
            sequence.tokens.put(token)
            if sequence.generated == FOLLOWERS_AFTER:
                self._let_followers_in(sequence)
            if sequence.generated == sequence.max_new_tokens:
                sequence.finish_reason = "length"
        self._remove_finished()
        if not self.active:
            return
        for row, sequence in enumerate(self.active):
            # full: rebuild the row (GPT.tokens_kept_when_full); the newest token is decoded below
            if sequence.length == self.model.config.block_size:
                prefix = sequence.ids[-self.model.tokens_kept_when_full():-1]
                if prefix:
                    self._use_rows(row, row + 1)
                    self.model.prefill(self._tensor([prefix]))
                # (the row no longer holds the prompt: nothing to copy from it)
                sequence.length, sequence.prompt = len(prefix), None
        # compiled: padded up to the next batch size with free rows (their position 0 is rewritten
        # by the prompt of the sequence that takes the row)
        size = next((n for n in self.batch_sizes or [] if n >= len(self.active)), len(self.active))
        self._use_rows(0, size)
        padding = [[0]] * (size - len(self.active))
        tokens = self._tensor([[sequence.ids[-1]] for sequence in self.active] + padding)
        positions = self._tensor([[sequence.length] for sequence in self.active] + padding)
        logits = self.decode(tokens, positions)
        for sequence, row_logits in zip(self.active, logits):
            sequence.logits = row_logits
            sequence.length += 1

    def _sample(self):
        """Every active sequence's next token id, read back once for all: the rows with the same
        settings sampled together, each row's noise drawn with its own generator (as
        torch.multinomial draws it: see sample_next_token), so its tokens do not depend on the
        batch."""
        groups = {}  # settings -> rows
        for row, sequence in enumerate(self.active):
            settings = (sequence.temperature, sequence.top_k, sequence.top_p)
            groups.setdefault(settings, []).append(row)
        order, picked = [], []
        for (temperature, top_k, top_p), rows in groups.items():
            logits = torch.stack([self.active[row].logits for row in rows])
            if self.suppress_ids:
                logits[:, self.suppress_ids] = float("-inf")
            noise = None
            if temperature >= 1e-5:
                noise = torch.empty(logits.shape, device=self.device)
                for draws, row in zip(noise, rows):
                    draws.exponential_(1, generator=self.active[row].generator)
            picked.append(sample_next_token(logits, temperature, top_k, top_p, noise=noise))
            order += rows
        tokens = [0] * len(order)
        for row, token in zip(order, torch.cat(picked).tolist() if picked else []):
            tokens[row] = token
        return tokens

    def _remove_finished(self):
        """Let finished and cancelled sequences go; the last row moves into each freed one, so rows
        0..n-1 stay the active ones (a batch is then a view of the cache, never a copy of it)."""
        row = 0
        while row < len(self.active):
            sequence = self.active[row]
            if sequence.finish_reason is None and not sequence.cancelled:
                row += 1
                continue
            sequence.tokens.put(None)
            self._let_followers_in(sequence)
            last = len(self.active) - 1
            if row != last:
                for cache in self.caches:
                    cache[:, row] = cache[:, last]
            self.active[row] = self.active[last]
            self.active.pop()

    def _use_rows(self, start, stop):
        """Point every layer of the model at rows start..stop-1 of the engine's KV cache."""
        if (start, stop) not in self.views:
            self.views[(start, stop)] = [cache[:, start:stop] for cache in self.caches]
        for block, view in zip(self.model.blocks, self.views[(start, stop)]):
            block.attn.kv_cache = view

    def _tensor(self, rows):
        return torch.tensor(rows, dtype=torch.long, device=self.device)
