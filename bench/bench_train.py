"""
Training throughput: our train.py against nanoGPT's, same shape, same memmaps, same machine, same sitting.

    python bench/bench_train.py --data_dir=data/wikitext-2                       # CPU: fp32 / bf16, compile off / on
    python bench/bench_train.py --data_dir=data/wikitext-2 --device=cuda --shape=gpt2_124m
    python bench/bench_train.py --variants=float32:False --recipes="--position=rope;--optimizer=muon" --nanogpt=

Runs each variant as a subprocess for `iters` steps and takes the median ms/iter over steps >= 10 (compilation
and warm-up excluded), and with --repeats the median over interleaved rounds. nanoGPT runs through
../shared/baselines/nanogpt/run.sh when it is there.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import parse_config, run_main  # noqa: E402
from data import load_meta  # noqa: E402

SHAPES = {  # the baseline script's default shape, and GPT-2 small's
    "nanogpt_default": dict(num_hidden_layers=4, num_attention_heads=4, hidden_size=256, block_size=128, batch_size=16),
    "gpt2_124m": dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768, block_size=1024, batch_size=16),
}


@dataclass
class BenchTrainConfig:
    data_dir: str = "data/wikitext-2"     # memmaps from prepare.py, for both loops
    shape: str = "nanogpt_default"        # nanogpt_default | gpt2_124m (SHAPES above)
    device: str = "cpu"                   # cpu | cuda
    iters: int = 40                       # steps per run; the median over steps > 10 counts
    repeats: int = 1                      # rounds of all the runs, interleaved
    variants: str = "float32:False,bfloat16:False,float32:True,bfloat16:True"  # dtype:compile pairs
    nanogpt: str = str(ROOT.parent / "shared" / "baselines" / "nanogpt" / "run.sh")  # nanoGPT's runner; empty: skip
    recipes: str = ""                     # train.py flags to time beside each plain variant, recipes split by ';'


def run_ours(config, dtype, compile_, out_dir, recipe=""):
    shape = SHAPES[config.shape]
    args = [f"--{k}={v}" for k, v in shape.items()] + recipe.split() + [
        f"--data_dir={config.data_dir}", f"--out_dir={out_dir}", f"--device={config.device}", f"--dtype={dtype}",
        f"--compile={compile_}", f"--max_iters={config.iters}", "--eval_interval=100000", "--eval_iters=1",
        "--log_interval=1", "--dropout=0.0", "--bias=False", "--gradient_accumulation_steps=1"]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train.py failed:\n{result.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    ms = [r["ms_per_iter"] for r in rows if "ms_per_iter" in r and r["iter"] > 10]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    mfu = [r["mfu"] for r in rows if "mfu" in r and r["iter"] > 10]
    return statistics.median(ms), losses[-1], (statistics.median(mfu) if mfu else None)


def run_nanogpt(config, vocab_size):
    shape = SHAPES[config.shape]
    extra = [f"--n_layer={shape['num_hidden_layers']}", f"--n_head={shape['num_attention_heads']}",
             f"--n_embd={shape['hidden_size']}", f"--block_size={shape['block_size']}",
             f"--batch_size={shape['batch_size']}", f"--max_iters={config.iters}", f"--device={config.device}"]
    if config.device != "cpu":  # nanoGPT's best GPU settings: bf16 + compile
        extra += ["--dtype=bfloat16", "--compile=True"]
    env = {**os.environ, "PYTHON": sys.executable}  # nanoGPT runs on this bench's own interpreter (and its torch)
    result = subprocess.run(["bash", config.nanogpt, config.data_dir, str(vocab_size), *extra], capture_output=True,
                            text=True, env=env)
    found = re.search(r"nanoGPT median ms/iter: ([\d.]+)", result.stdout)
    if not found:
        raise SystemExit(f"nanoGPT run failed:\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
    return float(found.group(1))


def main():
    config = parse_config(BenchTrainConfig)
    meta = load_meta(config.data_dir)
    shape = SHAPES[config.shape]
    tokens_per_iter = shape["batch_size"] * shape["block_size"]
    recipes = ["", *filter(None, (r.strip() for r in config.recipes.split(";")))]
    runs = {}  # (variant, recipe) -> [(ms, loss, mfu)], one per round; nanoGPT's variant is "nanoGPT"
    for round_ in range(1, config.repeats + 1):  # rounds interleave the runs, so a slow spell hits them all alike
        if os.path.exists(config.nanogpt):
            ms = run_nanogpt(config, meta["vocab_size"])
            runs.setdefault(("nanoGPT", ""), []).append((ms, None, None))
            print(f"round {round_}, nanoGPT: {ms:.1f} ms/iter", file=sys.stderr)
        for variant in config.variants.split(","):
            dtype, compile_ = variant.split(":")
            for recipe in recipes:
                with tempfile.TemporaryDirectory() as out_dir:
                    ms, loss, mfu = run_ours(config, dtype, compile_, out_dir, recipe)
                runs.setdefault((variant, recipe), []).append((ms, loss, mfu))
                print(f"round {round_}, {variant} {recipe}: {ms:.1f} ms/iter, last loss {loss:.3f}", file=sys.stderr)
    median = {key: statistics.median(r[0] for r in results) for key, results in runs.items()}

    base = median.get(("nanoGPT", ""))
    print(f"\nshape {config.shape} ({shape}), vocab {meta['vocab_size']}, device {config.device}, "
          f"{tokens_per_iter} tokens/iter; per run the median ms over iterations 11..{config.iters}, then the median "
          f"over {config.repeats} interleaved round(s)\n")
    print("| run | ms/iter | tokens/s | vs nanoGPT | recipe vs plain | MFU | loss at last iter |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (variant, recipe), results in runs.items():
        ms, (_, loss, mfu) = median[(variant, recipe)], results[-1]
        if variant == "nanoGPT":
            name = "nanoGPT train.py (its defaults for this device)"
        else:
            dtype, compile_ = variant.split(":")
            name = f"ours, {dtype}, compile={compile_}" + (f", {recipe}" if recipe else "")
        ratio = f"{base / ms:.2f}x" if base else "-"
        versus = f"{ms / median[(variant, '')]:.2f}x" if recipe else "-"  # > 1: the recipe's step is slower
        print(f"| {name} | {ms:.1f} | {tokens_per_iter / ms * 1000:,.0f} | {ratio} | {versus} | "
              f"{f'{mfu * 100:.1f}%' if mfu else '-'} | {f'{loss:.3f}' if loss is not None else '-'} |")


if __name__ == "__main__":
    run_main(main)
