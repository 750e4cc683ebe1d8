"""
Benchmark tokenizer.py against Hugging Face `tokenizers` (training) and tiktoken / HF (encoding).

    python bench/bench_tokenizer.py [--corpus=PATH] [--repeats=3]

1. Training: ours and HF's ByteLevelBPETokenizer on the same corpus and settings, alternating, each run in a fresh
   subprocess (so neither inherits the other's memory or threads); best of --repeats, and our peak RSS.
2. Encoding throughput on WikiText-2 raw valid: ours (tiktoken core, our merges), tiktoken GPT-2 (from the local
   GPT-2 files), our pure-Python reference encoder (on a slice), HF (our files loaded into HF).
3. Agreement: fast encoder == reference encoder (and == HF) on the whole of wiki.valid.raw.
Prints a markdown table at the end.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import the repo's modules

import cli  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402
from workers import cpu_count, end_pool, worker_pool  # noqa: E402

DATA = REPO.parent / "shared" / "data"


@dataclass
class BenchTokenizerConfig:
    corpus: str = str(DATA / "wikitext-2" / "wiki.train.tokens")      # training text
    encode_text: str = str(DATA / "wikitext-2-raw" / "wiki.valid.raw")  # text for throughput and agreement
    gpt2_dir: str = str(DATA / "gpt2")                                  # encoder.json + vocab.bpe
    vocab_size: int = 8192           # ids in all, for both trainers
    min_frequency: int = 2           # a pair must occur this often to become a merge
    repeats: int = 3                 # trainings per tokenizer; the best counts
    reference_chars: int = 200_000   # the pure-Python encoder is timed on this much text
    child: str = ""                  # internal: "ours" or "hf" trains once in this process and prints JSON
    child_out: str = ""              # internal: where that child saves its files


def peak_rss_mb():
    """Peak resident memory of this process, and of its largest child process (the counting workers), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def train_once(config, out_dir):
    """One training run in this process; prints {seconds, rss} as JSON for the parent."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    if config.child == "ours":
        # counted on a pool of workers, as tokenizer.py --train does
        pool = worker_pool(min(8, cpu_count()))
        try:
            tok = BPETokenizer.train(Path(config.corpus), config.vocab_size, config.min_frequency,
                                     pool=pool)
        finally:
            end_pool(pool)
        seconds, vocab_size = time.perf_counter() - t0, tok.vocab_size
        tok.save(out_dir)
    else:
        from tokenizers import ByteLevelBPETokenizer
        tok = ByteLevelBPETokenizer()
        tok.train([config.corpus], vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                  special_tokens=["<|endoftext|>"], show_progress=False)
        seconds, vocab_size = time.perf_counter() - t0, tok.get_vocab_size()
        tok.save_model(out_dir)
    own, children = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "vocab_size": vocab_size, "rss_mb": own, "child_rss_mb": children}))


def run_child(config, which, out_dir):
    cmd = [sys.executable, __file__, f"--child={which}", f"--corpus={config.corpus}", f"--vocab_size={config.vocab_size}",
           f"--min_frequency={config.min_frequency}", f"--child_out={out_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise cli.UserError(f"{which} training failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def throughput(fn, text, repeats):
    """MB/s of fn(text), best of repeats."""
    best = min(timed(fn, text) for _ in range(repeats))
    return len(text.encode("utf-8")) / best / 1e6


def timed(fn, arg):
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def gpt2_tiktoken(gpt2_dir):
    """tiktoken's own GPT-2 encoding, built from local files (get_encoding would download them)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files as they are, no cache copy
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(Path(gpt2_dir) / "vocab.bpe"),
                                            encoder_json_file=str(Path(gpt2_dir) / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def bench_training(config, out_dir):
    """Train ours and HF alternately (so both see the same machine load); returns each one's list of runs."""
    runs = {"ours": [], "hf": []}
    for i in range(config.repeats):
        for which in runs:
            runs[which].append(run_child(config, which, out_dir / which))
            r = runs[which][-1]
            print(f"  run {i + 1} {which:4s}: {r['seconds']:.2f} s, vocab {r['vocab_size']}, "
                  f"peak RSS {r['rss_mb']:.0f} MB (largest worker process {r['child_rss_mb']:.0f} MB)")
    return runs


def bench_encoding(config, tok, hf_tok, text):
    """MB/s of each encoder: (one call on the whole text, one batch call on pieces of 100 lines)."""
    lines = text.splitlines(keepends=True)
    pieces = ["".join(lines[i:i + 100]) for i in range(0, len(lines), 100)]
    gpt2 = gpt2_tiktoken(config.gpt2_dir)
    encoders = {
        "ours (tiktoken core, our merges)": (tok.encode, tok.encode_batch),
        "tiktoken GPT-2": (gpt2.encode_ordinary, gpt2.encode_ordinary_batch),
        "HF tokenizers (our files loaded in HF)": (lambda t: hf_tok.encode(t).ids, hf_tok.encode_batch),
    }
    speeds = {name: (throughput(one, text, config.repeats), throughput(lambda _: batch(pieces), text, config.repeats))
              for name, (one, batch) in encoders.items()}
    sample = text[:config.reference_chars]
    speeds[f"ours, pure-Python reference (first {len(sample) // 1000} k chars)"] = (
        throughput(tok.encode_reference, sample, 1), None)
    return speeds


def main():
    config = cli.parse_config(BenchTokenizerConfig)
    if config.child:
        return train_once(config, config.child_out)
    for path in (config.corpus, config.encode_text):
        if not Path(path).is_file():
            raise cli.UserError(f"file not found: {path}")
    from tokenizers import ByteLevelBPETokenizer

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    corpus, text_name = Path(config.corpus), Path(config.encode_text).name
    print(f"training on {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), vocab {config.vocab_size}, "
          f"min_frequency {config.min_frequency}, {cpus} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp:
        runs = bench_training(config, Path(tmp))
        tok = BPETokenizer.load(Path(tmp) / "ours")
        hf_tok = ByteLevelBPETokenizer(str(Path(tmp) / "ours" / "vocab.json"), str(Path(tmp) / "ours" / "merges.txt"))
    ours, hf = (min(r["seconds"] for r in runs[which]) for which in ("ours", "hf"))
    rss, child_rss = (max(r[key] for r in runs["ours"]) for key in ("rss_mb", "child_rss_mb"))
    print(f"best of {config.repeats}: ours {ours:.2f} s, HF {hf:.2f} s, ratio ours/HF {ours / hf:.2f}")

    text = Path(config.encode_text).read_text(encoding="utf-8")
    speeds = bench_encoding(config, tok, hf_tok, text)
    t0 = time.perf_counter()
    fast = tok.encode(text)
    agree, hf_agree = fast == tok.encode_reference(text), fast == hf_tok.encode(text).ids
    print(f"fast == reference on all of {text_name} ({len(fast):,} tokens): {agree}; fast == HF: {hf_agree} "
          f"({time.perf_counter() - t0:.1f} s)")

    print(f"\n| training on {corpus.name}, vocab {config.vocab_size}, min_frequency {config.min_frequency}, {cpus} CPUs "
          f"| best of {config.repeats} |")
    print("| --- | ---: |")
    print(f"| tokenizer.py (Python; pre-tokenization on {min(8, cpus)} processes) | {ours:.2f} s |")
    print(f"| HF tokenizers ByteLevelBPETokenizer (Rust, multi-threaded) | {hf:.2f} s |")
    print(f"| ratio ours / HF | {ours / hf:.2f} |")
    print(f"| peak RSS of our training: main process / largest worker | {rss:.0f} MB / {child_rss:.0f} MB |")
    print(f"\n| encoding {text_name} | MB/s, one call | MB/s, batch of 100-line pieces |")
    print("| --- | ---: | ---: |")
    for name, (one, batch) in speeds.items():
        print(f"| {name} | {one:.1f} | {'-' if batch is None else f'{batch:.1f}'} |")
    if not (agree and hf_agree):
        raise SystemExit("error: the encoders disagree")


if __name__ == "__main__":
    cli.run_main(main)
