"""
Fine-tune a GPT to classify text: a linear head reads the model's features at the last real token of each text
(with causal attention, the only position that has seen the whole text).

    python finetune_classifier.py --model=out-wikitext-tiny                      # SMS spam, from our own checkpoint
    python finetune_classifier.py --model=out-wikitext-tiny --data=my_labels.tsv --num_epochs=3 --out_dir=out-mine
    python finetune_classifier.py --model=gpt2 --trainable=last_block --learning_rate=5e-5   # from GPT-2 small
    python finetune_classifier.py --model=scratch --tokenizer_dir=out-wikitext-tiny  # random weights, same shape
    python finetune_classifier.py --model=out-spam --classify="You won a FREE prize, call now"

Data: the SMS Spam Collection (downloaded and checked, or --data=PATH/SMSSpamCollection), or any file of labelled
texts: tab-separated (quotes are plain text), or .csv with quoted fields. The label and text columns are found by a
header ('label', 'text', ...) or given with --label_column/--text_column; without a header the label is column 0 and
the text column 1, as in the SMS file. The labels are whatever the file holds. Every label is cut down to the count of
the rarest one (747 spam + 747 ham), then each label is split 70/10/20 into train/val/test, seeded: every split is
balanced, so chance is 50% and accuracy means something.

--trainable picks what learns (the new head always does):
    all         every weight
    last_block  the last block + the final norm
    lora        low-rank adapters on every attention and MLP projection (--lora_rank)
    head        the head alone
lora trains a few percent of the weights but still runs the whole backward pass, so it saves memory (optimizer
state, and one copy of the weights per task), not much time. The adapters are merged into the weights when saved:
the saved model is a plain GPT and costs nothing extra at inference. What each mode costs and buys on SMS spam is
measured by bench/bench_finetune.py (figures in the README).

out_dir receives ckpt.pt (the epoch with the best val accuracy, ties to the lower val loss), the tokenizer files, and
results.json (test accuracy and the per-epoch figures). finetune.load_classifier and finetune.classify serve other
programs.
"""

import csv
import hashlib
import io
import os
import random
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import save_checkpoint
from cli import UserError, parse_config, run_main, setting
from download import download, sha256_of
from files import atomic_write, read_utf8, write_json
from finetune import (FinetuneConfig, GPTClassifier, classify, count_parameters, encode_texts, fine_tuning_run, fit,
                      load_base_model, load_classifier, pad_batch, run_epoch, set_trainable, with_model)
from lora import merged_state_dict
from runtime import pick_device


@dataclass
class FinetuneClassifierConfig(FinetuneConfig):  # the settings of finetune.py, then these
    out_dir: str = "out-spam"            # the classifier, its tokenizer and results.json go here
    trainable: str = setting("all", choices=("all", "last_block", "head", "lora"))  # what learns (see the top of this
                                                                                    # file)
    # data
    data: str = ""                       # labelled texts (TSV or CSV); empty: the SMS Spam Collection, downloaded
    label_column: str = ""               # a header name or a 0-based index; empty: a 'label' header, else column 0
    text_column: str = ""                # likewise: a 'text' / 'message' header, else column 1
    balance: bool = True                 # cut every label to the rarest one's count (False: keep all, split per
                                         # label)
    max_length: int = setting(0, low=0)  # tokens read per text; 0: the longest train text (<= block)
    # inference only
    classify: str = ""                   # print the label of this text with the classifier in --model (or out_dir)


TRAINABLE = ("all", "last_block", "head", "lora")
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_MEMBER, SMS_SHA256 = "SMSSpamCollection", "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABEL_HEADERS, TEXT_HEADERS = ("label", "labels", "class", "category", "target"), ("text", "message", "sentence")

# ----------------------------------------------------------------------------- data


def download_sms_spam(cache_dir):
    """The SMS Spam Collection file: taken from UCI's zip, checked against the published file's sha256."""
    dest = Path(cache_dir) / SMS_MEMBER
    if dest.is_file() and sha256_of(dest) == SMS_SHA256:
        return dest
    archive = Path(cache_dir) / "sms+spam+collection.zip"
    for _ in range(2):  # the zip has no published checksum: a bad member means the zip is refetched once
        download(SMS_URL, archive, desc="SMS Spam Collection",
                 offline_hint="download it yourself and pass --data=PATH/SMSSpamCollection")
        try:
            member = zipfile.ZipFile(archive).read(SMS_MEMBER)
        except (zipfile.BadZipFile, KeyError):
            member = b""
        if hashlib.sha256(member).hexdigest() == SMS_SHA256:
            return atomic_write(dest, lambda tmp: tmp.write_bytes(member))
        archive.unlink()
    raise UserError(f"{SMS_URL} does not hold the published {SMS_MEMBER} (sha256 differs); "
                    f"get the file elsewhere and pass --data=PATH")


def find_column(choice, header, known, fallback, what):
    """(index, named) of a column: given as an index or a header name, else found by a known header name."""
    if choice.isdigit():
        return int(choice), False
    if choice:
        if choice.lower() not in header:
            raise UserError(f"--{what}_column={choice}: the first line has no such column (it has {', '.join(header)})")
        return header.index(choice.lower()), True
    found = next((name for name in known if name in header), None)
    return (header.index(found), True) if found else (fallback, False)


def read_labelled(path, label_column="", text_column=""):
    """[(text, label)] from a tab-separated file (quotes are plain text, as in the SMS file) or a .csv."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data={path}: no such file (give a TSV or CSV of labelled texts, or leave --data empty "
                        f"to download the SMS Spam Collection)")
    quoting = {} if path.suffix.lower() == ".csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    rows = [row for row in csv.reader(io.StringIO(read_utf8(path), newline=""), **quoting) if row]
    if not rows:
        raise UserError(f"{path} is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    label_i, label_named = find_column(label_column, header, LABEL_HEADERS, 0, "label")
    text_i, text_named = find_column(text_column, header, TEXT_HEADERS, 1, "text")
    rows = rows[1:] if label_named or text_named else rows
    for line, row in enumerate(rows, start=2 if label_named or text_named else 1):
        if len(row) <= max(label_i, text_i):
            raise UserError(f"{path}:{line}: {len(row)} column(s), but the label is column {label_i} and the text "
                            f"column {text_i} (set --label_column / --text_column)")
    return [(row[text_i], row[label_i].strip()) for row in rows]


def balanced_split(examples, seed, balance=True, fractions=(0.7, 0.1)):
    """Split [(text, label)] into train, val, test lists of (text, label index), each label split 70/10/20 on its
    own (seeded); with balance, every label first cut to the rarest one's count. Returns (splits, label names)."""
    by_label = {}
    for text, label in examples:
        by_label.setdefault(label, []).append(text)
    labels = sorted(by_label)
    if len(labels) < 2:
        raise UserError(f"the data has {len(labels)} label(s) ({', '.join(labels)}): classification needs two or more")
    rng = random.Random(seed)
    rarest = min(len(texts) for texts in by_label.values())
    splits = ([], [], [])
    for index, label in enumerate(labels):
        texts = by_label[label]
        rng.shuffle(texts)
        texts = texts[:rarest] if balance else texts
        train_end = int(len(texts) * fractions[0])
        val_end = train_end + int(len(texts) * fractions[1])
        for split, part in zip(splits, (texts[:train_end], texts[train_end:val_end], texts[val_end:])):
            split.extend((text, index) for text in part)
    if not all(splits):
        raise UserError(f"too few examples ({rarest} of label '{min(by_label, key=lambda k: len(by_label[k]))}') "
                        f"to fill train, val and test: at least 10 per label are needed")
    for split in splits:
        rng.shuffle(split)  # labels interleaved, so every batch mixes them
    return splits, labels


def encode_splits(tokenizer, splits, max_length, block_size):
    """([(ids, label)] per split, max_length): each text's ids cut to max_length, which 0 sets to the longest
    train text's length (at most block_size)."""
    if max_length > block_size:
        raise UserError(f"--max_length={max_length} is beyond the model's block_size={block_size}")
    encoded = [encode_texts(tokenizer, [text for text, _ in split], None) for split in splits]
    max_length = max_length or min(block_size, max(map(len, encoded[0])))
    longer = sum(len(ids) > max_length for ids in encoded[0])
    print(f"reading up to {max_length} tokens per text ({longer} train texts are longer)")
    return [[(ids[:max_length], label) for ids, (_, label) in zip(ids_of_split, split)]
            for ids_of_split, split in zip(encoded, splits)], max_length


def classification_loss(model, batch):
    """(mean cross-entropy, correct predictions, predictions) of a batch: run_epoch's contract."""
    ids, lengths, targets = batch
    logits = model(ids, lengths)
    return F.cross_entropy(logits.float(), targets), (logits.argmax(-1) == targets).sum().item(), len(targets)


def train_classifier(config, device):
    """Fine-tune, keep the best val epoch in out_dir, score it on test, write results.json."""
    t0 = time.time()
    examples = read_labelled(config.data or download_sms_spam(config.cache_dir), config.label_column,
                             config.text_column)
    splits, labels = balanced_split(examples, config.seed, config.balance)
    print(f"{len(examples):,} examples, labels {', '.join(labels)}: train {len(splits[0])}, val {len(splits[1])}, "
          f"test {len(splits[2])}")
    torch.manual_seed(config.seed)  # the head's and the adapters' initial weights
    gpt, tokenizer = load_base_model(config, device)
    (train_set, val_set, test_set), max_length = encode_splits(tokenizer, splits, config.max_length,
                                                               gpt.config.block_size)
    model = GPTClassifier(gpt, labels, max_length).to(device)
    set_trainable(gpt, config.trainable, config.lora_rank, config.lora_alpha, TRAINABLE)
    trainable, total = count_parameters(model)
    print(f"init from {config.model}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
          f"({config.trainable}); AdamW state {8 * trainable / 2**20:.1f} MiB; device {device}")

    def collate(items):
        ids, lengths = pad_batch([ids for ids, _ in items], tokenizer.eot_id)
        return ids.to(device), lengths.to(device), torch.tensor([label for _, label in items], device=device)

    def save(epoch, row):  # then the tokenizer: the out_dir alone is enough to classify
        save_checkpoint({"model": merged_state_dict(model), "model_config": asdict(gpt.config), "labels": labels,
                         "max_length": max_length, "tokenizer_sha256": tokenizer.fingerprint(),
                         "finetune_config": asdict(config), "epoch": epoch, "val_loss": row["val_loss"],
                         "val_accuracy": row["val_accuracy"]}, config.out_dir)
        tokenizer.save(config.out_dir)

    rows = fit(model, config, train_set, val_set, collate, classification_loss,
               lambda val: (val["accuracy"], -val["loss"]), save)

    best, _ = load_classifier(config.out_dir, device)
    test = run_epoch(best, [collate(test_set[i:i + 64]) for i in range(0, len(test_set), 64)], classification_loss,
                     dtype=config.dtype)
    best_epoch = max(rows, key=lambda row: (row["val_accuracy"], -row["val_loss"]))["epoch"]  # the first best
    results = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "best_epoch": best_epoch,
               "labels": labels, "examples": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
               "model": config.model, "trainable": config.trainable, "trainable_parameters": trainable,
               "parameters": total, "seconds": time.time() - t0, "epochs": rows, "config": asdict(config)}
    write_json(Path(config.out_dir) / "results.json", results)
    print(f"test accuracy {test['accuracy']:.2%} ({round(test['accuracy'] * len(test_set))}/{len(test_set)}), "
          f"test loss {test['loss']:.4f}, from epoch {best_epoch}; {time.time() - t0:.0f}s in all -> "
          f"{os.path.join(config.out_dir, 'results.json')}")


def main():
    config = parse_config(FinetuneClassifierConfig, renamed={"init_from": "model"})
    config = with_model(config, answering=bool(config.classify))
    device = pick_device(config.device)
    if config.classify:
        model, tokenizer = load_classifier(config.model, device)
        label, probability = classify(model, tokenizer, [config.classify])[0]
        print(f"{label} ({probability:.1%})")
        return
    with fine_tuning_run(config):
        train_classifier(config, device)


if __name__ == "__main__":
    run_main(main)
