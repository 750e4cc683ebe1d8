"""
Sample text from a trained model, streamed to stdout as it is generated.

    python sample.py --out_dir=out-wikitext-small --start="The history of" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-wikitext-small --start=FILE:prompt.txt --temperature=0.8 --top_k=50 --top_p=0.95
    python sample.py --out_dir=out-wikitext-small --quantize=int8     # int8 weights: faster on CPU
    python sample.py --out_dir=gpt2 --start="Hello"                   # OpenAI's GPT-2 (downloaded once)

stdout gets the text and nothing else: each sample as the prompt followed by its continuation, samples separated
by a line of dashes. Timings and warnings go to stderr, so `python sample.py ... > out.txt` and pipes work.

The prompt is preceded by the end-of-text token, which starts every document in training: the model reads the
prompt as the opening of a document, and an empty prompt starts a fresh one. Generation stops at end-of-text.
A prompt longer than the model's context keeps its last block_size tokens (a warning on stderr says so).

Other scripts import load_for_inference, encode_prompt, stream_text and generate_text from here.
"""

import codecs
import os
import sys
import time
from dataclasses import dataclass

import torch

from cli import UserError, parse_config, run_main
from model import is_gpt2, load_gpt2, load_model, pick_device, quantize_int8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEPARATOR = "\n---------------\n"


@dataclass
class SampleConfig:
    out_dir: str = "out"          # a train.py checkpoint folder, or gpt2 / gpt2-medium / ... / a GPT-2 folder
    start: str = ""               # the prompt, or FILE:path to read it from a file
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8      # 0: greedy, always the most likely token
    top_k: int = 200              # sample among the k most likely tokens; 0: all of them
    top_p: float = 1.0            # sample among the most likely tokens up to this total probability; 1.0: all
    seed: int = 1337              # sample i uses seed + i, so each sample can be reproduced alone
    device: str = "auto"          # auto: cuda, then mps, then cpu
    dtype: str = "auto"           # float32 | bfloat16 | float16; auto: bfloat16 (else float16) on a GPU, else float32
    quantize: str = "none"        # none | int8: int8 weights for every linear layer, the output head included (CPU)
    compile: bool = False         # torch.compile the forward pass: for GPUs (on CPU it only adds compile time)


# ----------------------------------------------------------------------------- loading a model for inference

def pick_dtype(dtype, device):
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    return DTYPES[dtype]


def load_for_inference(out_dir, device="auto", dtype="auto", quantize="none", compile=False):
    """(model, tokenizer, checkpoint dict) ready to generate or score: on `device`, weights in `dtype`, optionally
    int8 (CPU) and compiled. A GPT-2 model name or folder gives an empty checkpoint dict."""
    device = "cpu" if quantize == "int8" and device == "auto" else pick_device(device)
    ptdtype = pick_dtype(dtype, device)
    if quantize not in ("none", "int8"):
        raise UserError(f"--quantize must be none or int8, got '{quantize}'")
    if quantize == "int8" and (device != "cpu" or ptdtype != torch.float32):
        raise UserError("--quantize=int8 runs on the CPU in float32: add --device=cpu --dtype=float32 "
                        "(on a GPU use --dtype=bfloat16 instead)")
    if is_gpt2(out_dir):
        (model, tokenizer), checkpoint = load_gpt2(out_dir, device=device), {}
    else:
        model, tokenizer, checkpoint = load_model(out_dir, device)
    model.to(dtype=ptdtype)  # weights in the compute dtype: no autocast needed, and the KV cache follows them
    if quantize == "int8":
        quantize_int8(model)
    if compile:
        compile_forward(model, device)
    return model, tokenizer, checkpoint


def compile_forward(model, device):
    """torch.compile the model's forward in place (dynamic shapes: one graph for every length and cache position);
    if compiling fails here, say so and keep the eager model."""
    model.forward = torch.compile(model.forward, dynamic=True)
    try:
        # compile now, so a failure can fall back: the prompt step, then the one-token steps with a cache
        for _ in model.generate_tokens(torch.zeros(1, 3, dtype=torch.long, device=device), 3, temperature=0):
            pass
    except Exception as e:
        del model.forward  # the class's own forward again
        print(f"warning: torch.compile failed ({str(e).splitlines()[0][:120]}); running eagerly", file=sys.stderr)


# ----------------------------------------------------------------------------- prompt in, text out

def encode_prompt(tokenizer, prompt):
    """Token ids of the prompt, after the end-of-text token that opens every training document (if there is one)."""
    start = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    return start + tokenizer.encode(prompt)


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
                 use_cache=True):
    """Yield new token ids (ints) after the prompt ids, stopping before eot_id or after max_new_tokens.
    top_k 0/None and top_p 1.0/None switch those filters off; a seed makes the samples reproducible."""
    device = model.token_emb.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    for token in model.generate_tokens(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                       top_p=top_p, use_cache=use_cache, generator=generator):
        token = token.item()
        if token == eot_id:
            return
        yield token


def stream_text(model, tokenizer, prompt, max_new_tokens=200, temperature=0.8, top_k=None, top_p=None, seed=None,
                stop_at_eot=True, use_cache=True):
    """Yield the text generated after `prompt` (a string, or token ids as encode_prompt makes them) piece by piece,
    stopping at end-of-text or after max_new_tokens. Joined, the pieces equal the decoded new tokens."""
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("an empty prompt needs a tokenizer with an end-of-text token to start from")
    eot_id = tokenizer.eot_id if stop_at_eot else None
    return decode_stream(tokenizer, generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
                                                 use_cache))


def generate_text(model, tokenizer, prompt, **kwargs):
    """The text generated after `prompt`, all at once (stream_text's arguments)."""
    return "".join(stream_text(model, tokenizer, prompt, **kwargs))


# ----------------------------------------------------------------------------- command line

def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read the prompt file {path}: {e.strerror}")
    except UnicodeDecodeError:
        raise UserError(f"the prompt file {path} is not UTF-8 text")


def main():
    config = parse_config(SampleConfig)
    if config.num_samples < 1 or config.max_new_tokens < 0:
        raise UserError("--num_samples must be at least 1 and --max_new_tokens at least 0")
    if config.temperature < 0 or config.top_k < 0 or not 0 < config.top_p <= 1:
        raise UserError("--temperature and --top_k must be >= 0, and --top_p in (0, 1]")
    prompt = read_prompt(config.start)
    model, tokenizer, _ = load_for_inference(config.out_dir, config.device, config.dtype, config.quantize,
                                             config.compile)
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise UserError("this tokenizer has no end-of-text token to start from: give a prompt with --start")
    block = model.config.block_size
    if len(ids) > block:
        print(f"warning: the prompt is {len(ids)} tokens (with the leading end-of-text), longer than the model's "
              f"context of {block}: only its last {block} tokens are used", file=sys.stderr)

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")  # the model writes UTF-8, whatever the terminal's locale
    for i in range(config.num_samples):
        print(SEPARATOR if i else "", prompt, sep="", end="", flush=True)
        t0, new_ids, last = time.time(), [], prompt

        def counted(tokens):
            for token in tokens:
                new_ids.append(token)
                yield token

        tokens = generate_ids(model, ids, config.max_new_tokens, config.temperature, config.top_k, config.top_p,
                              config.seed + i, tokenizer.eot_id)
        for piece in decode_stream(tokenizer, counted(tokens)):
            print(piece, end="", flush=True)
            last = piece
        if not last.endswith("\n"):
            print(flush=True)  # end on a line break, so the shell prompt starts on a line of its own
        seconds = time.time() - t0
        print(f"[sample {i + 1}: {len(new_ids)} tokens in {seconds:.2f} s, {len(new_ids) / seconds:.1f} tokens/s]",
              file=sys.stderr)


if __name__ == "__main__":
    try:
        run_main(main)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
