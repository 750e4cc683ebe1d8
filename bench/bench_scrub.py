"""
scrub.py measured: recall and precision per kind on the labelled set (tests/pii_labelled.py), the
look-alikes it changes, what it replaces in WikiText-2 and how fast, beside GPT-2's BPE encoding
the same documents (prepare.py's work per document) in the same run.

    python bench/bench_scrub.py [--wikitext=DIR] [--repeats=3]

Recall: the share of a kind's positives that come out exactly as labelled. Precision: those right,
over those right plus the kind's finds in look-alikes and in other kinds' positives. Both with the
built-in patterns alone and, where installed, with phonenumbers and detect-secrets. Speed:
WikiText-2 train (tokenized) cut into its articles, each scrubbed as prepare.py's workers would, one
process, best of --repeats. Prints markdown tables.
"""

import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import cli  # noqa: E402
import scrub  # noqa: E402
from pii_labelled import lookalikes, positives  # noqa: E402

DATA = REPO.parent / "shared" / "data"


@dataclass
class BenchScrubConfig:
    wikitext: str = str(DATA)        # holds wikitext-2/ and wikitext-2-raw/ as published
    gpt2_dir: str = str(DATA / "gpt2")  # encoder.json + vocab.bpe: the encoding baseline
    repeats: int = cli.setting(3, low=1)  # speed: best of this many passes
    examples: int = 3                # WikiText finds shown per kind


def labelled(libraries):
    """{kind: (positives, right, false finds)} and {category: (look-alikes, changed)}."""
    right, total, false = Counter(), Counter(), Counter()
    for kind, text, expected in positives():
        total[kind] += 1
        out, counts = scrub.scrub(text, libraries=libraries)
        right[kind] += out == expected
        false.update({k: n for k, n in counts.items() if k != kind})
        false[kind] += max(0, counts[kind] - expected.count(scrub.PLACEHOLDER[kind]))
    changed, seen = Counter(), Counter()
    for category, text in lookalikes():
        seen[category] += 1
        counts = scrub.scrub(text, libraries=libraries)[1]
        changed[category] += bool(counts)
        false.update(counts)
    return ({k: (total[k], right[k], false[k]) for k in scrub.KINDS},
            {c: (seen[c], changed[c]) for c in seen})


def wikitext_files(folder):
    files = [Path(folder) / "wikitext-2" / f"wiki.{s}.tokens" for s in ("train", "valid", "test")]
    files += [Path(folder) / "wikitext-2-raw" / f"wiki.{s}.raw" for s in ("train", "valid", "test")]
    return [f for f in files if f.is_file()]


def articles(path):
    return re.split(r"(?m)(?=^ = [^=].* = $)", path.read_text(encoding="utf-8"))


def best_time(work, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best


def gpt2_encoding(gpt2_dir):
    """tiktoken's GPT-2 encoding from local files (get_encoding would download them)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(Path(gpt2_dir) / "vocab.bpe"),
        encoder_json_file=str(Path(gpt2_dir) / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def print_labelled(libraries):
    kinds, categories = labelled(libraries)
    name = ", ".join(f"{k}: {v}" for k, v in scrub.backends(libraries).items())
    print(f"\n| kind ({name}) | positives | recall | false finds | precision |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, (total, right, false) in kinds.items():
        print(f"| {kind} | {total} | {right / total:.3f} | {false} | "
              f"{right / max(1, right + false):.3f} |")
    total, right = (sum(v[i] for v in kinds.values()) for i in (0, 1))
    print(f"| all | {total} | {right / total:.3f} | {sum(v[2] for v in kinds.values())} | |")
    print("\n| look-alikes | texts | changed |")
    print("| --- | ---: | ---: |")
    for category, (seen, changed) in categories.items():
        print(f"| {category} | {seen} | {changed} |")
    seen, changed = (sum(v[i] for v in categories.values()) for i in (0, 1))
    print(f"| all | {seen} | {changed} ({changed / seen:.1%}) |")


def main():
    config = cli.parse_config(BenchScrubConfig)
    print_labelled(libraries=False)
    if scrub.backends() != scrub.backends(libraries=False):
        print_labelled(libraries=True)

    files = wikitext_files(config.wikitext)
    if not files:
        raise cli.UserError(f"no WikiText-2 files in {config.wikitext}: give --wikitext=DIR")
    print("\n| WikiText-2 file | MB | replaced |")
    print("| --- | ---: | --- |")
    for path in files:
        finds = [(text[max(0, a - 40):b + 20], kind)
                 for text in articles(path) for a, b, kind in scrub.find(text)]
        counts = Counter(kind for _, kind in finds)
        print(f"| {path.parent.name}/{path.name} | {path.stat().st_size / 1e6:.1f} | "
              f"{dict(counts) or 'nothing'} |")
        for kind in counts:
            for context, _ in [f for f in finds if f[1] == kind][:config.examples]:
                print(f"|  | | {kind}: `{context!r}` |")

    docs = articles(files[0])
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    gpt2 = gpt2_encoding(config.gpt2_dir)
    runs = {
        "encoding with GPT-2's BPE (the baseline)": lambda: [gpt2.encode_ordinary(d) for d in docs],
        "scrub, built-in patterns": lambda: [scrub.scrub(d, libraries=False) for d in docs],
    }
    if scrub.backends() != scrub.backends(libraries=False):
        runs["scrub, with " + ", ".join(scrub.backends().values())] = (
            lambda: [scrub.scrub(d) for d in docs])
    seconds = {name: best_time(work, config.repeats) for name, work in runs.items()}
    base = next(iter(seconds.values()))
    print(f"\n| {files[0].name}, {len(docs)} articles, {mb:.1f} MB, one process | MB/s | "
          f"time / baseline |")
    print("| --- | ---: | ---: |")
    for name, s in seconds.items():
        print(f"| {name} | {mb / s:.1f} | {s / base:.2f} |")


if __name__ == "__main__":
    cli.run_main(main)
