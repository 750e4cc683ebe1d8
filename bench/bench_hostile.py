"""
Requests that fail beside a normal one, against serve.py: does the normal request keep its time?

Ten failing requests are sent at once, and with them the normal request (50 tokens, greedy):
  4 refused for a field       bad JSON, an unknown field, n=17, a 15,500-character stop (400)
  3 streams left early        4 prompts x n=16 = 64 choices of 100,000 tokens, with echo and
                              logprobs (the request that once failed with a 500 and left its 64
                              choices generating for nobody); the client reads one event, hangs up
  3 whole answers left early  the same, not streamed; the client hangs up once it has sent it
Each round times the normal request alone, alone again (what two timings differ by on this
machine), beside each kind alone and beside the ten, in an order that turns from round to round.
The medians over `repeats` rounds are printed, with the median of each round's ratio to its own
`alone`, then what the engine still holds (it should hold nothing). With --refused_only=True every
failing request is one refused at once (n=17), read whole: what as many requests cost the server
before any generation (werkzeug's thread, parsing, the answer), the floor for the others.

The model sets the scale: every request is read and answered in a Python thread that shares the
engine's interpreter (about 2 ms of CPU each on the 2-core machine of docs/RESULTS.md), so beside
the 35k-parameter model trained on the spot (about 1 ms a token) the failing requests weigh far
more than beside the quick start's model (about 4 ms a token).

    python bench/bench_hostile.py                       # a tiny model trained on the spot (~20 s)
    python bench/bench_hostile.py --model=out-wikitext-tiny   # the quick start's model
    python bench/bench_hostile.py --refused_only=True   # the floor: ten requests refused
"""

import json
import socket
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
class BenchHostileConfig:
    model: str = ""              # the model to serve; empty: train a tiny one in a temp folder
    repeats: int = 30            # rounds, each timing the normal request in every phase
    threads: int = 1             # torch threads in the server
    refused_only: bool = False   # every failing request a refused one: the floor (see above)


NORMAL = {"prompt": "The", "max_tokens": 50, "temperature": 0}
LEFT = {"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 100_000, "echo": True, "logprobs": 1}
KINDS = {  # kind -> [(body, what the client reads: "all", "first" bytes, or None: it hangs up)]
    "refused": [(b'{"prompt": "The", ', "all"), (b'{"prompt": "The", "max_new_tokens": 5}', "all"),
                (b'{"prompt": "The", "n": 17}', "all"),
                (json.dumps({"prompt": "The", "stop": ["the " * 3875]}).encode(), "all")],
    "streams": [(json.dumps({**LEFT, "stream": True}).encode(), "first")] * 3,
    "wholes": [(json.dumps(LEFT).encode(), None)] * 3,
}
PHASES = {"alone": "alone", "again": "alone, again", "refused": "beside the 4 refused",
          "streams": "beside the 3 streams left early",
          "wholes": "beside the 3 whole answers left early", "ten": "beside all ten"}


def post(port, body, read):
    """POST body to /v1/completions on a socket of its own; read=None hangs up at once, "first"
    after the first bytes of the answer, "all" after the whole answer. Returns the status code, or
    0 if none was read."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        if read is None:
            return 0
        answer = s.recv(65536)
        while read == "all" and (data := s.recv(65536)):
            answer += data
    return int(answer.split(b" ", 2)[1])


def timed(url, port, phase, statuses, kinds=KINDS):
    """Seconds of the normal request in a phase (the failing requests it names sent with it, a
    thread each, their statuses added to `statuses`), and its answer."""
    jobs = [job for kind, kind_jobs in kinds.items() if phase in (kind, "ten") for job in kind_jobs]
    threads = [threading.Thread(target=lambda job=job: statuses.add(post(port, *job)))
               for job in jobs]
    for thread in threads:
        thread.start()
    t0 = time.perf_counter()
    answer = requests.post(f"{url}/v1/completions", json=NORMAL, timeout=600)
    seconds = time.perf_counter() - t0
    answer.raise_for_status()
    for thread in threads:
        thread.join()
    held(url)  # the next timing starts on an idle engine
    return seconds, answer.json()["choices"][0]["text"]


def held(url, wait=10.0):
    """What the engine holds (active + waiting) once it has had `wait` seconds to let go."""
    deadline = time.time() + wait
    while True:
        batch = requests.get(f"{url}/health", timeout=60).json()["batch"]
        if not batch["active"] + batch["waiting"] or time.time() > deadline:
            return batch["active"] + batch["waiting"]
        time.sleep(0.1)


def main():
    config = cli.parse_config(BenchHostileConfig)
    refused = (b'{"prompt": "The", "n": 17}', "all")
    kinds = {kind: [refused] * len(jobs) for kind, jobs in KINDS.items()}
    kinds = kinds if config.refused_only else KINDS
    with tempfile.TemporaryDirectory(prefix="bench_hostile_") as tmp:
        model = config.model or train_tiny(tmp)[0]
        with open(Path(tmp) / "server.log", "w") as log:
            process, url = start_server(model, "", config.threads, log)
            port = int(url.rsplit(":", 1)[1])
            try:
                rounds, texts, statuses, phases = [], set(), set(), list(PHASES)
                for _ in range(3):  # warm-up
                    timed(url, port, "alone", statuses)
                for i in range(config.repeats):
                    seconds = {}
                    for phase in phases[i % len(phases):] + phases[:i % len(phases)]:
                        seconds[phase], text = timed(url, port, phase, statuses, kinds)
                        texts.add(text)
                    rounds.append(seconds)
                left = held(url)
            finally:
                process.terminate()
                process.wait(timeout=30)
    assert len(texts) == 1, "the normal request's answer changed beside the failing ones"
    print(f"normal request: {NORMAL}; {config.repeats} rounds; {config.threads} torch thread(s) in "
          f"the server; the failing requests got {sorted(statuses)} (0: the client read nothing)"
          f"{'; every one refused at once (--refused_only)' if config.refused_only else ''}\n")
    print("| phase | normal request, median ms | median ratio to alone |")
    print("|---|---:|---:|")
    for phase, name in PHASES.items():
        median = statistics.median(r[phase] for r in rounds)
        ratio = statistics.median(r[phase] / r["alone"] for r in rounds)
        print(f"| {name} | {median * 1000:.1f} | {ratio:.2f}x |")
    print(f"\nthe engine holds {left} choices after the last round (0: every failed request let "
          f"its choices go)")


if __name__ == "__main__":
    cli.run_main(main)
