"""
Perplexity of a model on a split that prepare.py wrote, or on a text file: per token, per byte and per word.

    python evaluate.py --model=out-wikitext-tiny --split=test
    python evaluate.py --model=out-wikitext-tiny --text_file=some.txt --word_convention=whitespace --json
    python evaluate.py --model=gpt2 --data_dir=data/wikitext-2-raw-gpt2 --split=test     # GPT-2, on GPT-2 tokens

Three numbers, so results compare across tokenizers and with published tables:
- perplexity: exp(mean negative log-likelihood per token); it depends on the tokenizer;
- bits per byte: the total negative log-likelihood in bits over the UTF-8 bytes of the text; it does not;
- word perplexity: exp(total negative log-likelihood / words). Words are either whitespace-separated words
  ('whitespace', lm-evaluation-harness's count for raw WikiText), or those plus one end-of-line per line
  ('classic': 245,569 on the WikiText-2 test split, the count the classic tables divide by). A split uses the
  convention its meta.json names, a text file 'whitespace'; --word_convention overrides, and the output says which.

Text longer than the context is scored with sliding windows of block_size tokens, each starting `stride` tokens
after the one before and scoring only the tokens not scored yet (Hugging Face's perplexity guide): every token is
scored once, with at least block_size - stride tokens of context once the text is that long. A smaller stride means
more context, a lower perplexity, and block_size / stride times the work.

The first token of a text has no context: it is scored after an end-of-text token, which is how every document
starts in the token files (a tokenizer without one leaves the first token unscored). In a split, the end-of-text
tokens between documents are context only, never scored, so the score covers exactly the bytes of the text.
A whole split's result goes into the model folder's audit.json, where export.py's model card finds it.
"""

import contextlib
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import record_result
from cli import UserError, parse_config, run_main, setting
from data import count_words, load_meta, load_split, load_tokenizer
from files import Progress, read_utf8
from runtime import autocast, load_for_inference, pick_dtype

CONVENTIONS = {"whitespace": "whitespace-separated words",
               "classic": "whitespace-separated words + one end-of-line per line, as the WikiText tables count"}


@dataclass
class EvaluateConfig:
    model: str = "out-wikitext-tiny"     # a train.py checkpoint folder, or a GPT-2 name or folder
    split: str = setting("test", choices=("train", "val", "test"))  # the split of data_dir to score
    data_dir: str = ""                   # the split's folder; default: the data the checkpoint was trained on
    text_file: str = ""                  # score this UTF-8 text file instead of a split
    word_convention: str = setting("auto", choices=("auto", "whitespace", "classic"))  # auto: the split's own
    stride: int = setting(0, low=0)      # tokens between window starts; 0: block_size // 2
    batch_size: int = setting(8, low=1)  # windows per forward pass
    max_tokens: int = setting(0, low=0)  # score only the first max_tokens tokens (0: all), for a quick look
    json: bool = False                   # print one JSON object instead of a table
    device: str = "auto"                 # auto: cuda, then mps, then cpu
    dtype: str = "auto"                  # float32 | bfloat16 | float16; auto: bf16 where the hardware has it
    quantize: str = setting("none", choices=("none", "int8"))  # int8 weights, on the CPU
    # dynamic evaluation: the model learns from the text as it scores it (see score_tokens_dynamic)
    dynamic: bool = False                # score with dynamic evaluation instead (its own figures, never mixed)
    dynamic_segment: int = setting(64, low=1)  # tokens scored, then learned from, at a time
    dynamic_lr: float = setting(0.1, low=0)   # SGD step size on each segment (tuned on val for the tiny config)
    dynamic_decay: float = setting(0.0, low=0, high=1)  # pull back towards the trained weights after each step
    dynamic_rms: int = setting(0, low=0)      # > 0: steps over each weight's gradient RMS on
                                              # this many train segments (Krause et al. 2019)


# ----------------------------------------------------------------------------- scoring with sliding windows

def window_spans(num_tokens, block_size, stride):
    """[(start, first)] for the windows over num_tokens ids: a window reads ids[start:start + T] (T = block_size, or
    less for a short text) and scores the targets ids[first:start + T + 1], those no earlier window scored.
    The first window starts at 0; each later one scores `stride` new targets (the last one fewer)."""
    T = min(block_size, num_tokens - 1)
    spans, done = [], 0  # targets ids[1:done + 1] are scored
    while done < num_tokens - 1:
        end = min(done + stride if done else T, num_tokens - 1)  # the last target this window scores
        spans.append((end - T, done + 1))
        done = end
    return spans


@torch.no_grad()
def score_tokens(model, ids, stride=0, batch_size=8, skip_id=None, progress=None):
    """(total negative log-likelihood in nats, tokens scored) of ids[1:] under the model, by sliding windows.
    ids: a 1-D sequence of token ids (a memmap is fine); targets equal to skip_id are context, never scored."""
    block = model.config.block_size
    stride = stride or max(1, block // 2)
    if not 1 <= stride <= block:
        raise UserError(f"--stride must be between 1 and block_size={block}, got {stride}")
    if len(ids) < 2:
        raise UserError("the text is too short to score: it needs at least one token")
    spans = window_spans(len(ids), block, stride)
    T = min(block, len(ids) - 1)
    device = model.token_emb.weight.device
    total, count = 0.0, 0
    for b in range(0, len(spans), batch_size):
        batch = spans[b:b + batch_size]
        rows = np.stack([np.asarray(ids[start:start + T + 1], dtype=np.int64) for start, _ in batch])
        rows = torch.from_numpy(rows).to(device)
        x, y = rows[:, :-1], rows[:, 1:].clone()
        for row, (start, first) in enumerate(batch):
            y[row, :first - start - 1] = -100  # scored by an earlier window, with less context
        if skip_id is not None:
            y[y == skip_id] = -100
        scored = y != -100
        hidden = model.hidden_states(x)[scored]  # the output layer only where a token is scored
        logits = model.logits(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: score in fp32
        total += F.cross_entropy(logits, y[scored], reduction="sum").item()
        count += int(scored.sum())
        if progress is not None:
            progress.update(batch[-1][0] + T)
    if progress is not None:
        progress.close(len(ids))
    return total, count


def segments(model, ids, segment, skip_id):
    """The text in segments of `segment` targets, each with the block_size - segment tokens before
    it as context: (x, y) of shape (1, T) on the model's device, y -100 where a target is context
    only (scored by an earlier segment, or skip_id), and the end of the segment in ids."""
    block = model.config.block_size
    if not 1 <= segment <= block:
        raise UserError(f"--dynamic_segment must be between 1 and block_size={block}, got {segment}")
    if len(ids) < 2:
        raise UserError("the text is too short to score: it needs at least one token")
    device = model.token_emb.weight.device
    for first in range(1, len(ids), segment):  # this segment's targets: ids[first:end]
        end = min(first + segment, len(ids))
        start = max(0, end - 1 - block)
        window = torch.from_numpy(np.asarray(ids[start:end], dtype=np.int64)).to(device)
        x, y = window[None, :-1], window[None, 1:].clone()
        y[:, :first - start - 1] = -100  # context only: scored by an earlier segment
        if skip_id is not None:
            y[y == skip_id] = -100
        yield x, y, end


def segment_loss(model, x, y, amp):
    """(the summed negative log-likelihood of y's scored targets, how many there are)."""
    with amp:
        logits = model(x)[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).view(-1, logits.size(-1))
    nll = F.cross_entropy(logits, y.view(-1), ignore_index=-100, reduction="sum")
    return nll, int((y != -100).sum())


def gradient_rms(model, ids, segment, count, skip_id=None, amp=contextlib.nullcontext()):
    """Each weight's root summed square gradient over the first `count` segments of ids (the train
    split): the scale that RMS-normalised dynamic evaluation divides its steps by."""
    model.eval()
    squares = [torch.zeros_like(p) for p in model.parameters()]
    for _, (x, y, _) in zip(range(count), segments(model, ids, segment, skip_id)):
        nll, scored = segment_loss(model, x, y, amp)
        if scored:
            (nll / scored).backward()
        for square, p in zip(squares, model.parameters()):
            if p.grad is not None:
                square += p.grad.square()
                p.grad = None
    return [square.sqrt() for square in squares]


def score_tokens_dynamic(model, ids, segment=64, lr=0.1, decay=0.0, skip_id=None, amp=contextlib.nullcontext(),
                         progress=None, rms=None):
    """score_tokens with dynamic evaluation (Krause et al. 2018): the text is read in segments of `segment` tokens,
    each one scored by the weights as they are, then learned from: one SGD step on that segment's loss, after which
    every weight moves back towards its trained value by the fraction `decay`. So a token is always scored before
    the model has seen it, and the model follows the text it reads (names, topics, style of this article).
    Each segment is read with the block_size - segment tokens before it as context. The model's weights change:
    give it a copy. Returns (total negative log-likelihood in nats, tokens scored).
    With rms (gradient_rms: a tensor per weight), a weight steps by lr * grad / (rms + the
    tensor's mean rms) instead: RMS-normalised, which Krause et al. (2019) found better for
    transformers. The mean keeps the step of a weight the train segments never moved (the row of a
    token not in them: rms 0) at its tensor's typical size."""
    params = [p for p in model.parameters()]
    trained = [p.detach().clone() for p in params]
    # a tensor the train segments never moved at all (rms 0 throughout) stays as it is
    scale = [None] * len(params) if rms is None else [
        torch.nan_to_num(1 / (r + r.mean()), posinf=0.0) for r in rms]
    model.eval()  # no dropout: the scores are the model's own
    total, count = 0.0, 0
    for x, y, end in segments(model, ids, segment, skip_id):
        nll, scored = segment_loss(model, x, y, amp)
        total, count = total + nll.item(), count + scored
        if scored:  # now learn from it
            (nll / scored).backward()
            with torch.no_grad():
                for p, p0, s in zip(params, trained, scale):
                    if p.grad is not None:
                        p -= lr * (p.grad if s is None else p.grad * s)
                        p += decay * (p0 - p)
                        p.grad = None
        if progress is not None:
            progress.update(end)
    if progress is not None:
        progress.close(len(ids))
    return total, count


def report(nll, tokens, n_bytes, words, convention):
    """The per-token, per-byte and per-word figures of a total negative log-likelihood (nats)."""
    return {"tokens": tokens, "bytes": n_bytes, "words": words, "word_convention": convention,
            "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / n_bytes, "word_perplexity": math.exp(nll / words)}


# ----------------------------------------------------------------------------- what to score

def score(model, ids, stride, batch_size, skip_id, progress, dynamic):
    """score_tokens, or score_tokens_dynamic with the settings in `dynamic` (a dict; None: static)."""
    if dynamic is None:
        return score_tokens(model, ids, stride, batch_size, skip_id, progress)
    return score_tokens_dynamic(model, ids, skip_id=skip_id, progress=progress, **dynamic)


def evaluate_text(model, tokenizer, text, convention="whitespace", stride=0, batch_size=8, progress=True,
                  dynamic=None):
    """Score a text: its tokens after an end-of-text token; bytes and words counted from the text itself."""
    ids = tokenizer.encode_document(text)  # the same start as a document in the token files
    bar = Progress("scoring", len(ids), "k tokens", 1e3) if progress else None
    nll, tokens = score(model, ids, stride, batch_size, None, bar, dynamic)
    return report(nll, tokens, len(text.encode("utf-8")), count_words(text, convention), convention)


def evaluate_split(model, tokenizer, data_dir, split, convention="auto", stride=0, batch_size=8, max_tokens=0,
                   progress=True, dynamic=None):
    """Score a split of data_dir; bytes and words from meta.json (from the decoded tokens with max_tokens)."""
    meta = load_meta(data_dir)
    convention = meta.get("word_convention", "whitespace") if convention == "auto" else convention
    check_convention(convention)
    ids = load_split(data_dir, split)
    eot = meta["eot_id"]
    if max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode([t for t in ids.tolist() if t != eot])
        n_bytes, words = len(text.encode("utf-8")), count_words(text, convention)
    else:
        stats = meta["splits"][split]
        if f"words_{convention}" not in stats:
            raise UserError(f"{data_dir}/meta.json has no '{convention}' word count for {split}: "
                            f"use --word_convention=whitespace")
        n_bytes, words = stats["bytes"], stats[f"words_{convention}"]
    bar = Progress(f"scoring {split}", len(ids), "k tokens", 1e3) if progress else None
    nll, tokens = score(model, ids, stride, batch_size, eot, bar, dynamic)
    return report(nll, tokens, n_bytes, words, convention)


def check_convention(convention):
    if convention not in CONVENTIONS:
        raise UserError(f"--word_convention must be auto, {' or '.join(CONVENTIONS)}, got '{convention}'")


def check_same_tokenizer(tokenizer, data_dir):
    """Token ids only mean something under the tokenizer that made them: refuse a data_dir tokenized differently."""
    if load_tokenizer(data_dir).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the model's: give the --data_dir "
                        f"it was trained on, or prepare the data with the model's tokenizer")


# ----------------------------------------------------------------------------- command line

def main():
    config = parse_config(EvaluateConfig, renamed={"out_dir": "model"})
    dynamic = None
    if config.dynamic:  # gradients want float32 weights; the maths runs under the dtype rule's autocast
        if config.quantize != "none":
            raise UserError("--dynamic trains the model as it reads: it needs float weights, not --quantize=int8")
        model, tokenizer, checkpoint = load_for_inference(config.model, config.device, "float32")
        device = model.token_emb.weight.device.type
        dynamic = {"segment": config.dynamic_segment, "lr": config.dynamic_lr, "decay": config.dynamic_decay,
                   "amp": autocast(device, pick_dtype(config.dtype, device))}
        if config.dynamic_rms:  # the gradients' scale on the text the model was trained on
            data_dir = training_data(config, checkpoint, tokenizer)
            train_ids, eot = load_split(data_dir, "train"), load_meta(data_dir)["eot_id"]
            dynamic["rms"] = gradient_rms(model, train_ids, config.dynamic_segment,
                                          config.dynamic_rms, eot, dynamic["amp"])
    else:
        model, tokenizer, checkpoint = load_for_inference(config.model, config.device, config.dtype, config.quantize)
    block = model.config.block_size
    stride = config.stride or max(1, block // 2)
    if config.text_file:
        text = read_utf8(config.text_file, "--text_file")
        if not text.split():
            raise UserError(f"--text_file={config.text_file} has no text to score (it is empty or only whitespace)")
        convention = "whitespace" if config.word_convention == "auto" else config.word_convention
        result = evaluate_text(model, tokenizer, text, convention, stride, config.batch_size, dynamic=dynamic)
        source = config.text_file
    else:
        data_dir = training_data(config, checkpoint, tokenizer)
        result = evaluate_split(model, tokenizer, data_dir, config.split, config.word_convention, stride,
                                config.batch_size, config.max_tokens, dynamic=dynamic)
        source = f"{data_dir} {config.split} split" + (f", first {config.max_tokens:,} tokens" if config.max_tokens
                                                        else "")
    result = print_result(config, result, source, block, stride, tokenizer.eot_id is not None)
    if not config.text_file and not config.max_tokens:  # a whole split: a figure for the model card
        key = f"evaluate_{config.split}" + ("_dynamic" if config.dynamic else "")
        saved = record_result(config.model, key, result)
        if saved is not None:
            print(f"recorded in {saved}", file=sys.stderr)


def training_data(config, checkpoint, tokenizer):
    """--data_dir, or the data folder the model was trained on, checked: it exists, and it was
    tokenized with the model's tokenizer."""
    data_dir = config.data_dir or checkpoint.get("train_config", {}).get("data_dir")
    if not data_dir:
        raise UserError(f"{config.model} does not say what data it was trained on: pass --data_dir=DIR")
    load_meta(data_dir)  # a missing data folder says so, and what to run
    check_same_tokenizer(tokenizer, data_dir)
    return data_dir


def print_result(config, result, source, block, stride, has_eot):
    first = "scored after an end-of-text token" if has_eot else "not scored (no end-of-text token)"
    if config.dynamic:
        rms = config.dynamic_rms
        sgd = f"SGD, RMS-normalised over {rms} train segments" if rms else "SGD"
        reading = (f"dynamic evaluation: segments of {config.dynamic_segment} tokens, each scored, then learned from "
                   f"({sgd}, lr {config.dynamic_lr:g}, decay {config.dynamic_decay:g}), with up to "
                   f"{block - config.dynamic_segment} tokens of context")
    else:
        reading = (f"windows of {block} tokens, stride {stride}: every token scored once, with >= {block - stride} "
                   f"tokens of context once the text is that long")
    result = {"model": config.model, "source": source, "block_size": block, "stride": stride, "first_token": first,
              "quantize": config.quantize, "scoring": "dynamic" if config.dynamic else "static", **result}
    if config.dynamic:
        result |= {"dynamic_segment": config.dynamic_segment, "dynamic_lr": config.dynamic_lr,
                   "dynamic_decay": config.dynamic_decay, "dynamic_rms": config.dynamic_rms}
    if config.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{config.model} on {source}")
    print(f"  {result['tokens']:,} tokens, {result['bytes']:,} bytes, {result['words']:,} words "
          f"({result['word_convention']}: {CONVENTIONS[result['word_convention']]})")
    print(f"  {reading}; the first token {first}")
    print(f"  perplexity       {result['perplexity']:10.3f}   (per token; loss {result['loss']:.4f} nats)")
    print(f"  bits per byte    {result['bits_per_byte']:10.4f}")
    print(f"  word perplexity  {result['word_perplexity']:10.3f}")
    return result


if __name__ == "__main__":
    run_main(main)
