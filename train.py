"""
Train a GPT on the token files that prepare.py wrote. Read top to bottom: the settings, the helpers the loop uses,
then main(): set-up, then the training loop.

    python train.py config/wikitext_tiny.py                          # ~9 minutes on 2 CPU cores
    python train.py config/wikitext_small.py --batch_size=8          # a GPU-sized run
    python train.py config/wikitext_small.py --init_from=resume      # continue exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py   # several GPUs (DDP)

Settings: the defaults below, then a config file (plain `name = value` lines), then --name=value flags.
out_dir gets ckpt.pt, log.jsonl, loss.png, config.json, meta.json and the tokenizer: the folder alone is enough to
sample. Nothing is written into it before the first checkpoint, so a run that fails earlier leaves it as it was.
"""

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import check_out_dir, folder_lock, load_weights, read_checkpoint, read_log, save_run
from cli import UserError, duration, parse_config, run_main, setting
from data import load_meta, load_split
from model import GPT, GPTConfig
from muon import muon_with_adamw
from runtime import (autocast, check_fits, compile_or_eager, keep_freed_memory, peak_flops, pick_device, pick_dtype,
                     training_memory)
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    # I/O
    data_dir: str = "data/wikitext-2"         # a folder written by prepare.py
    out_dir: str = "out"                      # the checkpoint, its log, loss curve, config and tokenizer
    init_from: str = setting("scratch", choices=("scratch", "resume"))  # resume: from out_dir/ckpt.pt
    overwrite: bool = False                   # scratch into an out_dir holding a checkpoint replaces it
    eval_interval: int = setting(250, low=1)  # iterations between evaluations (and checkpoints)
    eval_iters: int = setting(50, low=1)      # batches per evaluation
    log_interval: int = setting(10, low=1)    # iterations between log lines (and a progress line every ~10 s)
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


# ----------------------------------------------------------------------------- resuming

FIXED_ON_RESUME = ({f.name for f in fields(GPTConfig)} - {"vocab_size", "block_size", "dropout", "embedding_dropout"}
                   | {"optimizer"})  # what a trained model and its optimizer state cannot change
OWN_FLAGS = {"out_dir", "init_from", "overwrite"}  # what each command says for itself, resumed or not


def settings_to_resume(config, checkpoint):
    """The settings the run in out_dir was started with (its checkpoint keeps them), with this command's --name=value
    flags on top, and the lines that name what differs; a flag the model's shape or optimizer cannot take is refused."""
    if "iter_num" not in checkpoint or "optimizer" not in checkpoint:
        raise UserError(f"{config.out_dir} holds a model that train.py did not write (fine-tuned, or exported), so "
                        f"there is no run to resume: start one from scratch in another --out_dir")
    if not isinstance(checkpoint.get("train_config"), dict):  # an older checkpoint: the command's settings
        return config, []
    saved = {k: v for k, v in checkpoint["train_config"].items() if k not in OWN_FLAGS}
    resumed = parse_config(TrainConfig, base=saved)
    changed = {k: (saved[k], v) for k, v in asdict(resumed).items() if k in saved and saved[k] != v}
    fixed = sorted(FIXED_ON_RESUME & changed.keys())
    if fixed:
        name = fixed[0]
        raise UserError(f"--{name} cannot change when resuming: the run was trained with {name}={saved[name]!r}; "
                        f"drop the flag, or start a new run in another --out_dir")
    flags_only = asdict(parse_config(TrainConfig, base={}))  # the defaults and this command's flags
    from_file = [k for k, v in asdict(config).items() if k in saved and v != flags_only[k] and v != saved[k]]
    notices = []
    if from_file:
        notices.append("resuming with the run's own settings, not the config file's: " + ", ".join(
            f"{k}={saved[k]!r} (the file says {getattr(config, k)!r})" for k in from_file)
            + "; a --name=value flag changes one")
    if changed:
        notices.append("changed from the run's settings by this command: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return resumed, notices


def read_resume_checkpoint(config, checkpoint, model_config, meta, tokenizer_sha256):
    """The model shape a checkpoint holds, after refusing what cannot go on from it: other data, a max_iters it has
    already passed, a longer context than its model has."""
    saved = checkpoint["model_config"]
    if saved["vocab_size"] != meta["vocab_size"]:
        raise UserError(f"vocab mismatch: the checkpoint has vocab_size={saved['vocab_size']} but {config.data_dir} "
                        f"has {meta['vocab_size']}; resume with the data it was trained on")
    trained_with = checkpoint.get("tokenizer_sha256") or load_tokenizer(config.out_dir).fingerprint()
    if trained_with != tokenizer_sha256:
        raise UserError(f"{config.data_dir} was tokenized with another tokenizer than the checkpoint in "
                        f"{config.out_dir}: resume with the data it was trained on")
    if checkpoint["iter_num"] > config.max_iters:
        raise UserError(f"the checkpoint is at iteration {checkpoint['iter_num']}, and --max_iters={config.max_iters}: "
                        f"raise --max_iters (and --lr_decay_iters) to train on")
    if config.block_size > saved["block_size"]:
        raise UserError(f"block_size={config.block_size} is beyond the model's {saved['block_size']} positions")
    changed = {k: (saved[k], v) for k, v in asdict(model_config).items() if k != "block_size" and saved[k] != v}
    if changed:  # a checkpoint without its train_config
        print(f"resuming with the checkpoint's model shape; ignoring {changed}")
    return GPTConfig(**saved)


# ----------------------------------------------------------------------------- data, schedule, evaluation, signals

def get_batch(data, generator, count, config, device, keep=slice(None)):
    """count x (batch_size, block_size) random windows of data as inputs, and the same windows shifted by one as
    targets; only the rows in `keep` (a process's share of a batch drawn alike by every process) go to the device."""
    starts = torch.randint(len(data) - config.block_size - 1, (count, config.batch_size), generator=generator)[keep]
    offsets = starts.numpy()[..., None] + np.arange(config.block_size + 1)  # every window's token positions
    batch = torch.from_numpy(data[offsets].astype(np.int64))  # one gather from the memmap, no Python loop
    if device.startswith("cuda"):  # pinned memory lets the copy to the GPU overlap with compute
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[..., :-1], batch[..., 1:]


def get_lr(it, config):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it > config.lr_decay_iters:
        return config.min_lr
    progress = (it - config.warmup_iters) / max(1, config.lr_decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


@torch.no_grad()
def estimate_loss(model, splits, config, amp, device, stop=()):
    """Mean loss over eval_iters batches of each split; the same batches every time, so evaluations compare. None if
    a stop signal arrives meanwhile (stop: stop_on_signals' list): a SIGTERM does not wait for eval_iters batches."""
    model.eval()
    losses, signals = {}, len(stop)
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(config.seed + 1)  # its own stream: training's is left untouched
        total = torch.zeros((), device=device)
        for _ in range(config.eval_iters):
            if len(stop) > signals:
                model.train()
                return None
            x, y = get_batch(data, generator, 1, config, device)
            with amp:
                total += model(x[0], y[0])[1].float()
        losses[name] = total.item() / config.eval_iters
    model.train()
    return losses


def stop_on_signals():
    """Ctrl-C, or SIGTERM (what SLURM, Kubernetes and spot instances send before they kill a job), sets the flag
    returned: the loop finishes its step, saves and exits, and --init_from=resume goes on from there. A second signal
    stops at once."""
    requested = []

    def request_stop(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"\nstopping ({signal.Signals(signum).name}): saving a checkpoint after this step (Ctrl-C again to quit "
              f"without saving)", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return requested


# ----------------------------------------------------------------------------- the run

def main():
    config = parse_config(TrainConfig)
    ddp = int(os.environ.get("RANK", -1)) != -1  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0  # only one process logs and writes checkpoints
    check_out_dir(config.out_dir, fresh=config.init_from == "scratch", overwrite=config.overwrite)
    checkpoint = None
    if config.init_from == "resume":  # the run goes on with its own settings
        checkpoint = read_checkpoint(config.out_dir)
        config, notices = settings_to_resume(config, checkpoint)
        if master and notices:
            print("\n".join(notices))

    # processes, device, precision
    device = pick_device(config.device)
    if device == "cuda" and ddp:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    device_type = device.split(":")[0]
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cpu":
        keep_freed_memory()  # each step's activations reuse the last step's memory: 10-15% of a CPU step
    ptdtype = pick_dtype(config.dtype, device)  # auto: bf16 where the hardware has it, on CPUs too
    amp = autocast(device, ptdtype)  # matmuls in low precision, weights and reductions in fp32
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)  # fp16 gradients underflow unscaled
    use_compile = config.compile == "True" or (config.compile == "auto" and device_type == "cuda")
    torch.manual_seed(config.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    # data: every process draws the same global batch and keeps its own slice of it, so the data seen per step
    # does not depend on how many processes share the work
    meta = load_meta(config.data_dir)
    splits = {"train": load_split(config.data_dir, "train"), "val": load_split(config.data_dir, "val")}
    for name, split in splits.items():
        if len(split) <= config.block_size + 1:
            raise UserError(f"the {name} split has {len(split)} tokens, fewer than block_size={config.block_size}: "
                            f"lower --block_size or prepare more data")
    if config.gradient_accumulation_steps % world_size != 0:
        raise UserError(f"gradient_accumulation_steps={config.gradient_accumulation_steps} must be a multiple of "
                        f"the number of processes ({world_size})")
    micro_steps = config.gradient_accumulation_steps // world_size
    my_rows = slice(rank * micro_steps, (rank + 1) * micro_steps)
    tokens_per_iter = config.gradient_accumulation_steps * config.batch_size * config.block_size
    train_gen = torch.Generator().manual_seed(config.seed)
    tokenizer_sha256 = load_tokenizer(config.data_dir).fingerprint()

    # the model and its optimizer, from scratch or from the checkpoint
    model_settings = {f.name: getattr(config, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"}
    try:
        model_config = GPTConfig(vocab_size=meta["vocab_size"], **model_settings)  # the same names in both
    except ValueError as e:  # a shape that cannot be built: the settings say so
        raise UserError(str(e))
    iter_num, best_val_loss, log_rows = 0, float("inf"), []
    if checkpoint is not None:
        model_config = read_resume_checkpoint(config, checkpoint, model_config, meta, tokenizer_sha256)
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        if iter_num == config.max_iters:
            print(f"{config.out_dir} is trained to --max_iters={iter_num} already: nothing to do (raise --max_iters "
                  f"and --lr_decay_iters to train on)")
            return
        log_rows = read_log(config.out_dir, iter_num)
    weights, activations = training_memory(model_config, config.batch_size, config.block_size,
                                           optimizer_states=1 if config.optimizer == "muon" else 2)
    check_fits(weights + activations, device, f"training {model_config.num_params() / 1e6:,.1f}M parameters "
               f"({weights / 1e9:,.1f} GB with gradients and optimizer state) at batch_size={config.batch_size} x "
               f"block_size={config.block_size} ({activations / 1e9:,.1f} GB of activations)",
               "lower --batch_size (raising --gradient_accumulation_steps keeps the batch), or the model's size")
    raw_model = GPT(model_config).to(device)  # the plain module: what checkpoints hold
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        optimizer = muon_with_adamw(raw_model, config.muon_learning_rate, config.learning_rate, config.weight_decay,
                                    betas, device_type)
    else:
        optimizer = raw_model.configure_optimizer(config.weight_decay, config.learning_rate, betas, device_type)
    if checkpoint is not None:
        load_weights(raw_model, checkpoint["model"], config.out_dir)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (KeyError, ValueError, TypeError):
            raise UserError(f"the checkpoint's optimizer state is not --optimizer={config.optimizer}'s: resume with "
                            f"the optimizer it was trained with")
        scaler.load_state_dict(checkpoint["scaler"])
        train_gen.set_state(checkpoint["rng"]["data"])
    model = raw_model
    if use_compile:
        def compile_step(compiled):  # one forward and backward pass, so that compilation happens (or fails) now
            x, y = get_batch(splits["train"], torch.Generator().manual_seed(0), 1, config, device)
            with amp:
                compiled(x[0], y[0])[1].backward()

        model = compile_or_eager(raw_model, compile_step)
        optimizer.zero_grad(set_to_none=True)  # the warm-up's gradients
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)
    if checkpoint is not None:  # restored last, so set-up work (compile warm-up) cannot shift the random streams
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device_type == "cuda" and "cuda" in checkpoint["rng"]:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])

    # logging
    wandb = None
    if master:
        print("config:", json.dumps(asdict(config)))
        print(f"parameters: {raw_model.num_params(non_embedding=False) / 1e6:.2f}M "
              f"({raw_model.num_params() / 1e6:.2f}M without the position table)")
        print(f"device {device}, dtype {str(ptdtype).removeprefix('torch.')}, compile {use_compile}, processes "
              f"{world_size}; tokens per iteration: {config.gradient_accumulation_steps} micro-steps x "
              f"{config.batch_size} x {config.block_size} = {tokens_per_iter:,}")
        if config.wandb_log:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True needs wandb: pip install wandb (or set --wandb_log=False)")
            wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=asdict(config))
    device_peak_flops = config.peak_flops or peak_flops(device)
    if master and device_type == "cuda" and not device_peak_flops:
        print(f"MFU: set --peak_flops (the dense bf16 FLOP/s of {torch.cuda.get_device_name(device)}) to see it")

    def log(row):
        if master:
            log_rows.append(row)
            if wandb is not None:
                wandb.log(row, step=row["iter"])

    def training_state():  # what a checkpoint holds: everything that resuming needs to go on exactly
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "model_config": asdict(model_config), "train_config": asdict(config),
                "tokenizer_sha256": tokenizer_sha256, "iter_num": iter_num, "best_val_loss": best_val_loss,
                "rng": {"torch": torch.get_rng_state(), "data": train_gen.get_state(),
                        **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {})}}

    # the training loop; one run per out_dir at a time: a second one is refused, naming this one's PID
    stop_requested = stop_on_signals()
    start_iter, run_start, saved = iter_num, time.time(), config.init_from == "resume"  # saved: out_dir is ours
    last_log_iter, last_log_time, last_line_time = iter_num, time.time(), time.time()
    loss_sum = torch.zeros((), device=device)
    with folder_lock(config.out_dir) if master else contextlib.nullcontext():
        while True:
            lr = get_lr(iter_num, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups run at their own multiple

            resumed_here = iter_num == start_iter and config.init_from == "resume"  # its checkpoint's eval is logged
            at_eval = iter_num % config.eval_interval == 0 or iter_num == config.max_iters or stop_requested
            if master and at_eval and not resumed_here:
                eval_start = time.time()
                losses = estimate_loss(model, splits, config, amp, device, stop_requested)
                if losses is None:  # stopped during the evaluation: save without it, as a stop does, and leave
                    print(f"eval {iter_num}: stopped", flush=True)
                    if iter_num > start_iter and (config.always_save_checkpoint or saved):
                        save_run(config.out_dir, log_rows, asdict(config), config.data_dir,
                                 ["meta.json"] + meta["tokenizer"]["files"],
                                 training_state() if config.always_save_checkpoint else None)
                    break
                print(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"val perplexity {math.exp(losses['val']):.2f}", flush=True)
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                log({"iter": iter_num, "train_loss_eval": losses["train"], "val_loss": losses["val"], "lr": lr})
                keep = improved or config.always_save_checkpoint  # else only the log moves on
                if (iter_num > start_iter or stop_requested) and (keep or saved):
                    save_run(config.out_dir, log_rows, asdict(config), config.data_dir,
                             ["meta.json"] + meta["tokenizer"]["files"], training_state() if keep else None)
                    saved = True
                shift = time.time() - eval_start  # keep evaluation and saving out of the ms/iter figure
                last_log_time, last_line_time = last_log_time + shift, last_line_time + shift
            if iter_num >= config.max_iters or stop_requested:
                break

            x, y = get_batch(splits["train"], train_gen, config.gradient_accumulation_steps, config, device, my_rows)
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

            now = time.time()
            if iter_num % config.log_interval == 0 or iter_num == config.max_iters:
                if ddp:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)  # the loss of the whole global batch
                train_loss = loss_sum.item() / (iter_num - last_log_iter)
                loss_sum.zero_()
                if not math.isfinite(train_loss):
                    rates = "--learning_rate" + (" and --muon_learning_rate" if config.optimizer == "muon" else "")
                    dtype_hint = ", use --dtype=bfloat16 or float32" if ptdtype == torch.float16 else ""
                    raise UserError(f"loss is {train_loss} at iteration {iter_num}: training diverged; lower "
                                    f"{rates}{dtype_hint}, and resume from the last checkpoint")
                dt = (now - last_log_time) / (iter_num - last_log_iter)
                tokens_per_sec = tokens_per_iter / dt
                mfu = raw_model.estimate_mfu(tokens_per_sec, device_peak_flops) if device_peak_flops else None
                if master:
                    print(f"iter {iter_num}/{config.max_iters}: loss {train_loss:.4f}, lr {lr:.2e}, "
                          f"{dt * 1000:.1f} ms/iter, {tokens_per_sec:,.0f} tok/s"
                          + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "")
                          + f", eta {duration((config.max_iters - iter_num) * dt)}", flush=True)
                log({"iter": iter_num, "train_loss": train_loss, "lr": lr, "ms_per_iter": dt * 1000,
                     "tokens_per_sec": tokens_per_sec, **({"mfu": mfu} if mfu is not None else {})})
                last_log_iter, last_log_time, last_line_time = iter_num, now, now
            elif master and now - last_line_time > 10:  # between log lines: where it is, at least every ~10 s
                dt = (now - last_log_time) / (iter_num - last_log_iter)
                print(f"iter {iter_num}/{config.max_iters}: {dt * 1000:.1f} ms/iter, "
                      f"eta {duration((config.max_iters - iter_num) * dt)}", flush=True)
                last_line_time = now

        if master:
            print(f"done: {iter_num} iterations in {time.time() - run_start:.0f}s, best val loss {best_val_loss:.4f}")
    if ddp:
        dist.barrier()  # no process tears the group down while another still writes the last checkpoint
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
