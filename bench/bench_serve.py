"""
Load-test serve.py, started in a subprocess on a free port, in two parts.

1. Throughput: `clients` clients at once, each asking for `rounds` completions of `max_tokens` tokens, against the
   server decoding one request at a time (--max_batch_size=1) and then batching them (--max_batch_size=clients):
   generated tokens per second in all, and the latency of a request (p50, p95), for each.
2. Every kind of request under load: `requests` requests, `concurrency` at a time, five kinds in turn (completion,
   streamed completion, classification, health check, a request with a bad field), each answer checked.

Prints markdown tables; exits 1 on any 5xx or malformed answer.

    python bench/bench_serve.py                       # a tiny model and classifier trained on the spot (~20 s)
    python bench/bench_serve.py --model=out-wikitext-tiny --classifier=out-spam --clients=64
    python bench/bench_serve.py --device=cuda --compile=True   # the step compiled: CUDA graphs
"""

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import the repo's modules

import cli  # noqa: E402


@dataclass
class BenchServeConfig:
    model: str = ""              # the model to serve; empty: train a tiny one (and a classifier) in a temp folder
    classifier: str = ""         # empty: no classification requests (unless the tiny one is trained)
    clients: int = 64            # throughput: clients at once, each sending its requests one after another
    rounds: int = 2              # throughput: requests per client
    max_tokens: int = 64         # tokens per completion
    requests: int = 200          # every kind: requests in all, the five kinds in turn
    concurrency: int = 16        # every kind: requests in flight at once
    threads: int = 1             # torch threads in the server (OMP_NUM_THREADS); 0: torch's default
    device: str = "cpu"          # the server's --device (cpu, cuda, ...)
    compile: bool = False        # the server's --compile: its step compiled for a few batch sizes


def run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                            env=env, timeout=300)
    if result.returncode != 0:
        raise cli.UserError(f"{script} failed:\n{result.stdout}\n{result.stderr}")


def train_tiny(root):
    """A 35k-parameter GPT (5 training steps on a made-up corpus) and a classifier fine-tuned from it, in root:
    enough to serve, in seconds. Returns (model folder, classifier folder)."""
    import random
    root = Path(root)
    rng = random.Random(0)
    words = "the a cat dog sat on mat and ran to house big small red tree under over bird sang song".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(3000)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    run("prepare.py", f"--input={root / 'corpus.txt'}", f"--out_dir={root / 'data'}", "--vocab_size=300")
    run("train.py", f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}", "--max_iters=5", "--eval_interval=5",
        "--eval_iters=1", "--batch_size=4", "--block_size=32", "--hidden_size=32", "--num_hidden_layers=2",
        "--num_attention_heads=2", "--device=cpu", "--compile=False")
    rows = [f"spam\tWIN free cash prize now {i}" if i % 2 else f"ham\tthe cat sat on the mat {i}" for i in range(24)]
    (root / "labels.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n")
    run("finetune_classifier.py", f"--model={root / 'out'}", f"--data={root / 'labels.tsv'}",
        f"--out_dir={root / 'cls'}", "--num_epochs=1", "--device=cpu")
    return root / "out", root / "cls"


def start_server(out_dir, classifier_dir, threads, log, *args, wait=60):
    """serve.py on a free port of 127.0.0.1; returns (process, base URL) once /health answers
    (within `wait` seconds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    env.pop("GPT_API_TOKEN", None)
    args = [f"--model={out_dir}", f"--port={port}", "--max_tokens_limit=100000", *args]
    args += [f"--classifier={classifier_dir}"] if classifier_dir else []
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), *args], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(wait * 10):
        if process.poll() is not None:
            log.flush()
            raise cli.UserError(f"serve.py exited with status {process.returncode}:\n{Path(log.name).read_text()}")
        try:
            requests.get(f"{url}/health", timeout=1)
            return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise cli.UserError(f"serve.py did not answer within {wait} s")


def percentile(values, p):
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    values = sorted(values)
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]

# ----------------------------------------------------------------------------- 1. throughput


def throughput(url, config):
    """(generated tokens per second in all, latencies in s) of clients x rounds completions, all clients at once."""
    body = {"prompt": "The history of", "max_tokens": config.max_tokens, "temperature": 1.0}

    def client(i):
        results = []
        for r in range(config.rounds):
            t0 = time.perf_counter()
            answer = requests.post(f"{url}/v1/completions", json={**body, "seed": i * config.rounds + r},
                                   timeout=600)
            answer.raise_for_status()
            results.append((answer.json()["usage"]["completion_tokens"], time.perf_counter() - t0))
        return results

    requests.post(f"{url}/v1/completions", json={**body, "max_tokens": 4}, timeout=60)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(config.clients) as pool:
        results = [row for rows in pool.map(client, range(config.clients)) for row in rows]
    seconds = time.perf_counter() - t0
    return sum(tokens for tokens, _ in results) / seconds, [latency for _, latency in results]

# ----------------------------------------------------------------------------- 2. every kind under load


def request_kinds(max_tokens, with_classifier):
    """kind -> (method, path, JSON body)."""
    prompt = {"prompt": "The cat sat on", "max_tokens": max_tokens}
    kinds = {"completion": ("post", "/v1/completions", prompt),
             "stream": ("post", "/v1/completions", {**prompt, "stream": True}),
             "classify": ("post", "/v1/classify", {"text": "WIN free cash prize now"}),
             "health": ("get", "/health", None),
             "bad field": ("post", "/v1/completions", {**prompt, "top_p": 2})}
    if not with_classifier:
        del kinds["classify"]
    return kinds


def send(url, kind, method, path, body):
    """(kind, status, seconds, seconds to the first event, problem or None) of one request."""
    t0 = time.perf_counter()
    first = None
    try:
        with requests.request(method, url + path, json=body, stream=kind == "stream", timeout=120) as r:
            if kind == "stream":
                events = []
                for line in r.iter_lines():
                    if line.startswith(b"data: "):
                        first = first or time.perf_counter() - t0
                        events.append(line[6:])
                chunks = [json.loads(e) for e in events[:-1]]
                ok = (r.status_code == 200 and events[-1] == b"[DONE]" and chunks[-1]["choices"][0]["finish_reason"]
                      and all("text" in c["choices"][0] for c in chunks))
            else:
                answer = r.json()
                expected = {"completion": "choices", "classify": "label", "health": "parameters", "bad field": "error"}
                ok = r.status_code == (400 if kind == "bad field" else 200) and expected[kind] in answer
            problem = None if ok else f"{r.status_code}: {r.text[:200]}"
            return kind, r.status_code, time.perf_counter() - t0, first, problem
    except (requests.RequestException, ValueError, IndexError, KeyError) as e:  # no answer, or not JSON / SSE
        return kind, 0, time.perf_counter() - t0, first, repr(e)


def every_kind(url, config, with_classifier):
    kinds = request_kinds(config.max_tokens, with_classifier)
    for kind, spec in kinds.items():  # warm up: first calls pay one-off costs
        send(url, kind, *spec)
    order = [list(kinds)[i % len(kinds)] for i in range(config.requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(config.concurrency) as pool:
        results = list(pool.map(lambda kind: send(url, kind, *kinds[kind]), order))
    return results, time.perf_counter() - t0


def report_kinds(results, seconds, config):
    print(f"\n{len(results)} requests of every kind, {config.concurrency} at a time, in {seconds:.1f} s "
          f"({len(results) / seconds:.1f} requests/s); max_tokens={config.max_tokens}\n")
    print("| kind | requests | status codes | p50 ms | p95 ms | first event p50 / p95 ms |")
    print("|---|---:|---|---:|---:|---:|")
    by_kind = defaultdict(list)
    for result in results:
        by_kind[result[0]].append(result)
    for kind, rows in [("all", results), *by_kind.items()]:
        codes = defaultdict(int)
        for row in rows:
            codes[row[1]] += 1
        latency = [row[2] * 1000 for row in rows]
        firsts = [row[3] * 1000 for row in rows if row[3] is not None]
        first = f"{percentile(firsts, 50):.0f} / {percentile(firsts, 95):.0f}" if kind == "stream" else ""
        print(f"| {kind} | {len(rows)} | {', '.join(f'{c}: {n}' for c, n in sorted(codes.items()))} | "
              f"{percentile(latency, 50):.0f} | {percentile(latency, 95):.0f} | {first} |")


def main():
    config = cli.parse_config(BenchServeConfig)
    if min(config.clients, config.rounds, config.max_tokens, config.requests, config.concurrency) < 1:
        raise cli.UserError("--clients, --rounds, --max_tokens, --requests and --concurrency must be at least 1")
    rows, problems = [], []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        out_dir, classifier_dir = config.model, config.classifier
        if not out_dir:
            t0 = time.time()
            out_dir, classifier_dir = train_tiny(tmp)
            print(f"trained a tiny model and classifier in {time.time() - t0:.0f} s")
        for batch in (1, config.clients):
            with open(Path(tmp) / "server.log", "w") as log:
                flags = (f"--max_batch_size={batch}", f"--device={config.device}",
                         f"--compile={config.compile}")
                # compiling takes minutes
                wait = 600 if config.compile else 60
                process, url = start_server(out_dir, classifier_dir, config.threads, log, *flags,
                                            wait=wait)
                try:
                    health = requests.get(f"{url}/health", timeout=10).json()
                    print(f"serving {health['model']} ({health['parameters']:,} parameters) on "
                          f"{health['device']}, max_batch_size={batch}, compile={config.compile}, "
                          f"{config.threads or 'default'} torch thread(s); client and server share "
                          f"{os.cpu_count()} CPUs", flush=True)
                    tokens_per_second, latencies = throughput(url, config)
                    peak = requests.get(f"{url}/health", timeout=10).json()["batch"]["peak"]
                    rows.append((batch, peak, tokens_per_second, latencies))
                    if batch > 1:
                        results, seconds = every_kind(url, config, bool(classifier_dir))
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    base = rows[0][2]
    print(f"\n{config.clients} clients x {config.rounds} completions of {config.max_tokens} tokens "
          f"(temperature 1, seeded):\n")
    print("| server | most decoded together | generated tokens/s | vs one at a time | p50 s | p95 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch, peak, tokens_per_second, latencies in rows:
        name = "one request at a time" if batch == 1 else f"batched (--max_batch_size={batch})"
        print(f"| {name} | {peak} | {tokens_per_second:,.0f} | {tokens_per_second / base:.2f}x | "
              f"{percentile(latencies, 50):.2f} | {percentile(latencies, 95):.2f} |")
    report_kinds(results, seconds, config)
    problems = [(kind, problem) for kind, status, _, _, problem in results if problem or status >= 500]
    for kind, problem in problems[:10]:
        print(f"problem ({kind}): {problem}")
    print(f"\n{'FAIL' if problems else 'OK'}: {len(problems)} 5xx or malformed answers of {len(results)}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    cli.run_main(main)
