"""
Sample text from a trained model, streamed to stdout as it is generated.

    python sample.py --model=out-wikitext-tiny --start="The history of" --num_samples=3
    python sample.py --model=out-wikitext-tiny --start=FILE:prompt.txt --top_k=50 --top_p=0.95
    python sample.py --model=out-wikitext-tiny --quantize=int8     # int8 weights: faster on CPU
    python sample.py --model=gpt2 --start="Hello"                   # GPT-2 (downloaded once)

stdout gets the text and nothing else: each sample as the prompt followed by its continuation,
samples separated by a line of dashes. Timings and warnings go to stderr, so `python sample.py ... >
out.txt` and pipes work.

The prompt is preceded by the end-of-text token, which starts every document in training: the model
reads the prompt as the opening of a document, and an empty prompt starts a fresh one. Generation
stops at end-of-text. A prompt longer than the model's context keeps its last block_size tokens (a
warning on stderr says so).

A model trained on the tokenized WikiText-2 has learned its marker for rare words, <unk> (2.7% of
its words); its folder's meta.json names it, and sample.py never lets the model start one
(--allow_unk=True does).
"""

import os
import sys
import time
from dataclasses import dataclass

from checkpoint import unknown_word
from cli import UserError, parse_config, run_main, setting
from files import read_utf8
from generate import decode_stream, generate_ids, word_starts
from runtime import compile_decoding, load_for_inference

SEPARATOR = "\n---------------\n"


@dataclass
class SampleConfig:
    model: str = "out-wikitext-tiny"          # a train.py checkpoint folder, or a GPT-2 name or
                                              # folder
    start: str = ""                           # the prompt, or FILE:path to read it from a file
    num_samples: int = setting(1, low=1)      # samples to write, one after another
    max_new_tokens: int = setting(200, low=0)  # tokens per sample (fewer if the model writes
                                               # end-of-text)
    temperature: float = setting(0.8, low=0)  # 0: greedy, always the most likely token
    top_k: int = setting(200, low=0)          # sample among the k most likely tokens; 0: all
    top_p: float = setting(1.0, above=0, high=1)  # sample among the likeliest tokens up to this
                                                  # probability; 1: all
    seed: int = setting(1337, low=0, high=2**62)  # sample i uses seed + i, so each sample can be
                                                  # reproduced alone
    device: str = "auto"                      # auto: cuda, then mps, then cpu
    dtype: str = "auto"                       # float32 | bfloat16 | float16; auto: bf16 where the
                                              # hardware has it
    quantize: str = setting("none", choices=("none", "int8"))  # int8 weights for every linear
                                                               # layer, on the CPU
    compile: bool = False                     # torch.compile the decode step (CUDA graphs on a
                                              # GPU): for GPUs
    allow_unk: bool = False                   # let the model write its data's unknown-word marker
                                              # (<unk>)


# ----------------------------------------------------------------------------- command line

def read_prompt(start):
    """--start: the prompt itself, or FILE:path for the text of a file."""
    if start.startswith("FILE:"):
        return read_utf8(start[len("FILE:"):], "the prompt file")
    return start


def tee_into(items, seen):
    """Yield each item, appending it to the list `seen` too."""
    for item in items:
        seen.append(item)
        yield item


def main():
    config = parse_config(SampleConfig, renamed={"out_dir": "model"})
    prompt = read_prompt(config.start)
    model, tokenizer, _ = load_for_inference(config.model, config.device, config.dtype,
                                             config.quantize)
    # never sampling the tokens that start the data's marker for rare words keeps it out
    word = None if config.allow_unk else unknown_word(config.model)
    suppress = word_starts(tokenizer, word) if word else None
    sampling = dict(temperature=config.temperature, top_k=config.top_k or None,
                    top_p=config.top_p if config.top_p < 1 else None, suppress_ids=suppress)
    if config.compile:  # the step compiles once per sampling setting: for these, now
        compile_decoding(model, str(model.token_emb.weight.device), **sampling)
    ids = tokenizer.encode_document(prompt)
    if not ids:
        raise UserError("this tokenizer has no end-of-text token to start from: give a prompt with "
                        "--start")
    block = model.config.block_size
    if len(ids) > block:
        print(f"warning: the prompt is {len(ids)} tokens (with the leading end-of-text), longer "
              f"than the model's context of {block}: only its last {block} tokens are used",
              file=sys.stderr)

    if hasattr(sys.stdout, "reconfigure"):
        # the model writes UTF-8, whatever the terminal's locale
        sys.stdout.reconfigure(encoding="utf-8")
    for i in range(config.num_samples):
        print(SEPARATOR if i else "", prompt, sep="", end="", flush=True)
        t0, new_ids, last = time.time(), [], prompt
        tokens = generate_ids(model, ids, config.max_new_tokens, seed=config.seed + i,
                              eot_id=tokenizer.eot_id, **sampling)
        for piece in decode_stream(tokenizer, tee_into(tokens, new_ids)):
            print(piece, end="", flush=True)
            last = piece
        if not last.endswith("\n"):
            # end on a line break, so the shell prompt starts on a line of its own
            print(flush=True)
        seconds = time.time() - t0
        rate = len(new_ids) / seconds
        print(f"[sample {i + 1}: {len(new_ids)} tokens in {seconds:.2f} s, {rate:.1f} tokens/s]",
              file=sys.stderr)


if __name__ == "__main__":
    try:
        run_main(main)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
