"""
What fine-tuning shares: the settings of both fine-tuning scripts, the model to start from, what to freeze, the
epoch loop, and the classifier that finetune_classifier.py trains and serve.py loads.

    gpt, tokenizer = load_base_model(config, device)        # a checkpoint, GPT-2 or random weights
    set_trainable(gpt, "lora")                              # all | last_block | head | lora
    rows = fit(model, config, train_set, val_set, collate, loss_fn, score, save)
    classifier, tokenizer = load_classifier("out-spam"); classify(classifier, tokenizer, ["Free entry, win cash"])
"""

import contextlib
import math
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from checkpoint import check_out_dir, load_folder_tokenizer, load_model, load_weights, read_checkpoint
from cli import UserError, setting
from files import Progress, folder_lock
from lora import add_lora
from model import GPT, GPTConfig
from runtime import autocast, pick_dtype


@dataclass
class FinetuneConfig:
    # the model to start from
    model: str = ""                         # the model to fine-tune: a train.py folder, gpt2[-medium|-large|-xl],
                                            # a Hugging Face folder, or scratch (random weights of the shape below);
                                            # empty: out-wikitext-tiny. With --classify or --prompt: the fine-tuned
                                            # model to answer with; empty: out_dir
    out_dir: str = "out-finetune"           # the fine-tuned model, its tokenizer and results.json go here
    overwrite: bool = False                 # replace a model already in out_dir, whichever script wrote it
    trainable: str = "all"                  # all | last_block | lora (see finetune_classifier.py)
    lora_rank: int = setting(8, low=1)      # rank of each LoRA update
    lora_alpha: float = setting(16.0, above=0)  # the update is scaled by lora_alpha / lora_rank
    dropout: float = setting(0.1, low=0, below=1)  # while fine-tuning (replaces the model's own)
    gpt2_dir: str = ""                      # GPT-2's tokenizer files (vocab.json + merges.txt, or encoder.json +
                                            # vocab.bpe); empty: beside the weights, else downloaded
    cache_dir: str = "data/cache"           # downloads: data, GPT-2 weights
    # --model=scratch: the tokenizer and shape (defaults: config/wikitext_tiny.py's, for a fair comparison)
    tokenizer_dir: str = "data/wikitext-2"  # a folder with vocab.json + merges.txt
    block_size: int = setting(128, low=1)   # context of the random model
    hidden_size: int = setting(256, low=1)  # its width
    num_hidden_layers: int = setting(4, low=1)  # its blocks
    num_attention_heads: int = setting(4, low=1)  # its heads
    # training
    num_epochs: int = setting(5, low=1)     # passes over the train split; the best val epoch is kept
    batch_size: int = setting(8, low=1)     # examples per step
    learning_rate: float = setting(3e-4, above=0)  # AdamW, constant
    weight_decay: float = setting(0.1, low=0)  # on matrices only
    grad_clip: float = setting(1.0, low=0)  # clip the gradient norm to this; 0 turns clipping off
    seed: int = setting(123, low=0, high=2**62)  # data split and order, new weights, dropout
    device: str = "auto"                    # auto: cuda, then mps, then cpu
    dtype: str = "auto"                     # float32 | bfloat16 | float16 (loss scaled); auto: bf16 where the
                                            # hardware has it


# ----------------------------------------------------------------------------- the model to start from

OTHER_RUN_FILES = ("log.jsonl", "config.json", "loss.png")  # what a train.py run leaves beside its checkpoint


@contextlib.contextmanager
def fine_tuning_run(config):
    """The rule for where a fine-tuning run writes, the one train.py follows: out_dir holding a model (a pretraining
    run's, with its optimizer state and log, or an earlier fine-tune's) is refused before any work unless
    --overwrite=True; then the other run's records go, so that the two never mix; the folder is locked meanwhile."""
    check_out_dir(config.out_dir, fresh=True, overwrite=config.overwrite)
    with folder_lock(config.out_dir):
        for name in OTHER_RUN_FILES:
            path = os.path.join(config.out_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        yield


def with_model(config, answering):
    """config with --model filled in where it was left empty: out_dir, the fine-tuned model, to answer with
    (--classify, --prompt); else the quick start's out-wikitext-tiny, to fine-tune."""
    return replace(config, model=config.model or (config.out_dir if answering else "out-wikitext-tiny"))


def load_base_model(config, device):
    """(GPT, tokenizer) to fine-tune, from config.model: a train.py checkpoint, GPT-2, or random weights."""
    init = config.model
    if init == "scratch":
        from data import load_tokenizer  # a data folder's tokenizer, for a model from scratch
        tokenizer = load_tokenizer(config.tokenizer_dir)
        gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=config.block_size,
                            hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                            num_attention_heads=config.num_attention_heads, dropout=config.dropout, bias=False))
        return gpt.to(device), tokenizer
    gpt, tokenizer, _ = load_model(init, device, config.dropout, config.cache_dir, config.gpt2_dir)
    return gpt, tokenizer


def set_trainable(gpt, mode, lora_rank=8, lora_alpha=16.0, modes=("all", "last_block", "head", "lora")):
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


def count_parameters(model):
    """(trainable, all) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- training


def run_epoch(model, batches, loss_fn, optimizer=None, grad_clip=1.0, dtype="auto", scaler=None, progress=None):
    """One pass over batches: trains with an optimizer (dropout on), else evaluates. loss_fn(model, batch) returns
    (mean loss, correct predictions, predictions); the figures are weighted by predictions. The maths runs under
    autocast in `dtype` (runtime.pick_dtype's rule); float16 scales the loss (a GradScaler, made here if not given).
    progress: a files.Progress of the batches, updated as they go."""
    model.train(optimizer is not None)
    device = next(model.parameters()).device.type
    ptdtype = pick_dtype(dtype, device)
    amp = autocast(device, ptdtype)
    if scaler is None:
        scaler = torch.amp.GradScaler(device, enabled=ptdtype == torch.float16)
    total_loss, correct, count = 0.0, 0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for batch in batches:
            with amp:
                loss, n_correct, n = loss_fn(model, batch)
            if optimizer is not None:
                scaler.scale(loss).backward()
                if grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            total_loss, correct, count = total_loss + loss.item() * n, correct + n_correct, count + n
            if progress is not None:
                progress.update(progress.done + 1)
    if progress is not None:
        progress.close(progress.done)
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}


def fit(model, config, train_set, val_set, collate, loss_fn, score, save):
    """AdamW on the trainable parameters for config.num_epochs shuffled passes over train_set. After each epoch:
    the train figures (averaged while training) and val figures; save(epoch, row) when score(val figures) is the
    best so far. Returns the per-epoch rows."""
    device = next(model.parameters()).device.type
    # configure_optimizer only walks model.parameters(), so it serves any module: decay on matrices only
    optimizer = GPT.configure_optimizer(model, config.weight_decay, config.learning_rate, (0.9, 0.999), device)
    scaler = torch.amp.GradScaler(device, enabled=pick_dtype(config.dtype, device) == torch.float16)
    generator = torch.Generator().manual_seed(config.seed)
    size = config.batch_size
    val_batches = [collate(val_set[i:i + size]) for i in range(0, len(val_set), size)]
    rows, best = [], None
    for epoch in range(1, config.num_epochs + 1):
        t0 = time.time()
        order = torch.randperm(len(train_set), generator=generator).tolist()
        train_batches = (collate([train_set[j] for j in order[i:i + size]]) for i in range(0, len(order), size))
        steps = Progress(f"epoch {epoch}/{config.num_epochs}", math.ceil(len(order) / size), "steps", 1)
        train = run_epoch(model, train_batches, loss_fn, optimizer, config.grad_clip, config.dtype, scaler, steps)
        train_seconds = time.time() - t0
        if not math.isfinite(train["loss"]):
            raise UserError(f"the loss is {train['loss']} in epoch {epoch}: training diverged; lower --learning_rate")
        val = run_epoch(model, val_batches, loss_fn, dtype=config.dtype)
        row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": time.time() - t0,
               "ms_per_step": 1000 * train_seconds / math.ceil(len(train_set) / size)}
        rows.append(row)
        improved = best is None or score(val) > best
        print(f"epoch {epoch}/{config.num_epochs}: train loss {train['loss']:.4f}, accuracy {train['accuracy']:.2%} | "
              f"val loss {val['loss']:.4f}, accuracy {val['accuracy']:.2%} | {row['seconds']:.1f}s"
              + (" | saved" if improved else ""), flush=True)
        if improved:
            best = score(val)
            save(epoch, row)
    return rows

# ----------------------------------------------------------------------------- the classifier


class GPTClassifier(nn.Module):
    """A GPT read by a linear head over the labels, at each text's last real token (with causal attention, the
    only position that has seen the whole text)."""

    def __init__(self, gpt, labels, max_length):
        super().__init__()
        self.gpt, self.labels, self.max_length = gpt, list(labels), max_length
        self.head = nn.Linear(gpt.config.hidden_size, len(labels))

    def forward(self, idx, lengths):
        hidden = self.gpt.hidden_states(idx)  # (B, T, hidden_size)
        # right padding comes after the last real token, which causal attention never lets it see
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.head(last)  # (B, num_labels) logits


def encode_texts(tokenizer, texts, max_length):
    """Token ids of each text, cut to max_length; an empty text becomes the end-of-text token alone."""
    return [ids[:max_length] or [tokenizer.eot_id] for ids in tokenizer.encode_batch(texts)]


def pad_batch(sequences, pad_id):
    """(B, T) ids padded on the right to the longest sequence, and each sequence's real length.

        pad_batch([[5, 6, 7], [8]], pad_id=0) -> (tensor([[5, 6, 7], [8, 0, 0]]), tensor([3, 1]))
    """
    ids = torch.full((len(sequences), max(map(len, sequences))), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids, torch.tensor([len(seq) for seq in sequences])


def load_classifier(out_dir, device="cpu"):
    """(GPTClassifier in eval mode, tokenizer) from a folder finetune_classifier.py wrote."""
    checkpoint = read_checkpoint(out_dir, device)
    if "labels" not in checkpoint:
        raise UserError(f"{out_dir} holds no classifier: train one with python finetune_classifier.py "
                        f"--out_dir={out_dir}")
    model = GPTClassifier(GPT(GPTConfig(**checkpoint["model_config"])), checkpoint["labels"], checkpoint["max_length"])
    load_weights(model, checkpoint["model"], out_dir)
    return model.to(device).eval(), load_folder_tokenizer(out_dir, checkpoint)


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
