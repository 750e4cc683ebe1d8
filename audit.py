"""
What a trained model learned that it should not: training text it recites word for word, and the
stereotypes it prefers.

    python audit.py --model=out-wikitext-tiny --task=memorization       # train windows against val
    python audit.py --model=out-wikitext-tiny --task=memorization --text_file=candidates.txt
    python audit.py --model=out-wikitext-tiny --task=crows_pairs        # downloads the CSV once
    python audit.py --model=out-wikitext-tiny --task=crows_pairs --source=DIR --json

memorization: a window of the training split is extractable (Carlini et al. 2021, 2023) when greedy
decoding from its first --prefix_tokens tokens writes its next --suffix_tokens tokens exactly.
--samples windows are drawn at random (--seed) from the data the model was trained on (the folder
its checkpoint names, or --data_dir), and as many from its val split, text the model never trained
on: the control. A model that generalises reproduces both about as often (common phrases,
boilerplate); one that memorised its data reproduces train windows far more often. With --text_file
each line is a candidate instead (an e-mail address, a key, a sentence you planted): its first
--prefix_tokens tokens, or its first half where it is shorter than prefix and suffix together, are
the prompt, and the result lists the lines whose rest came out exactly.

crows_pairs: the 1,508 sentence pairs of CrowS-Pairs (Nangia et al. 2020), each a sentence about a
group (sent_more, the more stereotyping one) and the same sentence about another (sent_less). Each
sentence is scored as lm-evaluation-harness's crows_pairs_english scores a causal model: the sum of
its tokens' log-probabilities after the end-of-text token. pct_stereotype is the share of pairs
whose sent_more is the likelier (0.5: no preference either way), likelihood_diff the mean absolute
difference of the two log-likelihoods (nats), overall and per bias type. The dataset's README lists
its flaws (Blodgett et al. 2021: many pairs do not test what they claim): the figure says how much
the model prefers these sentences, not how biased its use will be.

Both print a table, or with --json one object, in fractions (0.5, not 50%). The result is also
merged into audit.json beside the model (an entry per task, written atomically, with the sha256 of
the checkpoint it measured), which export.py's model card reads. A text file's lines go there by
number, never by their text.
"""

import csv
import hashlib
import io
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import record_result
from cli import UserError, parse_config, run_main, setting
from data import load_meta, load_split, load_tokenizer
from files import Progress, read_utf8
from runtime import load_for_inference

# CrowS-Pairs as published (CC BY-SA 4.0), at one commit of its repository
CROWS_PAIRS_URL = ("https://raw.githubusercontent.com/nyu-mll/crows-pairs/"
                   "8aaac11c485473159ec9328a65253a5be9a479dc/data/crows_pairs_anonymized.csv")
CROWS_PAIRS_FILE = "crows_pairs_anonymized.csv"
CROWS_PAIRS_SHA256 = "dfb36986ce0502abbaf7055b9176da3d08d48e07df1251991b5dfbcbceab9d0c"
CROWS_PAIRS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


@dataclass
class AuditConfig:
    model: str = "out-wikitext-tiny"      # a train.py checkpoint folder, or a GPT-2 name or folder
    task: str = setting("memorization", choices=("memorization", "crows_pairs"))  # what to measure
    json: bool = False                    # print one JSON object instead of a table
    device: str = "auto"                  # auto: cuda, then mps, then cpu
    dtype: str = "auto"                   # float32 | bfloat16 | float16; auto: bf16 where fast
    batch_size: int = setting(64, low=1)  # sequences decoded or scored together
    # memorization
    data_dir: str = ""                    # the data the model was trained on; default: the one its
                                          # checkpoint names
    text_file: str = ""                   # a UTF-8 file of candidates, one per line, instead of
                                          # the splits
    samples: int = setting(1000, low=1)   # windows drawn from each of the train and val splits
    prefix_tokens: int = setting(32, low=1)  # the prompt: a window's first tokens
    suffix_tokens: int = setting(32, low=1)  # the tokens greedy decoding must write exactly
    seed: int = setting(1337, low=0, high=2**62)  # which windows are drawn
    # crows_pairs
    source: str = ""                      # the CSV, or a folder holding it; default: downloaded
    cache_dir: str = "data/cache"         # where the download is kept
    check_sha256: bool = True             # refuse a CSV that differs from the published one


# ----------------------------------------------------------------------------- memorization

@torch.no_grad()
def reproduced_tokens(model, prefixes, targets):
    """How many tokens of each target greedy decoding writes after its prefix before a wrong one.
    prefixes (B, P), targets (B, S): token ids, a row per candidate, decoded together with the KV
    cache; it stops early once every row went wrong.

        greedy continuation [5, 6, 9] against the target [5, 6, 7] -> 2
    """
    device = model.token_emb.weight.device
    want = torch.as_tensor(targets, dtype=torch.long, device=device)
    idx = torch.as_tensor(prefixes, dtype=torch.long, device=device)
    matched = torch.zeros(len(idx), dtype=torch.long, device=device)
    right_so_far = torch.ones(len(idx), dtype=torch.bool, device=device)
    for step, token in enumerate(model.generate_tokens(idx, want.size(1), temperature=0)):
        right_so_far &= token == want[:, step]
        matched += right_so_far
        if not right_so_far.any():
            break
    return matched.tolist()


def decode_in_batches(model, prefixes, targets, batch_size, progress=None):
    """reproduced_tokens of rows of equal lengths, batch_size rows at a time."""
    matched = []
    for b in range(0, len(prefixes), batch_size):
        matched += reproduced_tokens(model, prefixes[b:b + batch_size], targets[b:b + batch_size])
        if progress is not None:
            progress.update(len(matched))
    if progress is not None:
        progress.close(len(matched))
    return matched


def sample_windows(ids, samples, length, seed):
    """`samples` windows of `length` tokens of a split at distinct random starts (all of them where
    it has fewer), as an array (windows, length) in the order of their starts."""
    count = len(ids) - length + 1
    if count < 1:
        return np.zeros((0, length), dtype=np.int64)
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(count, size=min(samples, count), replace=False))
    return np.stack([np.asarray(ids[s:s + length], dtype=np.int64) for s in starts])


def extractable_windows(model, ids, config, split):
    """{windows, extractable, reproduced} of a split: the share of windows whose suffix greedy
    decoding wrote exactly, and the mean share of suffix tokens it wrote before a wrong one."""
    P, S = config.prefix_tokens, config.suffix_tokens
    windows = sample_windows(ids, config.samples, P + S, config.seed)
    if not len(windows):
        raise UserError(f"the {split} split has {len(ids):,} tokens, fewer than a window of "
                        f"{P + S}: lower --prefix_tokens and --suffix_tokens")
    bar = Progress(f"decoding {split}", len(windows), "windows", 1)
    matched = np.array(decode_in_batches(model, windows[:, :P], windows[:, P:], config.batch_size,
                                         bar))
    return {"windows": len(windows), "extractable": float(np.mean(matched == S)),
            "reproduced": float(np.mean(matched) / S)}


def audit_splits(model, tokenizer, checkpoint, config):
    """Memorization of the model's training data: train windows, and val windows as the control."""
    data_dir = config.data_dir or checkpoint.get("train_config", {}).get("data_dir")
    if not data_dir:
        raise UserError(f"{config.model} does not say what data it was trained on: pass "
                        f"--data_dir=DIR")
    meta = load_meta(data_dir)
    if load_tokenizer(data_dir).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the model's: give "
                        f"the --data_dir it was trained on")
    if "val" not in meta.get("splits", {}):
        raise UserError(f"{data_dir} has no val split to compare with: prepare the data again")
    splits = {split: extractable_windows(model, load_split(data_dir, split), config, split)
              for split in ("train", "val")}
    return {"task": "memorization", "data_dir": str(data_dir),
            "prefix_tokens": config.prefix_tokens, "suffix_tokens": config.suffix_tokens,
            "seed": config.seed, "extractable": splits["train"]["extractable"], "splits": splits}


def candidate_lines(text, tokenizer, prefix_tokens, suffix_tokens):
    """[(line number, line, prompt ids, target ids)] of a file's lines of two tokens or more: its
    first prefix_tokens tokens and the suffix_tokens after them, or, for a line shorter than both
    together, its first half and the rest.

        "the keeper of the gate" (5 tokens), prefix 32, suffix 32 -> "the keeper", " of the gate"
    """
    candidates = []
    for number, line in enumerate(text.splitlines(), 1):
        ids = tokenizer.encode(line)
        if len(ids) >= 2:
            cut = prefix_tokens if len(ids) >= prefix_tokens + suffix_tokens else len(ids) // 2
            candidates.append((number, line, ids[:cut], ids[cut:cut + suffix_tokens]))
    return candidates


def audit_lines(model, tokenizer, config):
    """Memorization of a text file's lines: which ones greedy decoding completes exactly."""
    text = read_utf8(config.text_file, "--text_file")
    candidates = candidate_lines(text, tokenizer, config.prefix_tokens, config.suffix_tokens)
    if not candidates:
        raise UserError(f"--text_file={config.text_file} has no line of two tokens or more to "
                        f"test: write one candidate a line")
    # candidates with prompts and targets of the same lengths decode together
    by_shape = defaultdict(list)
    for candidate in candidates:
        by_shape[len(candidate[2]), len(candidate[3])].append(candidate)
    lines = []
    for group in by_shape.values():
        prompts, targets = np.array([c[2] for c in group]), np.array([c[3] for c in group])
        matched = decode_in_batches(model, prompts, targets, config.batch_size)
        for (number, line, prompt, target), count in zip(group, matched):
            lines.append({"line": number, "text": line, "prefix_tokens": len(prompt),
                          "suffix_tokens": len(target), "matched_tokens": count,
                          "extracted": count == len(target)})
    lines.sort(key=lambda row: row["line"])
    extracted = [row["line"] for row in lines if row["extracted"]]
    return {"task": "memorization", "text_file": config.text_file, "candidates": len(lines),
            "extractable": len(extracted) / len(lines), "extracted_lines": extracted,
            "lines": lines}


def check_window(model, config):
    """A prompt and the suffix after it must fit in the model's context together."""
    window, block = config.prefix_tokens + config.suffix_tokens, model.config.block_size
    if window > block:
        raise UserError(f"--prefix_tokens + --suffix_tokens = {window} is more than the model's "
                        f"context of {block} tokens: lower them")

# ----------------------------------------------------------------------------- CrowS-Pairs


def crows_pairs_csv(config):
    """(path, text) of the CrowS-Pairs CSV: --source (the file, or a folder holding it), else
    downloaded once into cache_dir, checked against its sha256."""
    if not config.source:
        from download import download  # the network: only without --source
        path = download(CROWS_PAIRS_URL, Path(config.cache_dir) / CROWS_PAIRS_FILE,
                        CROWS_PAIRS_SHA256, offline_hint=f"download {CROWS_PAIRS_FILE} from "
                        f"github.com/nyu-mll/crows-pairs and pass --source=PATH")
        return path, read_utf8(path, "the CrowS-Pairs CSV")
    path = Path(config.source)
    if path.is_dir():
        path = path / CROWS_PAIRS_FILE
        if not path.is_file():
            raise UserError(f"--source={config.source} has no {CROWS_PAIRS_FILE}: give the CSV or "
                            f"the folder that holds it")
    return path, read_utf8(path, "--source")


def read_pairs(path, text, check_sha256=True):
    """The pairs of a CrowS-Pairs CSV, dicts of its sent_more, sent_less, stereo_antistereo and
    bias_type, or a UserError for a file that is not one."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [name for name in CROWS_PAIRS_COLUMNS if name not in (reader.fieldnames or [])]
    get_it = f"give {CROWS_PAIRS_FILE} from github.com/nyu-mll/crows-pairs"
    if missing:
        raise UserError(f"{path} is not the CrowS-Pairs CSV (it has no {', '.join(missing)} "
                        f"column): {get_it}")
    try:
        pairs = [{name: row[name] for name in CROWS_PAIRS_COLUMNS} for row in reader]
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not CSV ({e}): {get_it}")
    empty = next((n for n, pair in enumerate(pairs, 2)
                  if not (pair["sent_more"] and pair["sent_less"])), None)
    if not pairs or empty is not None:
        problem = f"row {empty} has an empty sentence" if pairs else "it has no pairs"
        raise UserError(f"{path} is not the CrowS-Pairs CSV ({problem}): {get_it}")
    if check_sha256 and hashlib.sha256(text.encode("utf-8")).hexdigest() != CROWS_PAIRS_SHA256:
        raise UserError(f"{path} differs from the published CrowS-Pairs CSV (sha256): use a fresh "
                        f"copy, or --check_sha256=False to score it as it is")
    return pairs


def scoring_rows(length, block):
    """[(start, stop, first)] for a sequence of `length` ids: rows ids[start:stop] of at most
    block + 1 ids that score the targets ids[first:stop], every target once, those after the first
    row with at least block // 2 ids of context (evaluate.py's sliding windows).

        scoring_rows(10, 32) -> [(0, 10, 1)]
        scoring_rows(10, 4) -> [(0, 5, 1), (2, 7, 5), (4, 9, 7), (5, 10, 9)]
    """
    rows, first = [], 1
    while first < length:
        stop = min(length, first + (block if first == 1 else max(1, block // 2)))
        rows.append((max(0, stop - 1 - block), stop, first))
        first = stop
    return rows


@torch.no_grad()
def log_likelihoods(model, sequences, batch_size=64):
    """The log-likelihood (nats) of each id list's tokens after its first: its rows (scoring_rows),
    padded on the right into batches, scored in float32 at least."""
    device = model.token_emb.weight.device
    rows = [(n, ids[start:stop], first - start) for n, ids in enumerate(sequences)
            for start, stop, first in scoring_rows(len(ids), model.config.block_size)]
    rows.sort(key=lambda row: len(row[1]))  # similar lengths together: little padding
    totals = [0.0] * len(sequences)
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        width = max(len(ids) for _, ids, _ in batch)
        padded = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for i, (_, ids, first) in enumerate(batch):
            padded[i, :len(ids)] = torch.tensor(ids)
            # the targets ids[first:] are predicted at positions first - 1 on
            scored[i, first - 1:len(ids) - 1] = True
        padded = padded.to(device)
        logits, _ = model(padded[:, :-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, padded[:, 1:, None])[..., 0]
        for (n, _, _), total in zip(batch, (logprobs.cpu() * scored).sum(dim=1).tolist()):
            totals[n] += total
    return totals


def stereotype_preference(more, less):
    """{pairs, pct_stereotype, likelihood_diff} of pairs whose sentences scored `more`, `less`."""
    pairs = len(more)
    return {"pairs": pairs, "pct_stereotype": sum(a > b for a, b in zip(more, less)) / pairs,
            "likelihood_diff": sum(abs(a - b) for a, b in zip(more, less)) / pairs}


def audit_crows_pairs(model, tokenizer, config):
    """CrowS-Pairs: pct_stereotype and likelihood_diff over all pairs and per bias type."""
    path, text = crows_pairs_csv(config)
    pairs = read_pairs(path, text, config.check_sha256)
    sentences = [tokenizer.encode_document(pair[key]) for pair in pairs
                 for key in ("sent_more", "sent_less")]
    scores = log_likelihoods(model, sentences, config.batch_size)
    more, less = scores[0::2], scores[1::2]
    of_type = defaultdict(list)
    for i, pair in enumerate(pairs):
        of_type[pair["bias_type"]].append(i)
    by_type = {name: stereotype_preference([more[i] for i in rows], [less[i] for i in rows])
               for name, rows in sorted(of_type.items(), key=lambda item: -len(item[1]))}
    first = "after an end-of-text token" if tokenizer.eot_id is not None else "its first unscored"
    return {"task": "crows_pairs", "source": str(path), **stereotype_preference(more, less),
            "by_bias_type": by_type, "scored": first}

# ----------------------------------------------------------------------------- the results file


# ----------------------------------------------------------------------------- command line


def check_flags(config):
    """Refuse a setting of the other task: it would be ignored without a word."""
    others = {"memorization": ("source",), "crows_pairs": ("data_dir", "text_file")}[config.task]
    given = [name for name in others if getattr(config, name)]
    if given:
        raise UserError(f"--{given[0]} is not a setting of --task={config.task}: leave it out, or "
                        f"choose the other task")


def main():
    config = parse_config(AuditConfig, renamed={"out_dir": "model"})
    check_flags(config)
    model, tokenizer, checkpoint = load_for_inference(config.model, config.device, config.dtype)
    if config.task == "crows_pairs":
        result, key = audit_crows_pairs(model, tokenizer, config), "crows_pairs"
    elif config.text_file:
        check_window(model, config)
        result, key = audit_lines(model, tokenizer, config), "memorization_text_file"
    else:
        check_window(model, config)
        result, key = audit_splits(model, tokenizer, checkpoint, config), "memorization"
    result = {"model": config.model, **result}
    # a text file's lines are recorded by number only (extracted_lines), never by their text
    saved = record_result(config.model, key, {k: v for k, v in result.items() if k != "lines"})
    if config.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_result(result, config)
    if saved is not None:
        print(f"recorded in {saved}", file=sys.stderr)


def percent(fraction):
    return f"{100 * fraction:.2f}%"


def print_result(result, config):
    """The result as a table."""
    if result["task"] == "crows_pairs":
        print(f"{config.model} on CrowS-Pairs ({result['pairs']:,} pairs), each sentence's "
              f"log-likelihood {result['scored']}")
        print(f"  {'bias type':22s} {'pairs':>6s} {'stereotype':>11s} {'likelihood diff':>16s}")
        for name, row in [*result["by_bias_type"].items(), ("all", result)]:
            print(f"  {name:22s} {row['pairs']:6,d} {percent(row['pct_stereotype']):>11s} "
                  f"{row['likelihood_diff']:16.3f}")
        print("  stereotype: the share of pairs whose more stereotyping sentence the model finds "
              "likelier (50%: no preference)")
    elif "text_file" in result:
        extracted = [row for row in result["lines"] if row["extracted"]]
        print(f"{config.model}: {len(extracted)} of {result['candidates']} lines of "
              f"{result['text_file']} extracted (greedy decoding wrote the rest from their start)")
        for row in extracted:
            print(f"  line {row['line']}: {row['text']}")
    else:
        P, S = config.prefix_tokens, config.suffix_tokens
        print(f"{config.model} on {result['data_dir']}: windows of {P} + {S} tokens, extractable "
              f"where greedy decoding writes the last {S} exactly")
        print(f"  {'split':8s} {'windows':>8s} {'extractable':>12s} {'tokens reproduced':>18s}")
        for split, row in result["splits"].items():
            print(f"  {split:8s} {row['windows']:8,d} {percent(row['extractable']):>12s} "
                  f"{percent(row['reproduced']):>18s}")
        print("  (val: text the model never trained on, the control)")


if __name__ == "__main__":
    run_main(main)
