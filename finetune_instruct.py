"""
Instruction-tune a GPT on Alpaca-style records ({"instruction", "input", "output"}): each record is written out in
the Alpaca prompt template, and the model learns to continue the prompt with the response and an end-of-text token.

    python finetune_instruct.py --model=out-wikitext-tiny                       # the 1,100-record set, downloaded
    python finetune_instruct.py --model=gpt2-medium --data=instruction-data.json --learning_rate=5e-5 --num_epochs=2
    python finetune_instruct.py --model=gpt2 --trainable=lora --learning_rate=1e-3
    python finetune_instruct.py --model=out-instruct --prompt="Name the capital of France."

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

from checkpoint import load_model, save_checkpoint
from cli import UserError, parse_config, run_main, setting
from download import download
from files import read_utf8, write_json
from finetune import (FinetuneConfig, count_parameters, fine_tuning_run, fit, load_base_model, run_epoch, set_trainable,
                      with_model)
from generate import format_prompt, generate_ids
from lora import merged_state_dict
from runtime import pick_device


@dataclass
class FinetuneInstructConfig(FinetuneConfig):  # the settings of finetune.py, then these
    out_dir: str = "out-instruct"             # the model, its tokenizer, test answers and results go here
    trainable: str = setting("all", choices=("all", "last_block", "lora"))  # what learns (see finetune_classifier.py)
    # data
    data: str = ""                            # a JSON list of Alpaca-style records; empty: the 1,100-record set,
                                              # downloaded
    mask_prompt: bool = True                  # train on the response tokens only
    max_length: int = setting(0, low=0)       # tokens per record (prompt, response, end-of-text); 0: block_size
    # answering
    answer_test: bool = True                  # after training, answer the test instructions into
                                              # test_responses.json (greedy: minutes on a CPU)
    max_new_tokens: int = setting(200, low=0)  # the longest answer, in tokens
    temperature: float = setting(0.0, low=0)  # 0: greedy, the most likely token at every step
    top_k: int = setting(0, low=0)            # sample from the k most likely tokens only (0: all)
    prompt: str = ""                          # answer this instruction with the model in --model (or out_dir)
    input: str = ""                           # the optional input that goes with --prompt


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
        records = json.loads(read_utf8(path))
    except ValueError as e:
        raise UserError(f"{path} is not JSON: {e}")
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


def respond(model, tokenizer, record, max_new_tokens=200, temperature=0.0, top_k=0, seed=None):
    """The model's response to one record's instruction (and input): the text it writes before end-of-text."""
    model.eval()
    ids = tokenizer.encode(format_prompt(record))
    answer = generate_ids(model, ids, max_new_tokens, temperature, top_k, seed=seed, eot_id=tokenizer.eot_id)
    return tokenizer.decode(list(answer)).strip()

# ----------------------------------------------------------------------------- main


def encode_splits(tokenizer, splits, max_length):
    """[(ids, prompt length)] per split. A record whose prompt alone fills max_length has nothing left to learn
    from: it is dropped."""
    encoded = []
    for records in splits:
        items = [encode_record(tokenizer, record, max_length) for record in records]
        encoded.append([item for item in items if item[1] < len(item[0])])
    if not all(encoded):
        raise UserError(f"the prompts fill all {max_length} tokens of a split's records: raise --max_length "
                        f"(up to the model's block_size) or use shorter instructions")
    cut = sum(len(ids) == max_length + 1 for ids, _ in encoded[0])
    print(f"{len(splits[0])} train, {len(splits[1])} val, {len(splits[2])} test records; "
          f"{cut} train records cut to {max_length} tokens")
    return encoded


def answer_test_records(model, tokenizer, records, config):
    """The test records, each with the model's answer under "model_response"."""
    answers, t0 = [], time.time()
    print(f"answering the {len(records)} test instructions into test_responses.json "
          f"(--answer_test=False skips it)", flush=True)
    for i, record in enumerate(records):
        answers.append({**record, "model_response": respond(model, tokenizer, record, config.max_new_tokens,
                                                            config.temperature, config.top_k)})
        if (i + 1) % 25 == 0 or i + 1 == len(records):
            print(f"answered {i + 1}/{len(records)} test instructions ({time.time() - t0:.0f}s)", flush=True)
    return answers


def train_instruct(config, device):
    """Fine-tune, keep the best val epoch in out_dir, grade it on the test responses, answer the test instructions."""
    t0 = time.time()
    data = config.data or download(DATA_URL, Path(config.cache_dir) / "instruction-data.json", DATA_SHA256,
                                   offline_hint="download it yourself and pass --data=PATH")
    splits = split_records(load_records(data), config.seed)
    torch.manual_seed(config.seed)  # the adapters' initial weights, dropout
    model, tokenizer = load_base_model(config, device)
    set_trainable(model, config.trainable, config.lora_rank, config.lora_alpha, TRAINABLE)
    if config.max_length > model.config.block_size:
        raise UserError(f"--max_length={config.max_length} is beyond the model's block_size={model.config.block_size}")
    train_set, val_set, test_set = encode_splits(tokenizer, splits, config.max_length or model.config.block_size)
    trainable, total = count_parameters(model)
    print(f"init from {config.model}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M "
          f"trainable ({config.trainable}); device {device}")

    def collate(items, mask_prompt=config.mask_prompt):
        inputs, targets = make_batch(items, tokenizer.eot_id, mask_prompt)
        return inputs.to(device), targets.to(device)

    def save(epoch, row):  # then the tokenizer: the out_dir alone is enough to answer
        save_checkpoint({"model": merged_state_dict(model), "model_config": asdict(model.config),
                         "tokenizer_sha256": tokenizer.fingerprint(), "prompt_format": "alpaca",
                         "finetune_config": asdict(config), "epoch": epoch, "val_loss": row["val_loss"]},
                        config.out_dir)
        tokenizer.save(config.out_dir)

    rows = fit(model, config, train_set, val_set, collate, lm_loss, lambda val: -val["loss"], save)

    best, tokenizer, checkpoint = load_model(config.out_dir, device)
    # the response perplexity grades the response whatever mask_prompt was
    test = run_epoch(best, [collate(test_set[i:i + 16], True) for i in range(0, len(test_set), 16)], lm_loss,
                     dtype=config.dtype)
    print(f"test response loss {test['loss']:.4f}, perplexity {math.exp(test['loss']):.2f}, next-token accuracy "
          f"{test['accuracy']:.2%} (best epoch {checkpoint['epoch']})")
    if config.answer_test:
        answers = answer_test_records(best, tokenizer, splits[2], config)
        write_json(Path(config.out_dir) / "test_responses.json", answers)
    write_json(Path(config.out_dir) / "results.json", {
        "test_response_loss": test["loss"], "test_response_perplexity": math.exp(test["loss"]),
        "test_token_accuracy": test["accuracy"], "best_epoch": checkpoint["epoch"], "model": config.model,
        "trainable": config.trainable, "trainable_parameters": trainable, "seconds": time.time() - t0, "epochs": rows,
        "config": asdict(config)})
    if config.answer_test:
        print(f"example: {answers[0]['instruction']!r} -> {answers[0]['model_response']!r}")
        print(f"answers in {os.path.join(config.out_dir, 'test_responses.json')}")
    print(f"{time.time() - t0:.0f}s in all")


def main():
    config = parse_config(FinetuneInstructConfig, renamed={"init_from": "model"})
    config = with_model(config, answering=bool(config.prompt))
    device = pick_device(config.device)
    if config.prompt:
        model, tokenizer, _ = load_model(config.model, device)
        print(respond(model, tokenizer, {"instruction": config.prompt, "input": config.input}, config.max_new_tokens,
                      config.temperature, config.top_k))
        return
    with fine_tuning_run(config):
        train_instruct(config, device)


if __name__ == "__main__":
    run_main(main)
