"""
Text in, text out: a prompt becomes token ids, the model extends them, and the new ids come back as
text, piece by piece, never cutting a character in half. sample.py prints these pieces; serve.py
sends them over HTTP, with stop strings and each token's log-probability (Completion, for requests
that engine.py decodes together). Also the instruction template that finetune_instruct.py trains
with, and the chat messages that serve.py turns into it.

    for piece in stream_text(model, tokenizer, "The history of", max_new_tokens=100, seed=1):
        print(piece, end="", flush=True)
"""

import codecs
import itertools

import torch

CHECK_EVERY = 8  # tokens read back from a GPU at once (generate_ids)


def word_starts(tokenizer, word):
    """The token ids a text can start `word` with, after a space or not: never sampling them keeps
    the model from writing it (and anything else that starts the same way).

        word_starts(tokenizer, "<unk>") -> the ids of " <" and "<"
    """
    return sorted({tokenizer.encode(" " + word)[0], tokenizer.encode(word)[0]})


def decode_stream(tokenizer, ids):
    """Text pieces for a stream of token ids. A character's UTF-8 bytes can be spread over several
    tokens: bytes wait in the decoder until they form whole characters, so no piece ends in half a
    character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        piece = decoder.decode(tokenizer.decode_bytes([token]))
        if piece:
            yield piece
    # bytes left over at the end can only be shown as U+FFFD
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


class StopStrings:
    """Streamed text cut at the first of some stop strings (left out). Text that could be the start
    of one waits until the next piece settles it; `found` says whether one was found.

        stops = StopStrings([". B"]); list(stops.cut(["Hel", "lo. Bye", "!"])) -> ["Hel", "lo"]
    """

    def __init__(self, stops):
        self.stops, self.found = stops, False

    def cut(self, pieces):
        held = ""
        for piece in pieces:
            held += piece
            starts = [i for i in (held.find(stop) for stop in self.stops) if i >= 0]
            if starts:
                self.found = True
                if min(starts):
                    yield held[:min(starts)]
                return
            # the longest end of the held text that starts a stop string waits for the next piece
            keep = max((len(held) - i for stop in self.stops
                        for i in range(max(len(held) - len(stop) + 1, 0), len(held))
                        if stop.startswith(held[i:])), default=0)
            if len(held) > keep:
                yield held[:len(held) - keep]
                held = held[len(held) - keep:]
        if held:
            yield held


@torch.no_grad()
def generate_ids(model, ids, max_new_tokens=200, temperature=0.8, top_k=None, top_p=None, seed=None,
                 eot_id=None, use_cache=True, suppress_ids=None, check_every=None):
    """Yield new token ids (ints) after the prompt ids, stopping before eot_id or after
    max_new_tokens. top_k 0/None and top_p 1.0/None switch those filters off; a seed makes the
    samples reproducible; suppress_ids are never sampled. The ids are read back check_every at a
    time (None: CHECK_EVERY on a GPU, which then decodes on while the host waits for nothing; 1
    on a CPU): at most check_every - 1 tokens past end-of-text are made, and dropped."""
    device = model.token_emb.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    steps = model.generate_tokens(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                  top_p=top_p, use_cache=use_cache, generator=generator,
                                  suppress_ids=suppress_ids)
    # (a CPU's read costs nothing)
    every = check_every or (1 if device.type == "cpu" else CHECK_EVERY)
    while pending := list(itertools.islice(steps, every)):
        for token in torch.cat(pending).tolist():  # one host sync for them all
            if token == eot_id:
                return
            yield token


def stream_text(model, tokenizer, prompt, max_new_tokens=200, temperature=0.8, top_k=None,
                top_p=None, seed=None, stop_at_eot=True, use_cache=True):
    """Yield the text generated after `prompt` (a string, read as the start of a document, or token
    ids) piece by piece, stopping at end-of-text or after max_new_tokens. Joined, the pieces equal
    the decoded new tokens."""
    ids = tokenizer.encode_document(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("an empty prompt needs a tokenizer with an end-of-text token to start "
                         "from")
    eot_id = tokenizer.eot_id if stop_at_eot else None
    new_ids = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
                           use_cache)
    return decode_stream(tokenizer, new_ids)


def generate_text(model, tokenizer, prompt, **kwargs):
    """The text generated after `prompt`, all at once (stream_text's arguments)."""
    return "".join(stream_text(model, tokenizer, prompt, **kwargs))


class Completion:
    """A prompt's generation by a BatchEngine (engine.py), as text. Iterate for (text, rows) pieces:
    with echo the prompt first, then the new text up to a stop string; with logprobs=k, the rows of
    the tokens read since the last piece (else None). Then finish_reason is set ("stop": end of
    text or a stop string; "length": max_new_tokens), and rows() gives the whole text's. A row is
    (a token's text, its log-probability, {the k likeliest tokens: theirs}, its offset in the text).
    A text prompt starts after <|endoftext|> (as documents do in training): that token is not
    echoed, and the text's first token is scored; a token-id prompt is taken as it is, its first
    token unscored.

        for text, rows in Completion(engine, tokenizer, "Hi", ids, [". "], max_new_tokens=20): ...
    """

    def __init__(self, engine, tokenizer, text, ids, stops=(), logprobs=None, echo=False,
                 **sampling):
        self.tokenizer, self.ids, self.logprobs, self.echo = tokenizer, ids, logprobs, echo
        self.prompt = text if text is not None else tokenizer.decode(ids)
        self.hidden = 0 if text is None else 1  # the <|endoftext|> a text prompt starts after
        self.sequence = engine.submit(ids, stop_id=tokenizer.eot_id, logprobs=logprobs,
                                      score_prompt=echo and logprobs is not None, **sampling)
        self.stops = StopStrings(stops)
        self.text, self.new_rows, self.finish_reason = "", [], None

    def __iter__(self):
        try:
            if self.echo and self.prompt:
                yield self.prompt, self.prompt_rows()
            read = 0
            for piece in self.stops.cut(decode_stream(self.tokenizer, self.new_tokens())):
                self.text += piece
                yield piece, None if self.logprobs is None else self.new_rows[read:]
                read = len(self.new_rows)
            self.finish_reason = "stop" if self.stops.found else self.sequence.finish_reason
        finally:
            self.sequence.close()  # a stop string, or a reader gone: the engine frees its row

    def new_tokens(self):
        """The engine's new token ids, each one's row kept (with logprobs)."""
        for token in self.sequence:
            if self.logprobs is not None:
                score = self.sequence.scores[len(self.new_rows)]
                self.new_rows += self.token_rows([token], [score], self.offset_after(self.new_rows))
            yield token

    def prompt_rows(self):
        """The prompt's rows (with logprobs), once the engine has scored it."""
        if self.logprobs is None:
            return None
        scores = self.sequence.scored_prompt()[self.hidden:]
        return self.token_rows(self.ids[self.hidden:], scores, 0)

    def rows(self):
        """The whole text's rows: the prompt's (with echo), the new tokens' up to where the text
        ends (a stop string), and the end-of-text token that ended it (as OpenAI counts it)."""
        if self.logprobs is None:
            return None
        rows = [row for row in self.new_rows if row[3] < len(self.prompt) + len(self.text)]
        if self.sequence.finish_reason == "stop" and not self.stops.found:
            eot = self.sequence.scores[len(self.new_rows):]
            rows += self.token_rows([self.tokenizer.eot_id], eot, self.offset_after(rows))
        return (self.prompt_rows() if self.echo else []) + rows

    def token_rows(self, tokens, scores, offset):
        rows = []
        for token, score in zip(tokens, scores):
            text = self.tokenizer.decode([token])
            top = None if score is None else {self.tokenizer.decode([i]): lp for i, lp in score[1]}
            rows.append((text, None if score is None else score[0], top, offset))
            offset += len(text)  # a character split over tokens counts as U+FFFD
        return rows

    def offset_after(self, rows):
        return rows[-1][3] + len(rows[-1][0]) if rows else len(self.prompt)

# ------------------------------------------------------------------------- the instruction template


def format_prompt(record):
    """The Alpaca template that finetune_instruct.py trains with (and serve.py's chat endpoint
    writes), up to where the response begins:

        {"instruction": "Name a color."} -> "Below is an instruction ... ### Response:\\n"
    """
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{record['instruction']}")
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


def chat_to_prompt(messages):
    """format_prompt for OpenAI chat messages: the last user message is the instruction, the earlier
    ones its input, as a "role: text" transcript. A message's content is a string or a list of text
    parts; anything else is a ValueError.

        chat_to_prompt([{"role": "user", "content": "Hi"}]) -> format_prompt({"instruction": "Hi"})
    """
    turns = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict)
                and message.get("role") in ("system", "user", "assistant")):
            raise ValueError(f"messages[{i}] must be an object with a role of system, user or "
                             f"assistant")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string (or a list of text parts)")
        turns.append((message["role"], content))
    if turns[-1][0] != "user":
        raise ValueError("messages must end with the user's: it is the instruction the model "
                         "answers")
    context = "\n".join(f"{role}: {content}" for role, content in turns[:-1])
    return format_prompt({"instruction": turns[-1][1], "input": context})


def has_prompt_format(checkpoint):
    """Whether a checkpoint was instruction-tuned with format_prompt (finetune_instruct.py marks
    it)."""
    return checkpoint.get("prompt_format") == "alpaca" or "mask_prompt" in checkpoint.get(
        "finetune_config", {})
