"""
Train a GPT on the memmaps that prepare.py wrote. One file, read top to bottom.

    python train.py config/wikitext_tiny.py                          # a few minutes on a laptop CPU
    python train.py config/wikitext_small.py --batch_size=8          # a GPU-sized run
    python train.py config/wikitext_small.py --init_from=resume      # continue exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py   # several GPUs (DDP)

Settings: the defaults below, then a config file (plain `name = value` lines), then --name=value flags.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import UserError, config_to_dict, parse_config
from model import GPT, GPTConfig, has_fast_bf16, pick_device, read_checkpoint, save_checkpoint
from prepare import load_meta, load_split


@dataclass
class TrainConfig:
    # I/O
    data_dir: str = "data/wikitext-2"     # a folder written by prepare.py
    out_dir: str = "out"
    init_from: str = "scratch"            # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    eval_interval: int = 250
    eval_iters: int = 50                  # batches per evaluation
    log_interval: int = 10
    always_save_checkpoint: bool = True   # False: save only when val loss improves
    wandb_log: bool = False
    wandb_project: str = "gpt"
    wandb_run_name: str = "run"
    # data
    batch_size: int = 16                  # sequences per micro-step per process
    block_size: int = 256
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, summed over all processes
    # model
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    dropout: float = 0.1
    bias: bool = False
    # AdamW and the learning-rate schedule (linear warmup, then cosine decay to min_lr)
    learning_rate: float = 1e-3
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0                # 0 turns clipping off
    warmup_iters: int = 100
    lr_decay_iters: int = 5000            # usually = max_iters
    min_lr: float = 1e-4                  # usually learning_rate / 10
    # system
    device: str = "auto"                  # auto picks cuda, then mps, then cpu
    dtype: str = "auto"                   # bfloat16 | float16 | float32; auto: bf16 where the hardware has it
    compile: str = "auto"                 # torch.compile: auto = on for CUDA only
    peak_flops: float = 0.0               # device peak FLOP/s for MFU; 0 = known GPUs only
    seed: int = 1337


config = parse_config(TrainConfig)

# ----------------------------------------------------------------------------- processes, device, precision

ddp = int(os.environ.get("RANK", -1)) != -1  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
if ddp:
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
else:
    rank, world_size, local_rank = 0, 1, 0
master = rank == 0  # only one process logs and writes checkpoints

device = pick_device(config.device)
if device == "cuda" and ddp:
    device = f"cuda:{local_rank}"
device_type = device.split(":")[0]
if ddp:
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")

dtype = config.dtype
if dtype == "auto":
    if has_fast_bf16(device_type):
        dtype = "bfloat16"  # measured on CPU too: faster, with the same loss curve as fp32 (README)
    else:
        dtype = "float16" if device_type == "cuda" else "float32"  # fp16 needs the GradScaler below
if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
    raise UserError("this GPU has no bfloat16: use --dtype=float16 (with loss scaling) or --dtype=float32")
ptdtype = getattr(torch, dtype)
# autocast runs matmuls in low precision while keeping weights and reductions in fp32
autocast = contextlib.nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # fp16 gradients underflow without scaling

compile_setting = config.compile.lower()
if compile_setting not in ("auto", "true", "false"):
    raise UserError(f"--compile must be auto, True or False, got '{config.compile}'")
use_compile = compile_setting == "true" or (compile_setting == "auto" and device_type == "cuda")

torch.manual_seed(config.seed)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
    torch.backends.cudnn.allow_tf32 = True

# ----------------------------------------------------------------------------- data

meta = load_meta(config.data_dir)
train_data, val_data = load_split(config.data_dir, "train"), load_split(config.data_dir, "val")
if config.gradient_accumulation_steps % world_size != 0:
    raise UserError(f"gradient_accumulation_steps={config.gradient_accumulation_steps} must be a multiple of "
                    f"the number of processes ({world_size})")
micro_steps = config.gradient_accumulation_steps // world_size
tokens_per_iter = config.gradient_accumulation_steps * config.batch_size * config.block_size
for name, split in (("train", train_data), ("val", val_data)):
    if len(split) <= config.block_size + 1:
        raise UserError(f"the {name} split has {len(split)} tokens, fewer than block_size={config.block_size}: "
                        f"lower --block_size or prepare more data")

# every process draws the same global batch and keeps its own slice of it, so the data seen per step
# does not depend on how many processes share the work
train_gen = torch.Generator().manual_seed(config.seed)


def get_batch(split_data, generator, micro_step_count):
    """micro_step_count x (batch_size, block_size) windows; this process's share of them."""
    total = config.gradient_accumulation_steps if micro_step_count is None else micro_step_count
    starts = torch.randint(len(split_data) - config.block_size - 1, (total, config.batch_size), generator=generator)
    if micro_step_count is None:
        starts = starts[rank * micro_steps:(rank + 1) * micro_steps]
    windows = []
    for row in starts.reshape(-1).tolist():
        windows.append(torch.from_numpy(split_data[row:row + config.block_size + 1].astype(np.int64)))
    batch = torch.stack(windows).view(starts.size(0), config.batch_size, config.block_size + 1)
    if device_type == "cuda":  # pinned memory lets the copy to the GPU overlap with compute
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[..., :-1], batch[..., 1:]  # inputs, and the same windows shifted by one as targets


# ----------------------------------------------------------------------------- model, optimizer, checkpoint

model_config = GPTConfig(vocab_size=meta["vocab_size"], block_size=config.block_size, hidden_size=config.hidden_size,
                         num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                         dropout=config.dropout, bias=config.bias)
iter_num, best_val_loss, checkpoint = 0, float("inf"), None
if config.init_from == "resume":
    checkpoint = read_checkpoint(config.out_dir)
    saved = checkpoint["model_config"]
    if saved["vocab_size"] != meta["vocab_size"]:
        raise UserError(f"vocab mismatch: the checkpoint has vocab_size={saved['vocab_size']} but {config.data_dir} "
                        f"has {meta['vocab_size']}; resume with the data it was trained on")
    if config.block_size > saved["block_size"]:
        raise UserError(f"block_size={config.block_size} is beyond the model's {saved['block_size']} positions")
    changed = {k: (saved[k], v) for k, v in asdict(model_config).items() if k != "block_size" and saved[k] != v}
    if changed:
        print(f"resuming with the checkpoint's model shape; ignoring {changed}")
    model_config = GPTConfig(**saved)
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
elif config.init_from != "scratch":
    raise UserError(f"--init_from must be 'scratch' or 'resume', got '{config.init_from}'")

model = GPT(model_config).to(device)
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
optimizer = model.configure_optimizer(config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                                      device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    train_gen.set_state(checkpoint["rng"]["data"])
raw_model = model  # the plain module: what checkpoints hold (no '_orig_mod.' or 'module.' prefixes)

if use_compile:
    try:
        model = torch.compile(model)
        x, y = get_batch(train_data, torch.Generator().manual_seed(0), 1)  # compile now, to fall back if it fails
        with autocast:
            model(x[0], y[0])[1].backward()
        optimizer.zero_grad(set_to_none=True)
    except Exception as e:
        print(f"warning: torch.compile failed ({str(e).splitlines()[0][:120]}); running eagerly", file=sys.stderr)
        model = raw_model
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
if checkpoint is not None:  # restored last, so set-up work (compile warm-up) cannot shift the random streams
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device_type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])


def get_lr(it):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it > config.lr_decay_iters:
        return config.min_lr
    progress = (it - config.warmup_iters) / max(1, config.lr_decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split; the same batches every time, so evaluations compare."""
    model.eval()
    losses = {}
    for name, data in (("train", train_data), ("val", val_data)):
        gen = torch.Generator().manual_seed(config.seed + 1)  # its own stream: training's is left untouched
        total = torch.zeros((), device=device)
        for _ in range(config.eval_iters):
            x, y = get_batch(data, gen, 1)
            with autocast:
                total += raw_model(x[0], y[0])[1].float()
        losses[name] = total.item() / config.eval_iters
    model.train()
    return losses


def write_checkpoint():
    checkpoint = {
        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "model_config": asdict(model_config), "train_config": config_to_dict(config),
        "iter_num": iter_num, "best_val_loss": best_val_loss,
        "rng": {"torch": torch.get_rng_state(), "data": train_gen.get_state(),
                **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {})},
    }
    path = save_checkpoint(checkpoint, config.out_dir)
    print(f"saved checkpoint to {path}")


def plot_losses(log_path, png_path):
    """Train and val loss curves from log.jsonl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(log_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(r["iter"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("iteration"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


# ----------------------------------------------------------------------------- logging set-up

if master:
    os.makedirs(config.out_dir, exist_ok=True)
    for name in ["meta.json"] + meta["tokenizer"]["files"]:  # the out_dir alone is enough to sample from
        shutil.copy(os.path.join(config.data_dir, name), os.path.join(config.out_dir, name))
    with open(os.path.join(config.out_dir, "config.json"), "w") as f:
        json.dump(config_to_dict(config), f, indent=2)
    print("config:", json.dumps(config_to_dict(config)))
    print(f"parameters: {raw_model.num_params(non_embedding=False) / 1e6:.2f}M "
          f"({raw_model.num_params() / 1e6:.2f}M without the position table)")
    print(f"device {device}, dtype {dtype}, compile {use_compile}, processes {world_size}; tokens per iteration: "
          f"{config.gradient_accumulation_steps} micro-steps x {config.batch_size} x {config.block_size} "
          f"= {tokens_per_iter:,}")
log_path = os.path.join(config.out_dir, "log.jsonl")
if master and config.init_from == "scratch" and os.path.exists(log_path):
    os.remove(log_path)  # a fresh run starts a fresh log
wandb = None
if master and config.wandb_log:
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs wandb: pip install wandb (or set --wandb_log=False)")
    wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=config_to_dict(config))


def log(row):
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb is not None:
            wandb.log(row, step=row["iter"])


peak_flops = config.peak_flops
if peak_flops == 0 and device_type == "cuda":
    name = torch.cuda.get_device_name()  # dense bf16 peaks from the data sheets
    peak_flops = next((v for k, v in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12),
                                      ("4090", 165e12), ("A10", 125e12)) if k in name), 0.0)

# Ctrl-C: finish the current step, save, exit. A second Ctrl-C stops at once.
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("\nstopping: saving a checkpoint after this step (Ctrl-C again to quit without saving)", flush=True)


signal.signal(signal.SIGINT, request_stop)

# ----------------------------------------------------------------------------- the training loop

start_iter, last_log_iter, t0, run_start = iter_num, iter_num, time.time(), time.time()
loss_sum = torch.zeros((), device=device)
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if (iter_num % config.eval_interval == 0 or iter_num == config.max_iters or stop_requested) and master:
        eval_start = time.time()
        losses = estimate_loss()
        print(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
              f"val perplexity {math.exp(losses['val']):.2f}")
        log({"iter": iter_num, "train_loss_eval": losses["train"], "val_loss": losses["val"], "lr": lr})
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        if iter_num > start_iter or stop_requested or iter_num == config.max_iters:
            if improved or config.always_save_checkpoint:
                write_checkpoint()
            plot_losses(log_path, os.path.join(config.out_dir, "loss.png"))
        t0 += time.time() - eval_start  # keep evaluation and saving out of the ms/iter figure
    if iter_num >= config.max_iters or stop_requested:
        break

    x, y = get_batch(train_data, train_gen, None)
    for micro in range(micro_steps):
        # DDP averages gradients across processes on backward; only the last micro-step needs to
        sync = contextlib.nullcontext() if not ddp or micro == micro_steps - 1 else model.no_sync()
        with sync:
            with autocast:
                _, loss = model(x[micro], y[micro])
            loss = loss / micro_steps  # the mean over micro-steps equals the loss of one big batch
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % config.log_interval == 0:
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)  # the loss of the whole global batch
        steps, last_log_iter = iter_num - last_log_iter, iter_num
        train_loss = loss_sum.item() / steps
        loss_sum.zero_()
        if not math.isfinite(train_loss):
            raise UserError(f"loss is {train_loss} at iteration {iter_num}: training diverged; lower "
                            f"--learning_rate, use --dtype=bfloat16 or float32, and resume from the last checkpoint")
        dt = (time.time() - t0) / steps
        t0 = time.time()
        tokens_per_sec = tokens_per_iter / dt
        mfu = raw_model.estimate_mfu(tokens_per_sec, peak_flops) if peak_flops else None
        eta = (config.max_iters - iter_num) * dt
        if master:
            print(f"iter {iter_num}/{config.max_iters}: loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{tokens_per_sec:,.0f} tok/s" + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "") +
                  f", eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        log({"iter": iter_num, "train_loss": train_loss, "lr": lr, "ms_per_iter": dt * 1000,
             "tokens_per_sec": tokens_per_sec, **({"mfu": mfu} if mfu is not None else {})})

if master:
    print(f"done: {iter_num} iterations in {time.time() - run_start:.0f}s, best val loss {best_val_loss:.4f}")
if ddp:
    dist.barrier()  # no process tears the group down while another still writes the last checkpoint
    dist.destroy_process_group()
