"""
Text in, text out: a prompt becomes token ids, the model extends them, and the new ids come back as text, piece by
piece, never cutting a character in half. sample.py prints these pieces; serve.py sends them over HTTP. Also the
instruction template that finetune_instruct.py trains with and serve.py's chat endpoint writes.

    for piece in stream_text(model, tokenizer, "The history of", max_new_tokens=100, temperature=0.8, seed=1):
        print(piece, end="", flush=True)
"""

import codecs

import torch


def word_starts(tokenizer, word):
    """The token ids a text can start `word` with, after a space or not: never sampling them keeps the model from
    writing it (and from anything else that starts the same way).  word_starts(tok, "<unk>") -> [" <", "<"]'s ids"""
    return sorted({tokenizer.encode(" " + word)[0], tokenizer.encode(word)[0]})


def decode_stream(tokenizer, ids):
    """Text pieces for a stream of token ids. A character's UTF-8 bytes can be spread over several tokens: bytes
    wait in the decoder until they form whole characters, so no piece ends in half a character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        piece = decoder.decode(tokenizer.decode_bytes([token]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)  # bytes left over at the end can only be shown as U+FFFD
    if tail:
        yield tail


@torch.no_grad()
def generate_ids(model, ids, max_new_tokens=200, temperature=0.8, top_k=None, top_p=None, seed=None, eot_id=None,
                 use_cache=True, suppress_ids=None):
    """Yield new token ids (ints) after the prompt ids, stopping before eot_id or after max_new_tokens.
    top_k 0/None and top_p 1.0/None switch those filters off; a seed makes the samples reproducible; suppress_ids
    are never sampled."""
    device = model.token_emb.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    for token in model.generate_tokens(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                       top_p=top_p, use_cache=use_cache, generator=generator,
                                       suppress_ids=suppress_ids):
        token = token.item()
        if token == eot_id:
            return
        yield token


def stream_text(model, tokenizer, prompt, max_new_tokens=200, temperature=0.8, top_k=None, top_p=None, seed=None,
                stop_at_eot=True, use_cache=True):
    """Yield the text generated after `prompt` (a string, read as the start of a document, or token ids) piece by
    piece, stopping at end-of-text or after max_new_tokens. Joined, the pieces equal the decoded new tokens."""
    ids = tokenizer.encode_document(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("an empty prompt needs a tokenizer with an end-of-text token to start from")
    eot_id = tokenizer.eot_id if stop_at_eot else None
    return decode_stream(tokenizer, generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
                                                 use_cache))


def generate_text(model, tokenizer, prompt, **kwargs):
    """The text generated after `prompt`, all at once (stream_text's arguments)."""
    return "".join(stream_text(model, tokenizer, prompt, **kwargs))

# ----------------------------------------------------------------------------- the instruction template


def format_prompt(record):
    """The Alpaca template that finetune_instruct.py trains with (and serve.py's chat endpoint writes), up to where
    the response begins: {"instruction": "Name a color."} -> "Below is an instruction ... ### Response:\\n"."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{record['instruction']}")
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


def has_prompt_format(checkpoint):
    """Whether a checkpoint was instruction-tuned with format_prompt (finetune_instruct.py marks it)."""
    return checkpoint.get("prompt_format") == "alpaca" or "mask_prompt" in checkpoint.get("finetune_config", {})
