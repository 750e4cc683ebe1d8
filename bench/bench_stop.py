"""
Hostile stop strings against serve.py: does a normal request stay fast while others send the stop strings that
once held the server for a minute each?

The normal request (50 tokens, greedy) is timed `repeats` times, its median taken, in each phase:
  alone                          nothing else runs
  beside 4 long stops            with each normal request, 4 others with 15,500-character stops (refused now: 400)
  flood: long stops              4 clients send those back to back, as fast as they can ...
  flood: a short bad request     ... and the same with a small request refused for another field: what a flood of any
                                 refused request costs, whatever its stop strings
  4 generations, no stop         4 clients generate `max_tokens` tokens each, over and over (the load alone) ...
  4 generations, 200-char stops  ... and the same with 4 stops of 200 characters (the longest allowed) made of the
                                 words the model writes, so that the text held back for them is checked at every piece
and prints each median and its ratio to the phase it compares with.

    python bench/bench_stop.py                        # a tiny model trained on the spot (~20 s)
    python bench/bench_stop.py --model=out-wikitext-tiny
"""

import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from bench_serve import REPO, start_server, train_tiny

sys.path.insert(0, str(REPO))
import cli  # noqa: E402


@dataclass
class BenchStopConfig:
    model: str = ""              # the model to serve; empty: train a tiny one in a temp folder
    repeats: int = 20            # timings of the normal request per phase
    max_tokens: int = 256        # tokens per generation of the 4 loaded clients
    threads: int = 1             # torch threads in the server


NORMAL = {"prompt": "The", "max_tokens": 50, "temperature": 0}
LONG_STOP = {"prompt": "The", "max_tokens": 500, "stop": ["the " * 3875]}  # 15,500 characters
ALLOWED_STOPS = [("the cat sat on " * 14)[:200], ("and ran to the " * 14)[:200], ("a " * 100)[:200],
                 (" the" * 50)[:200]]


def normal_latency(url, repeats):
    """Median seconds of the normal request, and its answer (to check it is unchanged)."""
    times, text = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        answer = requests.post(f"{url}/v1/completions", json=NORMAL, timeout=600)
        times.append(time.perf_counter() - t0)
        answer.raise_for_status()
        text = answer.json()["choices"][0]["text"]
    return statistics.median(times), text


def under_load(url, body, repeats, clients=4, flood=True):
    """normal_latency while `clients` threads send body: over and over (flood), or once each beside every normal
    request; also the statuses they got."""
    stop, statuses = threading.Event(), []

    def client(i):
        while True:
            statuses.append(requests.post(f"{url}/v1/completions", json={**body, "seed": i}, timeout=600).status_code)
            if stop.is_set() or not flood:
                return

    if not flood:
        times, text = [], None
        for _ in range(repeats):
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            latency, text = normal_latency(url, 1)
            times.append(latency)
            for t in threads:
                t.join()
        return (statistics.median(times), text), sorted(set(statuses))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the load is under way
    result = normal_latency(url, repeats)
    stop.set()
    for t in threads:
        t.join()
    return result, sorted(set(statuses))


def main():
    config = cli.parse_config(BenchStopConfig)
    with tempfile.TemporaryDirectory(prefix="bench_stop_") as tmp:
        model = config.model or train_tiny(tmp)[0]
        with open(Path(tmp) / "server.log", "w") as log:
            process, url = start_server(model, "", config.threads, log)
            try:
                normal_latency(url, 3)  # warm-up
                alone, text = normal_latency(url, config.repeats)
                (beside, text_beside), beside_statuses = under_load(url, LONG_STOP, config.repeats, flood=False)
                (flood, _), flood_statuses = under_load(url, LONG_STOP, config.repeats)
                (bad, _), bad_statuses = under_load(url, {"prompt": "The", "max_tokens": -1}, config.repeats)
                generation = {"prompt": "The", "max_tokens": config.max_tokens, "temperature": 1.0}
                (plain, _), plain_statuses = under_load(url, generation, config.repeats)
                (stopped, text_stopped), stop_statuses = under_load(url, {**generation, "stop": ALLOWED_STOPS},
                                                                     config.repeats)
            finally:
                process.terminate()
                process.wait(timeout=30)
    assert text == text_beside == text_stopped, "the normal request's answer changed under load"
    print(f"normal request: {NORMAL}; median of {config.repeats}; {config.threads} torch thread(s) in the server\n")
    print("| phase | the others' statuses | normal request, median ms | ratio | against |")
    print("|---|---|---:|---:|---|")
    rows = [("alone", "-", alone, alone, "-"),
            ("beside 4 requests with 15,500-character stops", beside_statuses, beside, alone, "alone"),
            ("flood: 4 clients sending those back to back", flood_statuses, flood, alone, "alone"),
            ("flood: 4 clients sending a short bad request back to back", bad_statuses, bad, alone, "alone"),
            ("", "", flood, bad, "the short bad request's flood"),
            (f"4 clients: {config.max_tokens}-token generations, no stop", plain_statuses, plain, alone, "alone"),
            ("4 clients: the same, 4 stops of 200 characters each", stop_statuses, stopped, plain, "no stop")]
    for name, statuses, value, against, against_name in rows:
        print(f"| {name} | {statuses} | {value * 1000:.1f} | {value / against:.2f}x | {against_name} |")

if __name__ == "__main__":
    cli.run_main(main)
