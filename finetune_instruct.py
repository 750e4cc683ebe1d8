"""
Instruction-tune a GPT on Alpaca-style records ({"instruction", "input", "output"}): each record is written out in
the Alpaca prompt template, and the model learns to continue the prompt with the response and an end-of-text token.

    python finetune_instruct.py --init_from=out-wikitext-tiny                       # the 1,100-record set, downloaded
    python finetune_instruct.py --init_from=gpt2-medium --data=instruction-data.json --learning_rate=5e-5 --num_epochs=2
    python finetune_instruct.py --init_from=gpt2 --trainable=lora --learning_rate=1e-3
    python finetune_instruct.py --out_dir=out-instruct --prompt="Name the capital of France."

Records are shuffled (seeded) and split 85/5/10 into train/val/test. Batches are padded to their longest record; the
loss skips the padding and, unless --mask_prompt=False, the prompt: the model is graded on the response alone.
out_dir receives ckpt.pt (the epoch with the best val loss, a plain GPT checkpoint: LoRA adapters are merged in),
the tokenizer files, test_responses.json (the model's answers to the test split) and results.json (per-epoch losses
and the test response perplexity: exp of the mean loss over the test responses' tokens, end-of-text included).
"""

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import prepare
from cli import UserError, config_to_dict, parse_config, run_main
from finetune_classifier import (check_training_settings, fit, load_base_model, run_epoch, set_trainable,
                                 write_json)
from model import load_model, merged_state_dict, pick_device, save_checkpoint


@dataclass
class Config:
    # data
    data: str = ""                    # a JSON list of Alpaca-style records; empty: the 1,100-record set, downloaded
    mask_prompt: bool = True          # train on the response tokens only
    max_length: int = 0               # tokens per record (prompt + response + end-of-text), the rest cut; 0: block_size
    # the model to start from: a train.py checkpoint folder, gpt2[-medium|-large|-xl], a folder with
    # model.safetensors + config.json (Hugging Face format), or scratch (random weights of the shape below)
    init_from: str = "out-wikitext-tiny"
    out_dir: str = "out-instruct"
    trainable: str = "all"            # all | last_block | lora (see finetune_classifier.py)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.1
    gpt2_dir: str = ""                # GPT-2's tokenizer files (vocab.json + merges.txt, or encoder.json + vocab.bpe)
    cache_dir: str = "data/cache"
    tokenizer_dir: str = "data/wikitext-2"   # --init_from=scratch: its tokenizer and shape
    block_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # training
    num_epochs: int = 5               # about 4 minutes on 2 CPU cores for the 5M-parameter model
    batch_size: int = 8
    learning_rate: float = 3e-4       # for our small models; GPT-2 wants about 5e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 123
    device: str = "auto"
    # answering
    max_new_tokens: int = 200
    temperature: float = 0.0          # 0: greedy, the most likely token at every step
    top_k: int = 0                    # sample from the k most likely tokens only (0: all)
    prompt: str = ""                  # answer this instruction with the model in out_dir (no training)
    input: str = ""                   # the optional input that goes with --prompt


DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
            "instruction-data.json")
DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
TRAINABLE = ("all", "last_block", "lora")  # 'head' would be the output layer, tied to the token embedding

# ----------------------------------------------------------------------------- data


def load_records(path):
    """The list of {instruction, input, output} records in a JSON file, checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data={path}: no such file (give a JSON list of instruction/input/output records, or "
                        f"leave --data empty to download the 1,100-record set)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not UTF-8 JSON: {e}")
    if not isinstance(records, list) or len(records) < 20:
        raise UserError(f"{path} must hold a JSON list of at least 20 records (enough for train, val and test)")
    for i, record in enumerate(records):
        if not (isinstance(record, dict) and isinstance(record.get("instruction"), str)
                and isinstance(record.get("output"), str) and isinstance(record.get("input", ""), str)):
            raise UserError(f"{path}: record {i} needs 'instruction' and 'output' strings (and optionally 'input')")
    return records


def split_records(records, seed, fractions=(0.85, 0.05)):
    """Shuffled (seeded) train, val, test lists: 85/5/10."""
    records = list(records)
    random.Random(seed).shuffle(records)
    train_end = int(len(records) * fractions[0])
    val_end = train_end + int(len(records) * fractions[1])
    return records[:train_end], records[train_end:val_end], records[val_end:]


def format_prompt(record):
    """The Alpaca template, up to the point where the response begins."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{record['instruction']}")
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


def encode_record(tokenizer, record, max_length):
    """(ids, prompt length): prompt + response + end-of-text, cut to max_length + 1 ids, since inputs and targets
    are the same ids shifted by one."""
    prompt = tokenizer.encode(format_prompt(record))
    response = tokenizer.encode(record["output"]) + [tokenizer.eot_id]
    return (prompt + response)[:max_length + 1], len(prompt)


def make_batch(items, pad_id, mask_prompt=True):
    """Inputs and targets (B, T) for next-token training, padded to the longest item. Targets are -100, which the
    loss ignores, on padding and, with mask_prompt, wherever the next token is still part of the prompt."""
    T = max(len(ids) for ids, _ in items) - 1
    inputs = torch.full((len(items), T), pad_id, dtype=torch.long)
    targets = torch.full((len(items), T), -100, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(items):
        ids = torch.tensor(ids)
        inputs[row, :len(ids) - 1], targets[row, :len(ids) - 1] = ids[:-1], ids[1:]
        if mask_prompt:
            targets[row, :prompt_length - 1] = -100  # target t is token t + 1: prompt tokens 1 .. prompt_length - 1
    return inputs, targets


def lm_loss(model, batch):
    """(mean loss over the unmasked targets, correctly predicted targets, unmasked targets): run_epoch's contract."""
    inputs, targets = batch
    logits, loss = model(inputs, targets)
    graded = targets != -100
    return loss, ((logits.argmax(-1) == targets) & graded).sum().item(), graded.sum().item()

# ----------------------------------------------------------------------------- answering


@torch.no_grad()
def respond(model, tokenizer, record, max_new_tokens=200, temperature=0.0, top_k=0, generator=None):
    """The model's response to one record's instruction (and input): the text it writes before end-of-text."""
    model.eval()
    device = next(model.parameters()).device
    prompt = torch.tensor([tokenizer.encode(format_prompt(record))], device=device)
    answer = []
    for token in model.generate_tokens(prompt, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                       generator=generator):
        if token.item() == tokenizer.eot_id:
            break
        answer.append(token.item())
    return tokenizer.decode(answer).strip()

# ----------------------------------------------------------------------------- main


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    if cfg.prompt:
        model, tokenizer, _ = load_model(cfg.out_dir, device)
        print(respond(model, tokenizer, {"instruction": cfg.prompt, "input": cfg.input}, cfg.max_new_tokens,
                      cfg.temperature, cfg.top_k))
        return
    check_training_settings(cfg, TRAINABLE)

    t0 = time.time()
    data = cfg.data or prepare.download(DATA_URL, Path(cfg.cache_dir) / "instruction-data.json", DATA_SHA256,
                                        offline_hint="download it yourself and pass --data=PATH")
    train_records, val_records, test_records = split_records(load_records(data), cfg.seed)
    torch.manual_seed(cfg.seed)  # the adapters' initial weights, dropout
    model, tokenizer = load_base_model(cfg, device)
    set_trainable(model, cfg.trainable, cfg.lora_rank, cfg.lora_alpha, modes=TRAINABLE)
    if cfg.max_length > model.config.block_size:
        raise UserError(f"--max_length={cfg.max_length} is beyond the model's block_size={model.config.block_size}")
    max_length = cfg.max_length or model.config.block_size

    def encode(records):  # a record whose prompt alone fills max_length has nothing left to learn from
        items = [encode_record(tokenizer, record, max_length) for record in records]
        return [item for item in items if item[1] < len(item[0])]

    train_set, val_set, test_set = encode(train_records), encode(val_records), encode(test_records)
    if not (train_set and val_set and test_set):
        raise UserError(f"the prompts fill all {max_length} tokens of a split's records: raise --max_length "
                        f"(up to the model's block_size) or use shorter instructions")
    cut = sum(len(ids) == max_length + 1 for ids, _ in train_set)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{len(train_records)} train, {len(val_records)} val, {len(test_records)} test records; "
          f"{cut} train records cut to {max_length} tokens")
    print(f"init from {cfg.init_from}: {model.num_params(False) / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M "
          f"trainable ({cfg.trainable}); device {device}")

    def collate(items, mask_prompt=cfg.mask_prompt):
        inputs, targets = make_batch(items, tokenizer.eot_id, mask_prompt)
        return inputs.to(device), targets.to(device)

    def save(epoch, row):
        save_checkpoint({"model": merged_state_dict(model), "model_config": asdict(model.config),
                         "finetune_config": config_to_dict(cfg), "epoch": epoch, "val_loss": row["val_loss"]},
                        cfg.out_dir)

    os.makedirs(cfg.out_dir, exist_ok=True)
    tokenizer.save(cfg.out_dir)
    rows = fit(model, cfg, train_set, val_set, collate, lm_loss, lambda val: -val["loss"], save)

    best, tokenizer, checkpoint = load_model(cfg.out_dir, device)
    # the response perplexity grades the response whatever mask_prompt was
    test = run_epoch(best, [collate(test_set[i:i + 16], True) for i in range(0, len(test_set), 16)], lm_loss)
    print(f"test response loss {test['loss']:.4f}, perplexity {math.exp(test['loss']):.2f}, next-token accuracy "
          f"{test['accuracy']:.2%} (best epoch {checkpoint['epoch']})")
    answers, t1 = [], time.time()
    for i, record in enumerate(test_records):
        answers.append({**record, "model_response": respond(best, tokenizer, record, cfg.max_new_tokens,
                                                            cfg.temperature, cfg.top_k)})
        if (i + 1) % 25 == 0 or i + 1 == len(test_records):
            print(f"answered {i + 1}/{len(test_records)} test instructions ({time.time() - t1:.0f}s)", flush=True)
    write_json(Path(cfg.out_dir) / "test_responses.json", answers)
    write_json(Path(cfg.out_dir) / "results.json", {
        "test_response_loss": test["loss"], "test_response_perplexity": math.exp(test["loss"]),
        "test_token_accuracy": test["accuracy"], "best_epoch": checkpoint["epoch"], "init_from": cfg.init_from,
        "trainable": cfg.trainable, "trainable_parameters": trainable, "seconds": time.time() - t0, "epochs": rows,
        "config": config_to_dict(cfg)})
    print(f"example: {answers[0]['instruction']!r} -> {answers[0]['model_response']!r}")
    print(f"answers in {os.path.join(cfg.out_dir, 'test_responses.json')}; {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    run_main(main)
