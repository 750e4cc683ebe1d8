"""
Training throughput: our train.py against nanoGPT's, same shape, same memmaps, same machine, same
sitting.

    python bench/bench_train.py --data_dir=data/wikitext-2     # CPU: fp32 / bf16, compile off / on
    python bench/bench_train.py --device=cuda --shape=gpt2_124m --variants=bfloat16:True
    python bench/bench_train.py --variants=float32:False --recipes="--optimizer=muon" --nanogpt=
    python bench/bench_train.py --shape=smoke --variants=float32:False --iters=20 --warmup=5

Both loops are measured alike, from outside: each runs as a subprocess that reads its loss (a host
sync) and prints a log line every log_interval steps and nowhere else, and this bench notes when
each line arrives. The time from the first line after `warmup` steps to the last, over the steps
between them, is the run's ms/iter: a wall-clock difference between two synced points, so start-up,
compilation and evaluation drop out, and neither loop's own timer is trusted (nanoGPT's times one
step whose work may still be queued on the GPU). Rounds interleave the runs, the order flipped every
other round; the table gives the median and the min over rounds. nanoGPT's own train.py, unmodified,
runs beside ours (from ../shared/baselines/nanogpt when it is there) on the same data and shape.
"""

import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import UserError, parse_config, run_main, setting  # noqa: E402
from data import load_meta  # noqa: E402

# nanoGPT's default shape, GPT-2 small's, and one that only checks that the bench runs
SHAPES = {
    "nanogpt_default": dict(num_hidden_layers=4, num_attention_heads=4, hidden_size=256,
                            block_size=128, batch_size=16),
    "gpt2_124m": dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768,
                      block_size=1024, batch_size=16),
    "smoke": dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, block_size=32,
                  batch_size=4),
}
NANOGPT = ROOT.parent / "shared" / "baselines" / "nanogpt"
# log lines, each after a host sync. Ours: "iter 40/40: loss 7.7021, ..., 612.3 ms/iter, ...,
# MFU 40.5%, ..."; nanoGPT's: "iter 40: loss 7.7034, time 610.12ms, ..." (the end of its 41st step)
OUR_LINE = re.compile(r"^iter (\d+)/\d+: loss (\S+), .*?([\d.]+) ms/iter(?:.*MFU ([\d.]+)%)?")
NANOGPT_LINE = re.compile(r"^iter (\d+): loss (\S+), time ([\d.]+)ms")


@dataclass
class BenchTrainConfig:
    data_dir: str = "data/wikitext-2"     # memmaps from prepare.py, for both loops
    shape: str = setting("nanogpt_default", choices=tuple(SHAPES))  # smoke: checks the bench runs
    device: str = "cpu"                   # cpu | cuda
    iters: int = setting(40, low=2)       # steps per run
    warmup: int = setting(10, low=0)      # steps before the timed window: compilation, caches
    log_interval: int = setting(5, low=1)  # both loops sync on the loss every this many steps
    repeats: int = setting(5, low=1)      # rounds of all the runs, interleaved
    variants: str = "float32:False,bfloat16:False,float32:True,bfloat16:True"  # dtype:compile
    nanogpt: str = str(NANOGPT)           # nanoGPT's folder (or its run.sh); empty: skip it
    recipes: str = ""                     # train.py flags to time beside each variant, ';' between


@dataclass
class Run:
    """One timed run: the bench's ms/iter, the loop's own figure, its last loss, and the seconds a
    step would take at the device's peak (MFU x seconds per step, from our log lines; None where
    train.py shows no MFU)."""
    ms: float
    own_ms: float
    loss: float
    peak_seconds: float = None


def timed_lines(command, pattern, cwd=None):
    """Run command; [(arrival time, match)] for every line of its output that pattern matches."""
    # each line leaves the child as soon as it is printed
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, tail = [], []
    for line in process.stdout:
        now = time.perf_counter()
        tail = (tail + [line])[-40:]
        found = pattern.match(line)
        if found:
            lines.append((now, found))
    if process.wait() != 0:
        raise SystemExit(f"{command[1]} failed:\n{''.join(tail)[-2000:]}")
    return lines


def window(lines, steps_done, config):
    """ms/iter from the first log line at >= warmup steps done to the last one, and the lines from
    the first to the last."""
    timed = [(t, steps_done(m), m) for t, m in lines if steps_done(m) >= config.warmup]
    if len(timed) < 2:
        raise UserError(f"fewer than two log lines after {config.warmup} warm-up steps: give "
                        f"--iters at least --warmup + --log_interval, a multiple of --log_interval")
    (t0, s0, _), (t1, s1, _) = timed[0], timed[-1]
    return (t1 - t0) / (s1 - s0) * 1000, [m for _, _, m in timed]


def run_ours(config, dtype, compile_, out_dir, recipe=""):
    shape = SHAPES[config.shape]
    args = [f"--{k}={v}" for k, v in shape.items()] + recipe.split() + [
        f"--data_dir={config.data_dir}", f"--out_dir={out_dir}", f"--device={config.device}",
        f"--dtype={dtype}", f"--compile={compile_}", f"--max_iters={config.iters}",
        "--eval_interval=100000", "--eval_iters=1", f"--log_interval={config.log_interval}",
        "--dropout=0.0", "--bias=False", "--gradient_accumulation_steps=1"]
    lines = timed_lines([sys.executable, str(ROOT / "train.py"), *args], OUR_LINE)
    ms, logged = window(lines, lambda m: int(m.group(1)), config)
    # each line's ms/iter covers the steps since the line before
    own = statistics.median(float(m.group(3)) for m in logged[1:])
    peak = [float(m.group(4)) / 100 * float(m.group(3)) / 1000 for m in logged if m.group(4)]
    return Run(ms, own, float(logged[-1].group(2)), statistics.median(peak) if peak else None)


def nanogpt_folder(config):
    """The folder of nanoGPT's train.py that --nanogpt names (the folder or its run.sh), or None."""
    path = Path(config.nanogpt)
    return next((folder for folder in (path, path.parent) if (folder / "train.py").is_file()), None)


def run_nanogpt(config, vocab_size):
    """nanoGPT's train.py, unmodified, in a scratch folder laid out as it expects (data/x/ with our
    memmaps and a meta.pkl of the vocab size, as its run.sh does); its own settings for the device
    (bf16 and compile on a GPU), with our shape, step count and log interval."""
    shape, source = SHAPES[config.shape], nanogpt_folder(config)
    on_gpu = config.device != "cpu"
    args = [f"--n_layer={shape['num_hidden_layers']}", f"--n_head={shape['num_attention_heads']}",
            f"--n_embd={shape['hidden_size']}", f"--block_size={shape['block_size']}",
            f"--batch_size={shape['batch_size']}", "--gradient_accumulation_steps=1",
            "--dropout=0.0", f"--dtype={'bfloat16' if on_gpu else 'float32'}",
            f"--compile={on_gpu}", f"--device={config.device}", f"--max_iters={config.iters}",
            f"--log_interval={config.log_interval}", "--eval_iters=1", "--eval_interval=100000",
            "--dataset=x"]
    with tempfile.TemporaryDirectory() as work:
        for name in ("model.py", "train.py", "configurator.py"):
            shutil.copy(source / name, work)
        data = Path(work) / "data" / "x"
        data.mkdir(parents=True)
        for split in ("train", "val"):
            (data / f"{split}.bin").symlink_to(Path(config.data_dir).resolve() / f"{split}.bin")
        with open(data / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": vocab_size}, f)
        command = [sys.executable, "train.py", *args, f"--out_dir={work}/out"]
        lines = timed_lines(command, NANOGPT_LINE, cwd=work)
    ms, logged = window(lines, lambda m: int(m.group(1)) + 1, config)
    # nanoGPT's own figure: the one step before each sync
    own = statistics.median(float(m.group(3)) for m in logged)
    return Run(ms, own, float(logged[-1].group(2)))


def run_names(config):
    """[(variant, recipe)] in the order of one round; nanoGPT's is ("nanoGPT", "")."""
    recipes = ["", *filter(None, (r.strip() for r in config.recipes.split(";")))]
    names = [("nanoGPT", "")] if config.nanogpt else []
    return names + [(v, recipe) for v in config.variants.split(",") for recipe in recipes]


def run_one(config, name, vocab_size):
    variant, recipe = name
    if variant == "nanoGPT":
        return run_nanogpt(config, vocab_size)
    dtype, compile_ = variant.split(":")
    with tempfile.TemporaryDirectory() as out_dir:
        return run_ours(config, dtype, compile_, out_dir, recipe)


def main():
    config = parse_config(BenchTrainConfig)
    if config.nanogpt and not nanogpt_folder(config):
        print(f"no nanoGPT train.py at {config.nanogpt}: timing ours only", file=sys.stderr)
        config.nanogpt = ""
    meta = load_meta(config.data_dir)
    names = run_names(config)
    runs = {name: [] for name in names}
    for round_ in range(1, config.repeats + 1):
        # interleaved, the order flipped every other round: a slow spell favours no run
        for name in names if round_ % 2 else names[::-1]:
            run = run_one(config, name, meta["vocab_size"])
            runs[name].append(run)
            print(f"round {round_}, {' '.join(name).strip()}: {run.ms:.2f} ms/iter (its own "
                  f"log: {run.own_ms:.2f}), last loss {run.loss:.3f}", file=sys.stderr, flush=True)
    print_table(config, runs, meta["vocab_size"])


def run_label(variant, recipe):
    if variant == "nanoGPT":
        return "nanoGPT train.py (its settings for this device)"
    dtype, compile_ = variant.split(":")
    return f"ours, {dtype}, compile={compile_}" + (f", {recipe}" if recipe else "")


def print_table(config, runs, vocab_size):
    shape = SHAPES[config.shape]
    tokens_per_iter = shape["batch_size"] * shape["block_size"]
    median = {name: statistics.median(r.ms for r in rs) for name, rs in runs.items()}
    base = runs.get(("nanoGPT", ""))
    # nanoGPT's MFU counts the FLOPs of our first run: the same shape
    first_peak = next((r.peak_seconds for rs in runs.values() for r in rs if r.peak_seconds), None)
    print(f"\nshape {config.shape} ({shape}), vocab {vocab_size}, device {config.device}, "
          f"{tokens_per_iter} tokens/iter. Both loops sync on the loss every "
          f"{config.log_interval} steps; a run's ms/iter is the wall time from its log line after "
          f"step {config.warmup} to its last, over the steps between; {config.repeats} "
          f"interleaved round(s): median and min. 'vs nanoGPT': ours' ms/iter over nanoGPT's in "
          f"the same round, the median over the rounds (< 1: ours is faster). 'its own log': the "
          f"loop's own ms/iter, for comparison.\n")
    print("| run | ms/iter (median) | min | tokens/s | vs nanoGPT | recipe vs plain | MFU | "
          "its own log | last loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (variant, recipe), results in runs.items():
        ms = median[(variant, recipe)]
        versus = "-"
        if base and variant != "nanoGPT":
            versus = f"{statistics.median(r.ms / b.ms for r, b in zip(results, base)):.3f}x"
        # > 1: the recipe's step is slower
        recipe_cost = f"{ms / median[(variant, '')]:.2f}x" if recipe else "-"
        peak = results[0].peak_seconds or (first_peak if variant == "nanoGPT" else None)
        mfu = f"{peak / (ms / 1000) * 100:.1f}%" if peak else "-"
        own = statistics.median(r.own_ms for r in results)
        print(f"| {run_label(variant, recipe)} | {ms:.2f} | {min(r.ms for r in results):.2f} | "
              f"{tokens_per_iter / ms * 1000:,.0f} | {versus} | {recipe_cost} | {mfu} | "
              f"{own:.2f} | {results[-1].loss:.3f} |")
    print("\nMFU: train.py's FLOPs per step over the bench's ms/iter and the device's peak; '-' "
          "where train.py knows no peak for the device.")


if __name__ == "__main__":
    run_main(main)
