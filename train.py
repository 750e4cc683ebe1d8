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
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import is_checkpoint, read_checkpoint, save_checkpoint
from cli import UserError, config_to_dict, parse_config, print_user_errors_as_one_line, setting
from common import atomic_write, folder_lock, write_json
from model import GPT, GPTConfig
from muon import muon_with_adamw
from prepare import load_meta, load_split
from tokenizer import load_tokenizer
from runtime import autocast, compile_or_eager, peak_flops, pick_device, pick_dtype


@dataclass
class TrainConfig:
    # I/O
    data_dir: str = "data/wikitext-2"         # a folder written by prepare.py
    out_dir: str = "out"                      # the checkpoint, its log, loss curve, config and tokenizer
    init_from: str = setting("scratch", choices=("scratch", "resume"))  # resume: from out_dir/ckpt.pt
    overwrite: bool = False                   # scratch into an out_dir holding a checkpoint replaces it
    eval_interval: int = setting(250, low=1)  # iterations between evaluations (and checkpoints)
    eval_iters: int = setting(50, low=1)      # batches per evaluation
    log_interval: int = setting(10, low=1)    # iterations between log lines
    always_save_checkpoint: bool = True       # False: save only when val loss improves
    wandb_log: bool = False                   # also log to wandb (pip install wandb)
    wandb_project: str = "gpt"                # wandb project name
    wandb_run_name: str = "run"               # wandb run name
    # data
    batch_size: int = setting(16, low=1)      # sequences per micro-step per process
    block_size: int = setting(256, low=1)     # tokens per sequence: the model's context
    gradient_accumulation_steps: int = setting(1, low=1)  # micro-steps per optimizer step, summed over all processes
    # model
    hidden_size: int = setting(384, low=1)    # width of the residual stream
    num_hidden_layers: int = setting(6, low=1)  # transformer blocks
    num_attention_heads: int = setting(6, low=1)  # must divide hidden_size
    dropout: float = setting(0.1, low=0, below=1)  # on attention weights, residuals and embeddings in training
    bias: bool = False                        # biases in Linear layers and LayerNorms (GPT-2 has them)
    position: str = setting("learned", choices=("learned", "rope"))  # position encoding (model.py's GPTConfig)
    activation: str = setting("gelu", choices=("gelu", "relu2"))  # the MLP's nonlinearity
    qk_norm: bool = False                     # RMS-normalise queries and keys
    tie_embeddings: bool = True               # the output layer is the token embedding
    logit_softcap: float = setting(0.0, low=0)  # > 0: logits squashed into (-softcap, softcap)
    embedding_dropout: float = setting(0.0, low=0, below=1)  # drop whole words while training
    zero_init_residual: bool = False          # residual projections start at zero
    # the optimizer and the learning-rate schedule (linear warmup, then cosine decay to min_lr)
    optimizer: str = setting("adamw", choices=("adamw", "muon"))  # muon: Muon for the blocks' matrices
    learning_rate: float = setting(1e-3, above=0)  # the peak, reached after warmup_iters
    muon_learning_rate: float = setting(0.02, above=0)  # Muon's peak, on the same schedule
    max_iters: int = setting(5000, low=1)     # optimizer steps in all
    weight_decay: float = setting(0.1, low=0)  # on matrices only
    beta1: float = setting(0.9, low=0, below=1)  # AdamW's first-moment decay
    beta2: float = setting(0.99, low=0, below=1)  # AdamW's second-moment decay
    grad_clip: float = setting(1.0, low=0)    # clip the gradient norm to this; 0 turns clipping off
    warmup_iters: int = setting(100, low=0)   # linear warmup from ~0 to learning_rate
    lr_decay_iters: int = setting(5000, low=0)  # cosine decay ends here; usually = max_iters
    min_lr: float = setting(1e-4, low=0)      # the rate after lr_decay_iters; usually learning_rate / 10
    # system
    device: str = "auto"                      # auto picks cuda, then mps, then cpu
    dtype: str = "auto"                       # bfloat16 | float16 | float32; auto: bf16 where the hardware has it
    compile: str = setting("auto", choices=("auto", "True", "False"))  # torch.compile; auto: on CUDA only
    peak_flops: float = setting(0.0, low=0)   # device peak FLOP/s for MFU; 0 = known GPUs only
    seed: int = setting(1337, low=0, high=2**62)  # model init, data order and dropout


print_user_errors_as_one_line()
config = parse_config(TrainConfig)

# ----------------------------------------------------------------------------- what out_dir may become

# Nothing is written into out_dir before the first checkpoint, so a run that fails before it leaves the folder as it
# found it; a trained folder is replaced only when asked.
if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
    raise UserError(f"--out_dir={config.out_dir} is a file: choose a folder")
if config.init_from == "scratch" and is_checkpoint(config.out_dir) and not config.overwrite:
    raise UserError(f"{config.out_dir} holds a trained model: continue it with --init_from=resume, choose another "
                    f"--out_dir, or replace it with --overwrite=True")

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

ptdtype = pick_dtype(config.dtype, device)  # auto: bf16 where the hardware has it, on CPUs too (README)
dtype = str(ptdtype).removeprefix("torch.")
# autocast runs matmuls in low precision while keeping weights and reductions in fp32
amp = autocast(device, ptdtype)
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)  # fp16 gradients underflow unscaled

use_compile = config.compile == "True" or (config.compile == "auto" and device_type == "cuda")

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
    offsets = starts.numpy()[..., None] + np.arange(config.block_size + 1)  # every window's token positions
    batch = torch.from_numpy(split_data[offsets].astype(np.int64))  # one gather from the memmap, no Python loop
    if device_type == "cuda":  # pinned memory lets the copy to the GPU overlap with compute
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[..., :-1], batch[..., 1:]  # inputs, and the same windows shifted by one as targets


# ----------------------------------------------------------------------------- model, optimizer, checkpoint

model_settings = {field.name: getattr(config, field.name) for field in fields(GPTConfig) if field.name != "vocab_size"}
try:
    model_config = GPTConfig(vocab_size=meta["vocab_size"], **model_settings)  # the same names in both
except ValueError as e:  # a shape that cannot be built: the settings say so
    raise UserError(str(e))
iter_num, best_val_loss, checkpoint = 0, float("inf"), None
tokenizer_sha256 = load_tokenizer(config.data_dir).fingerprint()
if config.init_from == "resume":
    checkpoint = read_checkpoint(config.out_dir)
    saved = checkpoint["model_config"]
    if saved["vocab_size"] != meta["vocab_size"]:
        raise UserError(f"vocab mismatch: the checkpoint has vocab_size={saved['vocab_size']} but {config.data_dir} "
                        f"has {meta['vocab_size']}; resume with the data it was trained on")
    trained_with = checkpoint.get("tokenizer_sha256") or load_tokenizer(config.out_dir).fingerprint()
    if trained_with != tokenizer_sha256:
        raise UserError(f"{config.data_dir} was tokenized with another tokenizer than the checkpoint in "
                        f"{config.out_dir}: resume with the data it was trained on")
    if checkpoint["iter_num"] >= config.max_iters:
        raise UserError(f"the checkpoint is at iteration {checkpoint['iter_num']}, and --max_iters={config.max_iters}: "
                        f"raise --max_iters (and --lr_decay_iters) to train on")
    if config.block_size > saved["block_size"]:
        raise UserError(f"block_size={config.block_size} is beyond the model's {saved['block_size']} positions")
    changed = {k: (saved[k], v) for k, v in asdict(model_config).items() if k != "block_size" and saved[k] != v}
    if changed:
        print(f"resuming with the checkpoint's model shape; ignoring {changed}")
    model_config = GPTConfig(**saved)
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]

model = GPT(model_config).to(device)
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
betas = (config.beta1, config.beta2)
if config.optimizer == "muon":
    optimizer = muon_with_adamw(model, config.muon_learning_rate, config.learning_rate, config.weight_decay, betas,
                                device_type)
else:
    optimizer = model.configure_optimizer(config.weight_decay, config.learning_rate, betas, device_type)
if checkpoint is not None:
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, ValueError, TypeError):
        raise UserError(f"the checkpoint's optimizer state is not --optimizer={config.optimizer}'s: resume with the "
                        f"optimizer it was trained with")
    scaler.load_state_dict(checkpoint["scaler"])
    train_gen.set_state(checkpoint["rng"]["data"])
raw_model = model  # the plain module: what checkpoints hold (no '_orig_mod.' or 'module.' prefixes)


def compile_step(compiled):
    """One forward and backward pass, so that compilation happens (or fails) now."""
    x, y = get_batch(train_data, torch.Generator().manual_seed(0), 1)
    with amp:
        compiled(x[0], y[0])[1].backward()


if use_compile:
    model = compile_or_eager(model, compile_step)
    optimizer.zero_grad(set_to_none=True)  # the warm-up's gradients
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
            with amp:
                total += raw_model(x[0], y[0])[1].float()
        losses[name] = total.item() / config.eval_iters
    model.train()
    return losses


def write_checkpoint():
    """Save the run atomically. The first save also writes what makes out_dir usable alone (meta.json, the tokenizer,
    config.json) and the log so far: until then the folder is as this run found it."""
    global pending_log
    checkpoint = {
        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "model_config": asdict(model_config), "train_config": config_to_dict(config),
        "tokenizer_sha256": tokenizer_sha256, "iter_num": iter_num, "best_val_loss": best_val_loss,
        "rng": {"torch": torch.get_rng_state(), "data": train_gen.get_state(),
                **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {})},
    }
    try:
        if pending_log is not None:
            for name in ["meta.json"] + meta["tokenizer"]["files"]:  # the out_dir alone is enough to sample from
                source = os.path.join(config.data_dir, name)
                atomic_write(os.path.join(config.out_dir, name), lambda tmp: shutil.copyfile(source, tmp))
            write_json(os.path.join(config.out_dir, "config.json"), config_to_dict(config))
            earlier = open(log_path).read() if config.init_from == "resume" and os.path.exists(log_path) else ""
            rows = earlier + "".join(json.dumps(row) + "\n" for row in pending_log)
            atomic_write(log_path, lambda tmp: tmp.write_text(rows))
            pending_log = None
        path = save_checkpoint(checkpoint, config.out_dir)
    except OSError as e:  # a full disk, a read-only folder: the previous checkpoint is intact
        raise UserError(f"cannot save into {config.out_dir} ({e.strerror or e}); the last checkpoint there is intact: "
                        f"free some space or fix the permissions, then --init_from=resume")
    print(f"saved checkpoint to {path}")


def plot_losses(log_path, png_path):
    """Train and val loss curves from log.jsonl."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = []
    for line in open(log_path):
        with contextlib.suppress(ValueError):  # a line cut short by a crash
            rows.append(json.loads(line))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(r["iter"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("iteration"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- logging set-up

if master:
    print("config:", json.dumps(config_to_dict(config)))
    print(f"parameters: {raw_model.num_params(non_embedding=False) / 1e6:.2f}M "
          f"({raw_model.num_params() / 1e6:.2f}M without the position table)")
    print(f"device {device}, dtype {dtype}, compile {use_compile}, processes {world_size}; tokens per iteration: "
          f"{config.gradient_accumulation_steps} micro-steps x {config.batch_size} x {config.block_size} "
          f"= {tokens_per_iter:,}")
log_path = os.path.join(config.out_dir, "log.jsonl")
pending_log = []  # the log rows before the first checkpoint; None once they are in log_path
wandb = None
if master and config.wandb_log:
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs wandb: pip install wandb (or set --wandb_log=False)")
    wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=config_to_dict(config))


def log(row):
    if master:
        if pending_log is not None:
            pending_log.append(row)
        else:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if wandb is not None:
            wandb.log(row, step=row["iter"])


device_peak_flops = config.peak_flops or peak_flops(device)
if master and device_type == "cuda" and not device_peak_flops:
    print(f"MFU: set --peak_flops (the dense bf16 FLOP/s of {torch.cuda.get_device_name(device)}) to see it")

# Ctrl-C, or SIGTERM (what SLURM, Kubernetes and spot instances send before they kill a job): finish the current
# step, save, exit; --init_from=resume goes on exactly from there. A second Ctrl-C stops at once.
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"\nstopping ({signal.Signals(signum).name}): saving a checkpoint after this step (Ctrl-C again to quit "
          f"without saving)", flush=True)


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

# ----------------------------------------------------------------------------- the training loop

# one run per out_dir at a time: a second one is refused, naming this one's PID
with folder_lock(config.out_dir) if master else contextlib.nullcontext():
    start_iter, last_log_iter, t0, run_start = iter_num, iter_num, time.time(), time.time()
    loss_sum = torch.zeros((), device=device)
    while True:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups run at their own multiple

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
                if pending_log is None:  # the log is in out_dir: so is its curve
                    plot_losses(log_path, os.path.join(config.out_dir, "loss.png"))
            t0 += time.time() - eval_start  # keep evaluation and saving out of the ms/iter figure
        if iter_num >= config.max_iters or stop_requested:
            break

        x, y = get_batch(train_data, train_gen, None)
        for micro in range(micro_steps):
            # DDP averages gradients across processes on backward; only the last micro-step needs to
            sync = contextlib.nullcontext() if not ddp or micro == micro_steps - 1 else model.no_sync()
            with sync:
                with amp:
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
                                f"--learning_rate, use --dtype=bfloat16 or float32, and resume from the last "
                                f"checkpoint")
            dt = (time.time() - t0) / steps
            t0 = time.time()
            tokens_per_sec = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_sec, device_peak_flops) if device_peak_flops else None
            eta = (config.max_iters - iter_num) * dt
            if master:
                print(f"iter {iter_num}/{config.max_iters}: loss {train_loss:.4f}, lr {lr:.2e}, "
                      f"{dt * 1000:.1f} ms/iter, {tokens_per_sec:,.0f} tok/s"
                      + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "") +
                      f", eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            log({"iter": iter_num, "train_loss": train_loss, "lr": lr, "ms_per_iter": dt * 1000,
                 "tokens_per_sec": tokens_per_sec, **({"mfu": mfu} if mfu is not None else {})})

    if master:
        print(f"done: {iter_num} iterations in {time.time() - run_start:.0f}s, best val loss {best_val_loss:.4f}")

if ddp:
    dist.barrier()  # no process tears the group down while another still writes the last checkpoint
    dist.destroy_process_group()
