"""
What each --trainable mode of finetune_classifier.py costs and buys: time per training step, the memory its
gradients and AdamW state take, and test accuracy, from a pretrained checkpoint and from random init.

    python bench/bench_finetune.py --model=out-wikitext-tiny --data=../shared/data/sms_spam/SMSSpamCollection
    python bench/bench_finetune.py --model=out-wikitext-tiny --data=... --modes=all --seeds=1,2,3,4,5

Every run is a full `python finetune_classifier.py` (its own defaults unless set here), one after another, and its
results.json is read back. Step time is the mean over all training steps (val excluded); memory is computed: 4 bytes
each for a trainable weight's gradient and AdamW's two moments (the weights themselves are the same for every mode).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: import the repo's modules by name

from bench_inference import machine_line  # noqa: E402
from cli import UserError, parse_config, run_main  # noqa: E402


@dataclass
class BenchFinetuneConfig:
    model: str = "out-wikitext-tiny"       # the pretrained checkpoint to compare with random init
    data: str = ""                         # labelled texts (empty: the SMS Spam Collection, downloaded)
    modes: str = "all,last_block,lora,head"  # --trainable modes to run, comma-separated
    scratch: bool = True                   # also train --trainable=all from random weights of the same shape
    seeds: str = "1,2,3"                   # one run per seed and mode, comma-separated
    learning_rate: float = 3e-4            # for all (and scratch)
    frozen_learning_rate: float = 1e-3     # for last_block, lora, head: fewer weights learn, and can take bigger steps
    num_epochs: int = 5                    # per run


def finetune(config, init_from, mode, seed, out_dir):
    lr = config.learning_rate if mode == "all" else config.frozen_learning_rate
    args = [sys.executable, os.path.join(ROOT, "finetune_classifier.py"), f"--model={init_from}",
            f"--trainable={mode}", f"--seed={seed}", f"--learning_rate={lr}", f"--num_epochs={config.num_epochs}",
            f"--out_dir={out_dir}", f"--data={config.data}"]
    if init_from == "scratch":
        args.append(f"--tokenizer_dir={config.model}")  # the pretrained model's tokenizer and (default) shape
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        raise UserError(f"finetune_classifier.py failed ({init_from}, {mode}, seed {seed}): "
                        f"{(run.stderr.strip() or run.stdout.strip()).splitlines()[-1]}")
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def main():
    config = parse_config(BenchFinetuneConfig)
    seeds = [int(s) for s in config.seeds.split(",")]
    runs = [(config.model, mode) for mode in config.modes.split(",")]
    runs += [("scratch", "all")] if config.scratch else []
    print(f"machine: {machine_line()}")
    print(f"data: {config.data or 'SMS Spam Collection'}; {config.num_epochs} epochs; seeds {config.seeds}\n",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for init_from, mode in runs:
            results = [finetune(config, init_from, mode, seed, os.path.join(tmp, "run")) for seed in seeds]
            accuracies = [r["test_accuracy"] * 100 for r in results]
            step_ms = statistics.mean(e["ms_per_step"] for r in results for e in r["epochs"])
            memory = 12 * results[0]["trainable_parameters"] / 2**20
            rows.append((init_from, mode, results[0]["trainable_parameters"], step_ms, memory, accuracies))
            print(f"{init_from} {mode}: test accuracy {', '.join(f'{a:.1f}%' for a in accuracies)}", flush=True)
    print(f"\n| init | trainable | trainable weights | ms/step | grads + AdamW | test accuracy (seeds {config.seeds}) "
          f"| mean |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for init_from, mode, trainable, step_ms, memory, accuracies in rows:
        print(f"| {init_from} | {mode} | {trainable / 1e6:.3f}M | {step_ms:.0f} | {memory:.1f} MiB | "
              f"{' / '.join(f'{a:.1f}%' for a in accuracies)} | {statistics.mean(accuracies):.1f}% |")


if __name__ == "__main__":
    run_main(main)
