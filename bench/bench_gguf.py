"""
The GGUF file export.py writes, run by llama.cpp itself (through llama-cpp-python, which builds it from source):
its tokens, its greedy continuations and its perplexity against ours on the same model.

    pip install gguf llama-cpp-python
    python bench/bench_gguf.py --model=out-wikitext-tiny --data_dir=data/wikitext-2

1. Tokens: llama.cpp's tokenizer (read from the file) against ours on the first 200 lines of the test text.
2. Greedy continuations of three prompts, 40 tokens: llama.cpp's argmax step by step against sample.py's
   greedy path (model.generate_tokens with temperature 0), each after <|endoftext|> as our documents start.
3. Token perplexity of the test split as evaluate.py scores it (its windows and its function), and from
   llama.cpp's logits on the same windows.
"""

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import export  # noqa: E402
from checkpoint import load_model  # noqa: E402
from cli import UserError, parse_config, run_main, setting  # noqa: E402
from data import load_split  # noqa: E402
from evaluate import score_tokens, window_spans  # noqa: E402

PROMPTS = ("The history of", " = Valkyria Chronicles = \n", "In 1999 , the")


@dataclass
class BenchGgufConfig:
    model: str = "out-wikitext-tiny"     # a checkpoint folder
    data_dir: str = "data/wikitext-2"    # its data: the test split is scored
    gguf_type: str = setting("f32", choices=("f32", "f16", "q8_0"))  # the file's matrices
    new_tokens: int = 40                 # greedy tokens per prompt
    max_tokens: int = 0                  # score only the first N test tokens (0: all)
    work_dir: str = ""                   # default: a temporary folder


def main():
    config = parse_config(BenchGgufConfig)
    try:
        import llama_cpp
    except ImportError:
        raise UserError("this bench needs llama-cpp-python: pip install llama-cpp-python") from None
    root = Path(config.work_dir or tempfile.mkdtemp(prefix="bench-gguf-"))
    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_model(config.model)
    model.eval()
    path = root / f"model-{config.gguf_type}.gguf"
    arch = export.export_gguf(config.model, path, config.gguf_type)
    n_ctx = model.config.block_size
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=2)
    print(f"{config.model}: {model.num_params() / 1e6:.2f}M parameters, context {n_ctx}; GGUF {arch}, "
          f"{config.gguf_type}, {path.stat().st_size / 1e6:.1f} MB; llama-cpp-python {llama_cpp.__version__}")

    # 1. tokens
    ids = load_split(config.data_dir, "test")
    eot = tokenizer.eot_id
    text = tokenizer.decode([t for t in ids[:20000].tolist() if t != eot])
    lines = [line for line in text.split("\n")[:200] if line]
    same = sum(llm.tokenize(line.encode(), add_bos=False, special=False) == tokenizer.encode(line) for line in lines)
    print(f"tokens: llama.cpp's equal ours on {same}/{len(lines)} lines of the test text")

    # 2. greedy continuations
    agree = 0
    for prompt in PROMPTS:
        start = tokenizer.encode_document(prompt)
        with torch.no_grad():
            ours = [int(t) for t in model.generate_tokens(torch.tensor([start]), config.new_tokens, temperature=0.0)]
        llm.reset()
        llm.eval(start)
        theirs = []
        for _ in range(config.new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(token)
            llm.eval([token])
        agree += ours == theirs
        print(f"greedy after {prompt!r}: {'same' if ours == theirs else 'DIFFERENT'} "
              f"({sum(a == b for a, b in zip(ours, theirs))}/{len(ours)} tokens): {tokenizer.decode(ours)!r}")

    # 3. perplexity: evaluate.py's windows (block_size long, half a block apart, each token scored once), ours by
    # evaluate.py's own function, llama.cpp's from its logits on the same windows
    all_ids = ids[:config.max_tokens or None]
    t0 = time.time()
    nll_ours, count_ours = score_tokens(model, all_ids, skip_id=eot)
    nll_theirs, count = 0.0, 0
    T = min(n_ctx, len(all_ids) - 1)
    for start, first in window_spans(len(all_ids), n_ctx, max(1, n_ctx // 2)):
        window = all_ids[start:start + T + 1].tolist()
        llm.reset()
        llm.eval(window[:-1])
        logits = torch.from_numpy(np.array(llm.scores[:T], dtype=np.float32))
        targets = torch.tensor(window[1:])
        scored = (torch.arange(T) >= first - start - 1) & (targets != eot)
        nll_theirs += torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
        count += int(scored.sum())
    assert count == count_ours
    ppl_ours, ppl_theirs = math.exp(nll_ours / count), math.exp(nll_theirs / count)
    print(f"token perplexity of the test split ({count:,} tokens, evaluate.py's windows): evaluate.py {ppl_ours:.3f}, "
          f"llama.cpp {ppl_theirs:.3f} ({100 * (ppl_theirs / ppl_ours - 1):+.3f}%) in {time.time() - t0:.0f} s")
    print(f"greedy: {agree}/{len(PROMPTS)} prompts the same")


if __name__ == "__main__":
    run_main(main)
