"""
lm-evaluation-harness on one model two ways: through serve.py's OpenAI API (its `local-completions` model, as it
scores vLLM) and on the folder export.py writes (its `--model hf`, transformers). Same task, same tokens: the
accuracies and every item's log-likelihood must agree.

    pip install lm-eval
    python bench/bench_lm_eval.py --model=out-wikitext-tiny

The task is made here: --items two-choice questions (JSON lines) built from the model's own test text: a context of
the text, the words that follow it (right) and words from elsewhere in the text (wrong). lm-eval runs on the CPU.
"""

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import export  # noqa: E402
from checkpoint import load_model  # noqa: E402
from cli import UserError, parse_config, run_main  # noqa: E402


@dataclass
class BenchLmEvalConfig:
    model: str = "out-wikitext-tiny"      # a checkpoint folder
    text: str = str(REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens")  # where items come from
    items: int = 20                       # two-choice questions
    context_words: int = 12               # words of context per question
    answer_words: int = 3                 # words in each choice
    work_dir: str = ""                    # default: a temporary folder


TASK = """task: twochoice_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


def make_items(text, n, context_words, answer_words):
    words = text.split()
    rng = random.Random(0)
    items = []
    for i in range(n):
        at = rng.randrange(0, len(words) - context_words - 2 * answer_words)
        right = " " + " ".join(words[at + context_words:at + context_words + answer_words])
        other = rng.randrange(0, len(words) - answer_words)
        wrong = " " + " ".join(words[other:other + answer_words])
        choices = [right, wrong] if i % 2 == 0 else [wrong, right]
        items.append({"context": " ".join(words[at:at + context_words]), "choices": choices, "label": i % 2})
    return items


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_eval(root, name, model, model_args):
    """Run lm-eval; returns (acc, [per-item log-likelihoods of each choice])."""
    out = root / f"results-{name}"
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
                        "--tasks", "twochoice_local", "--include_path", str(root), "--device", "cpu",
                        "--batch_size", "1", "--output_path", str(out), "--log_samples"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                            "HF_DATASETS_OFFLINE": "1"})
    if r.returncode:
        raise UserError(f"lm_eval --model {model} failed:\n{r.stderr[-3000:]}")
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob("samples_twochoice_local_*.jsonl")).open()]
    samples.sort(key=lambda s: s["doc_id"])
    loglik = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
    return results["results"]["twochoice_local"]["acc,none"], loglik


def main():
    config = parse_config(BenchLmEvalConfig)
    root = Path(config.work_dir or tempfile.mkdtemp(prefix="bench-lm-eval-"))
    root.mkdir(parents=True, exist_ok=True)
    model, _, _ = load_model(config.model)
    items = make_items(Path(config.text).read_text(encoding="utf-8"), config.items, config.context_words,
                       config.answer_words)
    (root / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    (root / "twochoice_local.yaml").write_text(TASK.format(items=root / "items.jsonl"))
    hf = root / "hf"
    # the --work_dir of an earlier run holds its export: replace it
    export.export(config.model, hf, overwrite=True)

    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"--model={config.model}", f"--port={port}",
                               "--device=cpu", "--dtype=float32"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        t0 = time.time()
        served = lm_eval(root, "served", "local-completions",
                         f"base_url=http://127.0.0.1:{port}/v1/completions,model=served,tokenizer={hf},"
                         f"tokenizer_backend=huggingface,tokenized_requests=True,"
                         f"max_length={model.config.block_size},num_concurrent=1")
        t1 = time.time()
    finally:
        server.terminate()
        server.wait(timeout=30)
    exported = lm_eval(root, "hf", "hf", f"pretrained={hf},dtype=float32,max_length={model.config.block_size}")
    t2 = time.time()
    diff = max(abs(a - b) for s, h in zip(served[1], exported[1]) for a, b in zip(s, h))
    print(f"{len(items)} two-choice items from {config.text}; model {config.model} "
          f"({model.num_params() / 1e6:.2f}M parameters, context {model.config.block_size})")
    print(f"| lm-eval model | acc | seconds |\n|---|---:|---:|\n| local-completions (serve.py) | {served[0]:.4f} | "
          f"{t1 - t0:.0f} |\n| hf (export.py's folder) | {exported[0]:.4f} | {t2 - t1:.0f} |")
    print(f"largest difference between the two's log-likelihood of a choice: {diff:.2e} nats "
          f"({'same accuracy' if served[0] == exported[0] else 'ACCURACIES DIFFER'})")


if __name__ == "__main__":
    run_main(main)
