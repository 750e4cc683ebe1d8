"""
prepare.py on corpora of growing size: wall time, MB/s and the peak memory of all its processes together, beside
the same for another revision's prepare.py (the in-memory one before streaming) where it still fits; then the
encoding speed against tiktoken's own encode_ordinary_batch with the same merges, cores and text.

    python bench/bench_prepare.py --sizes_mb=100,500,1000,2000,5000 --old_rev=25eab77

The corpora: WikiText-2's train split (the tokenized release, 10.8 MB), cut into its 629 articles, shuffled with a
fixed seed and written one after another, reshuffled each round, until the size is reached: one .txt file (one
document: val is its tail, as in `prepare.py --input=big.txt`). Every size trains its own tokenizer (8,192 ids,
--tokenizer_chars as set) and encodes the whole file. Memory: the sum over the process tree of each process's
proportional set size (shared pages split between the processes sharing them) and of its resident set size,
sampled every 50 ms; the table gives the peaks.

    python bench/bench_prepare.py --compare_flags=True [--rounds=3]

instead runs prepare.py with --dedup=exact, --dedup=near and --scrub_pii=True beside none of them, on
WikiText-2 (the tokenized release: --dataset=wikitext-2 --source=the folder of --source, 751 articles,
13.2 MB) and on bench/bench_dedup.py's corpus of planted copies (WikiText-2's paragraphs of 100 words or
more, a tenth of them copied exactly and a tenth with 1% of the words changed, as JSON lines: 13,870
documents, 12.5 MB), each run whole (reading, the tokenizer, encoding, writing), the four in a new order
in each of --rounds rounds. MB/s: the text's bytes / the run's wall time, median of the rounds; time / off:
the median of each round's ratio to the run without flags; CPU time / off the same for the CPU seconds of
all its processes (steadier than wall time where other work shares the cores).
"""

import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import UserError, parse_config, run_main  # noqa: E402
from workers import cpu_count  # noqa: E402

DATA = REPO.parent / "shared" / "data"


@dataclass
class BenchPrepareConfig:
    source: str = str(DATA / "wikitext-2" / "wiki.train.tokens")  # the text the corpora are made of
    sizes_mb: str = "100,500,1000,2000,5000"  # corpus sizes to run
    old_rev: str = "25eab77"          # the revision to compare with ("" to skip it)
    old_limit_gb: float = 0.0         # run the old one only where 16x the corpus fits this (0: 70% of memory)
    tokenizer_chars: int = 100_000_000  # prepare.py's default
    work_dir: str = ""                # where the corpora and outputs go (default: a temporary folder)
    baseline_mb: int = 100            # text for the tiktoken comparison
    compare_flags: bool = False       # instead: --dedup and --scrub_pii beside neither (see above)
    rounds: int = 3                   # compare_flags: rounds, the flags in a new order in each


def make_corpus(source, path, size):
    """Shuffled WikiText-2 articles, written until the file holds `size` bytes."""
    text = Path(source).read_text(encoding="utf-8")
    articles = re.split(r"(?m)(?=^ = [^=].* = $)", text)
    rng, written = random.Random(0), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            rng.shuffle(articles)
            for article in articles:
                f.write(article)
                written += len(article.encode("utf-8"))
                if written >= size:
                    break


def tree(pid):
    """pid and its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            pass
    return found


def memory_mb(pids):
    """(sum of Pss, sum of Rss) in MB over pids."""
    pss = rss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        except OSError:
            pass
    return pss / 1024, rss / 1024


def run_measured(args, cwd):
    """Run a command; returns (seconds, peak Pss MB, peak Rss MB, stdout+stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = [0.0, 0.0]

    def sample():
        while proc.poll() is None:
            pss, rss = memory_mb(tree(proc.pid))
            peaks[0], peaks[1] = max(peaks[0], pss), max(peaks[1], rss)
            time.sleep(0.05)
    sampler = threading.Thread(target=sample)
    sampler.start()
    out = proc.communicate()[0]
    sampler.join()
    if proc.returncode:
        raise UserError(f"{' '.join(map(str, args))} failed:\n{out[-2000:]}")
    return time.perf_counter() - t0, peaks[0], peaks[1], out


def tiktoken_baseline(corpus_path, data_dir, mb):
    """MB/s of tiktoken's encode_ordinary_batch with our merges on the first `mb` MB of the corpus, in the same
    pieces prepare.py encodes, on every core; and of prepare.py's own encoding of the same text (one worker
    per core), from its summary line."""
    from data import load_tokenizer
    from tokenizer import cut_stream
    tok = load_tokenizer(data_dir)
    with open(corpus_path, encoding="utf-8") as f:
        text = f.read(mb * 1_000_000)
    pieces = list(cut_stream([text]))
    nbytes = len(text.encode("utf-8"))
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        tok._enc.encode_ordinary_batch(pieces, num_threads=cpu_count())
        best = max(best, nbytes / 1e6 / (time.perf_counter() - t0))
    return best


FLAGS = {"off": [], "--dedup=exact": ["--dedup=exact"], "--dedup=near": ["--dedup=near"],
         "--scrub_pii=True": ["--scrub_pii=True"]}


def planted_jsonl(wikitext, path):
    """bench_dedup.py's corpus of WikiText-2 paragraphs and planted copies, as JSON lines."""
    import json
    sys.path.insert(0, str(REPO / "bench"))
    import bench_dedup
    settings = bench_dedup.BenchDedupConfig(wikitext=str(wikitext))
    documents = bench_dedup.distinct_paragraphs(wikitext, settings.min_words)
    corpus = bench_dedup.planted_corpus(documents, settings)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": document}) + "\n" for document, _ in corpus)


def what_was_done(out):
    """The summary's lines on what was left out or replaced."""
    found = re.findall(r"(?m)^  (duplicates .*|personal data .*)$", out)
    return "; ".join(found) or "-"


def compare_flags(config, root):
    """prepare.py with each of FLAGS on two corpora, interleaved; prints a markdown table."""
    wikitext = Path(config.source).parent
    planted = root / "planted.jsonl"
    if not planted.exists():
        planted_jsonl(wikitext, planted)
    corpora = {"WikiText-2": ["--dataset=wikitext-2", f"--source={wikitext}"],
               "planted copies": [f"--input={planted}"]}
    runs, load = {}, [os.getloadavg()[0]]
    for round_ in range(config.rounds):
        order = list(FLAGS)[round_ % len(FLAGS):] + list(FLAGS)[:round_ % len(FLAGS)]
        for name, args in corpora.items():
            for flag in order:
                out_dir = root / f"out-{name.split()[0]}-{flag.strip('-')}"
                command = [sys.executable, "prepare.py", *args, *FLAGS[flag], f"--out_dir={out_dir}",
                           "--overwrite=True"]
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                seconds, pss, _, out = run_measured(command, REPO)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                runs.setdefault((name, flag), []).append((seconds, pss, out, cpu))
                print(name, flag, f"{seconds:.1f} s, CPU {cpu:.1f} s", what_was_done(out), flush=True)
        load.append(os.getloadavg()[0])
    print(f"\n{cpu_count()} cores; load average (1 min) after each round: "
          f"{', '.join(f'{x:.1f}' for x in load)}\n")
    print("| corpus | flags | MB/s | time / off | CPU time / off | peak memory (PSS) | left out / replaced |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name in corpora:
        megabytes = corpus_megabytes(root / f"out-{name.split()[0]}-off")
        for flag in FLAGS:
            rows, base = runs[(name, flag)], runs[(name, "off")]
            ratio = statistics.median(r[0] / b[0] for r, b in zip(rows, base))
            cpu_ratio = statistics.median(r[3] / b[3] for r, b in zip(rows, base))
            seconds = statistics.median(r[0] for r in rows)
            print(f"| {name} ({megabytes:.1f} MB) | {flag} | {megabytes / seconds:.2f} | {ratio:.2f} | "
                  f"{cpu_ratio:.2f} | {max(r[1] for r in rows):,.0f} MB | {what_was_done(rows[-1][2])} |")


def corpus_megabytes(out_dir):
    """The text's megabytes that a prepare.py run without flags read (its meta.json)."""
    import json
    splits = json.loads((out_dir / "meta.json").read_text())["splits"]
    return sum(s["bytes"] for s in splits.values()) / 1e6


def main():
    config = parse_config(BenchPrepareConfig)
    if config.compare_flags:
        root = Path(config.work_dir or tempfile.mkdtemp(prefix="bench-prepare-"))
        root.mkdir(parents=True, exist_ok=True)
        compare_flags(config, root)
        return
    sizes = [int(s) for s in config.sizes_mb.split(",")]
    root = Path(config.work_dir or tempfile.mkdtemp(prefix="bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    old_dir = None
    if config.old_rev:
        old_dir = root / f"rev-{config.old_rev}"
        if not old_dir.exists():
            old_dir.mkdir()
            archive = subprocess.run(["git", "archive", config.old_rev], cwd=REPO, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(old_dir)], input=archive.stdout, check=True)
    limit_gb = config.old_limit_gb or 0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    rows = []
    for size in sizes:
        corpus = root / f"corpus-{size}MB.txt"
        if not corpus.exists() or corpus.stat().st_size < size * 1_000_000:
            make_corpus(config.source, corpus, size * 1_000_000)
        for who, cwd in [("streaming", REPO)] + ([(f"in-memory ({config.old_rev})", old_dir)] if old_dir else []):
            if who != "streaming" and 16 * size / 1000 > limit_gb:
                rows.append((size, who, None, None, None, None, f"not run: 16x the corpus > {limit_gb:.0f} GB"))
                continue
            out_dir = root / f"out-{size}-{'new' if who == 'streaming' else 'old'}"
            args = [sys.executable, "prepare.py", f"--input={corpus}", f"--out_dir={out_dir}", "--overwrite=True"]
            if who == "streaming":
                args.append(f"--tokenizer_chars={config.tokenizer_chars}")
            seconds, pss, rss, out = run_measured(args, cwd)
            summary = next(line for line in out.splitlines() if " ids -> " in line)
            enc = re.search(r"encoding ([\d.]+) s: ([\d.]+) MB/s", summary)
            rows.append((size, who, seconds, size / seconds, pss, rss, summary if not enc else
                         f"tokenizer+setup {seconds - float(enc.group(1)):.0f} s, encoding {enc.group(2)} MB/s"))
            print(rows[-1], flush=True)
            if who == "streaming" and size == sizes[0]:
                first_out = out_dir
    baseline = tiktoken_baseline(root / f"corpus-{sizes[0]}MB.txt", first_out, min(config.baseline_mb, sizes[0]))
    ours = [float(re.search(r"encoding ([\d.]+) MB/s", r[6]).group(1)) for r in rows if r[1] == "streaming"]

    print(f"\n{cpu_count()} cores; corpora from {config.source}\n")
    print("| corpus | prepare.py | wall | MB/s (whole run) | peak memory, all processes (PSS) | (RSS sum) | notes |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for size, who, seconds, mbs, pss, rss, note in rows:
        if seconds is None:
            print(f"| {size:,} MB | {who} | | | | | {note} |")
        else:
            print(f"| {size:,} MB | {who} | {seconds:,.0f} s | {mbs:.1f} | {pss:,.0f} MB | {rss:,.0f} MB | {note} |")
    print(f"\ntiktoken encode_ordinary_batch, our merges, {cpu_count()} threads, first {config.baseline_mb} MB of the "
          f"first corpus in prepare.py's pieces: {baseline:.1f} MB/s")
    print("prepare.py's encoding (read, encode on every core, write) / tiktoken's: " +
          ", ".join(f"{size:,} MB {speed / baseline:.2f}x" for size, speed in zip(sizes, ours)))


if __name__ == "__main__":
    run_main(main)
