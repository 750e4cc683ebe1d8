"""
Fine-tune a GPT to classify text: a linear head reads the model's features at the last real token of each text
(with causal attention, the only position that has seen the whole text).

    python finetune_classifier.py --init_from=out-wikitext-tiny                   # SMS spam, from our own checkpoint
    python finetune_classifier.py --init_from=out-wikitext-tiny --data=my_labels.tsv --num_epochs=3 --out_dir=out-mine
    python finetune_classifier.py --init_from=gpt2 --trainable=last_block --learning_rate=5e-5   # from GPT-2 small
    python finetune_classifier.py --init_from=scratch --tokenizer_dir=out-wikitext-tiny  # random weights, same shape
    python finetune_classifier.py --out_dir=out-spam --classify="You won a FREE prize, call now"

Data: the SMS Spam Collection (downloaded and checked, or --data=PATH/SMSSpamCollection), or any file of labelled
texts: tab-separated (quotes are plain text), or .csv with quoted fields. The label and text columns are found by a
header ('label', 'text', ...) or given with --label_column/--text_column; without a header the label is column 0 and
the text column 1, as in the SMS file. The labels are whatever the file holds. Every label is cut down to the count of
the rarest one (747 spam + 747 ham), then each label is split 70/10/20 into train/val/test, seeded: every split is
balanced, so chance is 50% and accuracy means something.

--trainable picks what learns (the new head always does). From `python bench/bench_finetune.py` on 2 CPU cores (bf16
autocast), SMS spam, our 5.3M-parameter WikiText-2 model, 5 epochs, mean test accuracy over 3 seeds (learning rate
3e-4 for all, 1e-3 for the others); memory is the gradients + AdamW's two moments (the weights are the same for all):
                trains                                      step (8 texts)  grads+AdamW  test acc
    all         every weight                                      101 ms      60 MiB     96.4%
    last_block  the last block + final norm                        58 ms       9 MiB     93.6%
    lora        adapters on every attention and MLP projection     86 ms     1.5 MiB     94.2%
                (rank 8)
    head        the head alone                                     48 ms       0 MiB     91.3%
lora trains 2.5% of the weights but still runs the whole backward pass, so it saves memory (optimizer state, and one
copy of the weights per task), not much time. The adapters are merged into the weights when saved: the saved model
is a plain GPT and costs nothing extra at inference. On a model this small, training everything is cheap and
clearly the most accurate; on GPT-2 sizes the memory column is what decides.

out_dir receives ckpt.pt (the epoch with the best val accuracy, ties to the lower val loss), the tokenizer files, and
results.json (test accuracy and the per-epoch figures). `load_classifier` and `classify` serve other programs.
"""

import csv
import hashlib
import json
import math
import os
import random
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare
from cli import UserError, config_to_dict, parse_config, run_main
from model import (CHECKPOINT_NAME, GPT, GPT2_MODELS, GPTConfig, add_lora, has_fast_bf16, is_gpt2, load_gpt2,
                   merged_state_dict, pick_device, read_checkpoint, save_checkpoint)
from tokenizer import load_tokenizer


@dataclass
class Config:
    # data
    data: str = ""                    # labelled texts (TSV or CSV); empty: the SMS Spam Collection, downloaded
    label_column: str = ""            # a header name or a 0-based index; empty: a 'label' header, else column 0
    text_column: str = ""             # likewise: a 'text' / 'message' header, else column 1
    balance: bool = True              # cut every label to the rarest one's count (False: keep all, split per label)
    max_length: int = 0               # tokens read per text, the rest cut; 0: the longest train text (<= block)
    # the model to start from: a train.py checkpoint folder, gpt2[-medium|-large|-xl], a folder with
    # model.safetensors + config.json (Hugging Face format), or scratch (random weights of the shape below)
    init_from: str = "out-wikitext-tiny"
    out_dir: str = "out-spam"
    trainable: str = "all"            # all | last_block | head | lora (see the top of this file)
    lora_rank: int = 8
    lora_alpha: float = 16.0          # the update is scaled by lora_alpha / lora_rank
    dropout: float = 0.1
    gpt2_dir: str = ""                # GPT-2's tokenizer files (vocab.json + merges.txt, or encoder.json + vocab.bpe)
    cache_dir: str = "data/cache"     # downloads: the SMS data, GPT-2 weights
    # --init_from=scratch: the tokenizer and shape (defaults: config/wikitext_tiny.py's, for a fair comparison)
    tokenizer_dir: str = "data/wikitext-2"
    block_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # training
    num_epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0            # 0 turns clipping off
    seed: int = 123
    device: str = "auto"              # auto: cuda, then mps, then cpu
    # inference only: print the label of this text with the model in out_dir
    classify: str = ""


TRAINABLE = ("all", "last_block", "head", "lora")
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_MEMBER, SMS_SHA256 = "SMSSpamCollection", "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABEL_HEADERS, TEXT_HEADERS = ("label", "labels", "class", "category", "target"), ("text", "message", "sentence")

# ----------------------------------------------------------------------------- data


def download_sms_spam(cache_dir):
    """The SMS Spam Collection file: taken from UCI's zip, checked against the published file's sha256."""
    dest = Path(cache_dir) / SMS_MEMBER
    if dest.is_file() and prepare.sha256_of(dest) == SMS_SHA256:
        return dest
    archive = Path(cache_dir) / "sms+spam+collection.zip"
    for _ in range(2):  # the zip has no published checksum: a bad member means the zip is refetched once
        prepare.download(SMS_URL, archive, desc="SMS Spam Collection",
                         offline_hint="download it yourself and pass --data=PATH/SMSSpamCollection")
        try:
            member = zipfile.ZipFile(archive).read(SMS_MEMBER)
        except (zipfile.BadZipFile, KeyError):
            member = b""
        if hashlib.sha256(member).hexdigest() == SMS_SHA256:
            dest.with_suffix(".tmp").write_bytes(member)
            os.replace(dest.with_suffix(".tmp"), dest)
            return dest
        archive.unlink()
    raise UserError(f"{SMS_URL} does not hold the published {SMS_MEMBER} (sha256 differs); "
                    f"get the file elsewhere and pass --data=PATH")


def _column(choice, header, known, fallback, what):
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
    try:
        with open(path, encoding="utf-8", newline="") as f:
            quoting = {} if path.suffix.lower() == ".csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
            rows = [row for row in csv.reader(f, **quoting) if row]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it first")
    if not rows:
        raise UserError(f"{path} is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    label_i, label_named = _column(label_column, header, LABEL_HEADERS, 0, "label")
    text_i, text_named = _column(text_column, header, TEXT_HEADERS, 1, "text")
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


def encode_texts(tokenizer, texts, max_length):
    """Token ids of each text, cut to max_length; an empty text becomes the end-of-text token alone."""
    return [ids[:max_length] or [tokenizer.eot_id] for ids in tokenizer.encode_batch(texts)]


def pad_batch(sequences, pad_id):
    """(B, T) ids padded on the right to the longest sequence, and each sequence's real length."""
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids, torch.tensor([len(seq) for seq in sequences])

# ----------------------------------------------------------------------------- the model


class GPTClassifier(nn.Module):
    """A GPT read by a linear head over the labels, at each text's last real token."""

    def __init__(self, gpt, labels, max_length):
        super().__init__()
        self.gpt, self.labels, self.max_length = gpt, list(labels), max_length
        self.head = nn.Linear(gpt.config.hidden_size, len(labels))

    def forward(self, idx, lengths):
        hidden = self.gpt.hidden_states(idx)  # (B, T, hidden_size)
        # right padding comes after the last real token, which causal attention never lets it see
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.head(last)  # (B, num_labels) logits


def load_base_model(cfg, device):
    """(GPT, tokenizer) to fine-tune, from cfg.init_from: a train.py checkpoint, GPT-2, or random weights."""
    init = cfg.init_from
    if init == "scratch":
        tokenizer = load_tokenizer(cfg.tokenizer_dir)
        gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                            dropout=cfg.dropout, bias=False))
        return gpt.to(device), tokenizer
    if is_gpt2(init):
        return load_gpt2(init, cfg.cache_dir, cfg.gpt2_dir, cfg.dropout, device)
    if os.path.isfile(os.path.join(init, CHECKPOINT_NAME)):
        checkpoint = read_checkpoint(init, device)
        if "labels" in checkpoint:
            raise UserError(f"{init} holds a fine-tuned classifier; start from a language model checkpoint")
        gpt = GPT(GPTConfig(**{**checkpoint["model_config"], "dropout": cfg.dropout}))
        gpt.load_state_dict(checkpoint["model"])
        return gpt.to(device), load_tokenizer(init)
    raise UserError(f"--init_from={init}: no {os.path.join(init, CHECKPOINT_NAME)} (train one: python train.py "
                    f"config/wikitext_tiny.py), and not {', '.join(GPT2_MODELS)}, a folder with model.safetensors, "
                    f"or scratch")


def set_trainable(gpt, mode, lora_rank=8, lora_alpha=16.0, modes=TRAINABLE):
    """Freeze the GPT's weights that `mode` leaves out (lora first adds the adapters). Modules outside the GPT,
    such as a new head, are left trainable."""
    if mode not in modes:
        raise UserError(f"--trainable={mode}: choose one of {', '.join(modes)}")
    if mode == "lora":
        add_lora(gpt, lora_rank, lora_alpha)
    last = f"blocks.{len(gpt.blocks) - 1}."
    for name, param in gpt.named_parameters():
        param.requires_grad = (mode == "all" or (mode == "last_block" and name.startswith((last, "ln_f.")))
                               or (mode == "lora" and "lora_" in name))

# ----------------------------------------------------------------------------- training (finetune_instruct.py too)


def run_epoch(model, batches, loss_fn, optimizer=None, grad_clip=1.0):
    """One pass over batches: trains with an optimizer (dropout on), else evaluates. loss_fn(model, batch) returns
    (mean loss, correct predictions, predictions); the figures are weighted by predictions."""
    model.train(optimizer is not None)
    device_type = next(model.parameters()).device.type
    bf16 = has_fast_bf16(device_type)  # matmuls in bf16 where the hardware has it (GPU or CPU)
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
    total_loss, correct, count = 0.0, 0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for batch in batches:
            with autocast:
                loss, n_correct, n = loss_fn(model, batch)
            if optimizer is not None:
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total_loss, correct, count = total_loss + loss.item() * n, correct + n_correct, count + n
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}


def fit(model, cfg, train_set, val_set, collate, loss_fn, score, save):
    """AdamW on the trainable parameters for cfg.num_epochs shuffled passes over train_set. After each epoch: the
    train figures (averaged while training) and val figures; save(epoch, row) when score(val figures) is the best
    so far. Returns the per-epoch rows."""
    # configure_optimizer only walks model.parameters(), so it serves any module: decay on matrices only
    optimizer = GPT.configure_optimizer(model, cfg.weight_decay, cfg.learning_rate, (0.9, 0.999),
                                        next(model.parameters()).device.type)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = cfg.batch_size
    val_batches = [collate(val_set[i:i + size]) for i in range(0, len(val_set), size)]
    rows, best = [], None
    for epoch in range(1, cfg.num_epochs + 1):
        t0 = time.time()
        order = torch.randperm(len(train_set), generator=generator).tolist()
        train_batches = (collate([train_set[j] for j in order[i:i + size]]) for i in range(0, len(order), size))
        train = run_epoch(model, train_batches, loss_fn, optimizer, cfg.grad_clip)
        train_seconds = time.time() - t0
        if not math.isfinite(train["loss"]):
            raise UserError(f"the loss is {train['loss']} in epoch {epoch}: training diverged; lower --learning_rate")
        val = run_epoch(model, val_batches, loss_fn)
        row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": time.time() - t0,
               "ms_per_step": 1000 * train_seconds / math.ceil(len(train_set) / size)}
        rows.append(row)
        improved = best is None or score(val) > best
        print(f"epoch {epoch}/{cfg.num_epochs}: train loss {train['loss']:.4f}, accuracy {train['accuracy']:.2%} | "
              f"val loss {val['loss']:.4f}, accuracy {val['accuracy']:.2%} | {row['seconds']:.1f}s"
              + (" | saved" if improved else ""), flush=True)
        if improved:
            best = score(val)
            save(epoch, row)
    return rows


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())

# ----------------------------------------------------------------------------- saving, loading, classifying


def load_classifier(out_dir, device="cpu"):
    """(GPTClassifier in eval mode, tokenizer) from a folder this script wrote."""
    checkpoint = read_checkpoint(out_dir, device)
    if "labels" not in checkpoint:
        raise UserError(f"{out_dir} holds no classifier: train one with python finetune_classifier.py "
                        f"--out_dir={out_dir}")
    model = GPTClassifier(GPT(GPTConfig(**checkpoint["model_config"])), checkpoint["labels"], checkpoint["max_length"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), load_tokenizer(out_dir)


@torch.no_grad()
def classify(model, tokenizer, texts, batch_size=32):
    """[(label, probability)] for each text: the most likely label and the model's probability for it."""
    model.eval()
    device = next(model.parameters()).device
    results = []
    for i in range(0, len(texts), batch_size):
        ids, lengths = pad_batch(encode_texts(tokenizer, texts[i:i + batch_size], model.max_length), tokenizer.eot_id)
        probs, best = model(ids.to(device), lengths.to(device)).softmax(dim=-1).max(dim=-1)
        results += [(model.labels[k], p) for k, p in zip(best.tolist(), probs.tolist())]
    return results


def check_training_settings(cfg, modes=TRAINABLE):
    """The settings both fine-tuning scripts share, checked before any work."""
    if cfg.trainable not in modes:
        raise UserError(f"--trainable={cfg.trainable}: choose one of {', '.join(modes)}")
    if cfg.num_epochs < 1 or cfg.batch_size < 1:
        raise UserError("--num_epochs and --batch_size must be at least 1")


def write_json(path, data):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # readers never see half a file

# ----------------------------------------------------------------------------- main


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    if cfg.classify:
        model, tokenizer = load_classifier(cfg.out_dir, device)
        label, probability = classify(model, tokenizer, [cfg.classify])[0]
        print(f"{label} ({probability:.1%})")
        return
    check_training_settings(cfg)

    t0 = time.time()
    examples = read_labelled(cfg.data or download_sms_spam(cfg.cache_dir), cfg.label_column, cfg.text_column)
    (train_set, val_set, test_set), labels = balanced_split(examples, cfg.seed, cfg.balance)
    torch.manual_seed(cfg.seed)  # the head's and the adapters' initial weights
    gpt, tokenizer = load_base_model(cfg, device)

    block_size = gpt.config.block_size
    if cfg.max_length > block_size:
        raise UserError(f"--max_length={cfg.max_length} is beyond the model's block_size={block_size}")
    splits = [encode_texts(tokenizer, [text for text, _ in split], None) for split in (train_set, val_set, test_set)]
    max_length = cfg.max_length or min(block_size, max(map(len, splits[0])))
    longer = sum(len(ids) > max_length for ids in splits[0])
    train_set, val_set, test_set = ([(ids[:max_length], label) for ids, (_, label) in zip(encoded, split)]
                                    for encoded, split in zip(splits, (train_set, val_set, test_set)))

    model = GPTClassifier(gpt, labels, max_length).to(device)
    set_trainable(gpt, cfg.trainable, cfg.lora_rank, cfg.lora_alpha)
    trainable, total = count_parameters(model)
    print(f"{len(examples):,} examples, labels {', '.join(labels)}: train {len(train_set)}, val {len(val_set)}, "
          f"test {len(test_set)}; reading up to {max_length} tokens per text ({longer} train texts are longer)")
    print(f"init from {cfg.init_from}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
          f"({cfg.trainable}); AdamW state {8 * trainable / 2**20:.1f} MiB; device {device}")

    def collate(items):
        ids, lengths = pad_batch([ids for ids, _ in items], tokenizer.eot_id)
        return ids.to(device), lengths.to(device), torch.tensor([label for _, label in items], device=device)

    def loss_fn(model, batch):
        ids, lengths, targets = batch
        logits = model(ids, lengths)
        return F.cross_entropy(logits.float(), targets), (logits.argmax(-1) == targets).sum().item(), len(targets)

    def save(epoch, row):
        save_checkpoint({"model": merged_state_dict(model), "model_config": asdict(gpt.config), "labels": labels,
                         "max_length": max_length, "finetune_config": config_to_dict(cfg), "epoch": epoch,
                         "val_loss": row["val_loss"], "val_accuracy": row["val_accuracy"]}, cfg.out_dir)

    os.makedirs(cfg.out_dir, exist_ok=True)
    tokenizer.save(cfg.out_dir)  # the out_dir alone is enough to classify
    rows = fit(model, cfg, train_set, val_set, collate, loss_fn, lambda val: (val["accuracy"], -val["loss"]), save)

    best, _ = load_classifier(cfg.out_dir, device)
    test = run_epoch(best, [collate(test_set[i:i + 64]) for i in range(0, len(test_set), 64)], loss_fn)
    best_epoch = max(rows, key=lambda row: (row["val_accuracy"], -row["val_loss"]))["epoch"]  # the first best
    results = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "best_epoch": best_epoch,
               "labels": labels, "examples": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
               "init_from": cfg.init_from, "trainable": cfg.trainable, "trainable_parameters": trainable,
               "parameters": total, "seconds": time.time() - t0, "epochs": rows, "config": config_to_dict(cfg)}
    write_json(Path(cfg.out_dir) / "results.json", results)
    print(f"test accuracy {test['accuracy']:.2%} ({round(test['accuracy'] * len(test_set))}/{len(test_set)}), "
          f"test loss {test['loss']:.4f}, from epoch {best_epoch}; {time.time() - t0:.0f}s in all -> "
          f"{os.path.join(cfg.out_dir, 'results.json')}")


if __name__ == "__main__":
    run_main(main)
