"""
Train a GPT on the token files that prepare.py wrote. Read top to bottom: the settings, the helpers
the loop uses, then main(): the set-up (resume_run: which run goes on), then the training loop.

    python train.py config/wikitext_tiny.py                      # ~9 minutes on 2 CPU cores
    python train.py config/wikitext_small.py --batch_size=8      # a GPU-sized run
    python train.py config/wikitext_small.py --init_from=resume  # go on exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py   # several GPUs (DDP)

Settings: the defaults below, then a config file (`name = value` lines), then --name=value flags.
out_dir gets ckpt.pt, log.jsonl, loss.png, config.json, meta.json and the tokenizer: enough to
sample. Nothing is written into it before the first checkpoint.
"""

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import restore_training, resume_run, save_run, training_checkpoint
from cli import UserError, parse_config, run_main, setting
from data import load_training_data
from files import duration, folder_lock
from model import GPT, GPTConfig
from muon import Average, muon_with_adamw, orthogonalize
from runtime import (check_training_fits, compile_or_eager, estimate_mfu, peak_flops,
                     end_processes, start_processes, training_precision)


@dataclass
class TrainConfig:
    # I/O
    data_dir: str = "data/wikitext-2"         # a folder written by prepare.py
    out_dir: str = "out"                      # the checkpoint, log, loss curve, config and tokenizer
    init_from: str = setting("scratch", choices=("scratch", "resume"))  # resume: out_dir/ckpt.pt
    overwrite: bool = False                   # scratch over out_dir's checkpoint replaces it
    eval_interval: int = setting(250, low=1)  # iterations between evaluations (and checkpoints)
    eval_iters: int = setting(50, low=1)      # batches per evaluation
    log_interval: int = setting(10, low=1)    # iterations between log lines (progress: every ~10 s)
    always_save_checkpoint: bool = True       # False: save only when val loss improves
    wandb_log: bool = False                   # also log to wandb (pip install wandb)
    wandb_project: str = "gpt"                # wandb project name
    wandb_run_name: str = "run"               # wandb run name
    # data
    batch_size: int = setting(16, low=1)      # sequences per micro-step per process
    block_size: int = setting(256, low=1)     # tokens per sequence: the model's context
    gradient_accumulation_steps: int = setting(1, low=1)  # micro-steps per step, over all processes
    # model
    hidden_size: int = setting(384, low=1)    # width of the residual stream
    num_hidden_layers: int = setting(6, low=1)  # transformer blocks
    num_attention_heads: int = setting(6, low=1)  # must divide hidden_size
    dropout: float = setting(0.1, low=0, below=1)  # on the embeddings, and where the next two are < 0
    attention_dropout: float = setting(-1.0, low=-1, below=1)  # on attention weights (< 0: dropout)
    residual_dropout: float = setting(-1.0, low=-1, below=1)  # on residual branches (< 0: dropout)
    head_dropout: float = setting(0.0, low=0, below=1)  # on the final states, before the head
    bias: bool = False                        # biases in Linear and LayerNorm layers (GPT-2 has them)
    position: str = setting("learned", choices=("learned", "rope"))  # rope: rotary positions
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
    muon_weight_decay: float = setting(0.0, low=0)  # Muon's matrices: p *= 1 - lr * this, each step
    embedding_learning_rate: float = setting(0.0, low=0)  # muon: the token table's AdamW peak
                                                          # (0: learning_rate)
    max_iters: int = setting(5000, low=1)     # optimizer steps in all
    weight_decay: float = setting(0.1, low=0)  # on matrices only
    beta1: float = setting(0.9, low=0, below=1)  # AdamW's first-moment decay
    beta2: float = setting(0.99, low=0, below=1)  # AdamW's second-moment decay
    grad_clip: float = setting(1.0, low=0)    # clip the gradient norm to this; 0 turns clipping off
    warmup_iters: int = setting(100, low=0)   # linear warmup from ~0 to learning_rate
    lr_decay_iters: int = setting(5000, low=0)  # cosine decay ends here; usually = max_iters
    min_lr: float = setting(1e-4, low=0)      # the last rate; usually learning_rate / 10
    ema_decay: float = setting(0.0, low=0, below=1)  # > 0: evaluate and save the weights' average
    # system
    device: str = "auto"                      # auto picks cuda, then mps, then cpu
    dtype: str = "auto"                       # bfloat16 | float16 | float32; auto: bf16 where fast
    compile: str = setting("auto", choices=("auto", "True", "False"))  # torch.compile; auto: on CUDA
    peak_flops: float = setting(0.0, low=0)   # device peak FLOP/s for MFU; 0 = known GPUs only
    seed: int = setting(1337, low=0, high=2**62)  # model init, data order and dropout


# ----------------------------------------------------------------------------- the loop's helpers

def get_batch(data, generator, count, config, device, keep=slice(None)):
    """(the generator's state before the draw, inputs, targets): count x (batch_size, block_size)
    random windows of data, and the same windows shifted by one; only the rows in `keep` (a
    process's share of a batch drawn alike by every process) go to the device."""
    state = generator.get_state()
    starts = torch.randint(len(data) - config.block_size - 1, (count, config.batch_size),
                           generator=generator)[keep]
    # every window's token positions, gathered from the memmap at once
    offsets = starts.numpy()[..., None] + np.arange(config.block_size + 1)
    batch = torch.from_numpy(data[offsets].astype(np.int64))
    cuda = device.startswith("cuda")  # pinned memory lets the copy to the GPU overlap with compute
    batch = (batch.pin_memory() if cuda else batch).to(device, non_blocking=cuda)
    return state, batch[..., :-1], batch[..., 1:]


def batch_rows(micro_batches, rank, world_size):
    """This process's share of each step's micro-batches: every process draws the same global
    batch and keeps its own rows. batch_rows(4, 1, 2) -> slice(2, 4)."""
    if micro_batches % world_size:
        raise UserError(f"gradient_accumulation_steps must be a multiple of the {world_size} "
                        f"processes")
    share = micro_batches // world_size
    return slice(rank * share, (rank + 1) * share)


def build_model(config, vocab_size, state, device):
    """The model (the settings' shape; a resumed one keeps its context length) and its optimizer,
    refused before they are made where the shape cannot be built or would not fit in memory."""
    if config.embedding_learning_rate and config.optimizer != "muon":
        raise UserError("--embedding_learning_rate is part of Muon's recipe: add --optimizer=muon, "
                        "or drop it")
    shape = {f.name: getattr(config, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"}
    if "model_config" in state:  # resumed: the model keeps its context length
        shape["block_size"] = state["model_config"]["block_size"]
    try:
        model_config = GPTConfig(vocab_size=vocab_size, **shape)
    except ValueError as e:  # a shape that cannot be built: the settings say so
        raise UserError(str(e))
    copies = (1 if config.optimizer == "muon" else 2) + (config.ema_decay > 0)  # + the average
    check_training_fits(model_config, config.batch_size, config.block_size, copies, device)
    model = GPT(model_config).to(device)
    betas, device_type = (config.beta1, config.beta2), device.split(":")[0]
    if config.optimizer == "muon":
        return model, muon_with_adamw(model, config.muon_learning_rate, config.learning_rate,
                                      config.weight_decay, betas, device_type,
                                      muon_weight_decay=config.muon_weight_decay,
                                      embedding_lr=config.embedding_learning_rate)
    return model, model.configure_optimizer(config.weight_decay, config.learning_rate, betas, device_type)


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
    """Mean loss over eval_iters batches of each split; the same batches every time, so evaluations
    compare. None if a stop signal arrives meanwhile (stop: stop_on_signals' list)."""
    model.eval()
    losses, signals = {}, len(stop)
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(config.seed + 1)  # training's stream: untouched
        total = torch.zeros((), device=device)
        for _ in range(config.eval_iters):
            if len(stop) > signals:
                break
            _, x, y = get_batch(data, generator, 1, config, device)
            with amp:
                total += model(x[0], y[0])[1].float()
        losses[name] = total.item() / config.eval_iters
    model.train()
    return losses if len(stop) == signals else None


def evaluate(model, splits, config, amp, device, stop, iter_num, dtype, loss_sum):
    """estimate_loss, checked finite and printed: "eval 310: train loss 5.1616, val loss 4.8528, val
    perplexity 128.10"; "eval 310: stopped" (None, the train loss since the last log checked) when
    a stop signal cut it short."""
    losses = estimate_loss(model, splits, config, amp, device, stop)
    check_finite(losses or {"train": loss_sum.item()}, iter_num, config, dtype)
    if losses is None:
        print(f"eval {iter_num}: stopped", flush=True)
        return None
    perplexity = math.exp(losses["val"]) if losses["val"] < 700 else math.inf
    print(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
          f"val perplexity {perplexity:.2f}", flush=True)
    return losses


def check_finite(losses, iter_num, config, ptdtype):
    """Stop a run whose loss is no longer a number, before it saves: its checkpoint stays good."""
    for name, loss in losses.items():
        if not math.isfinite(loss):
            muon = " and --muon_learning_rate" if config.optimizer == "muon" else ""
            fp16 = ", use --dtype=bfloat16 or float32" if ptdtype == torch.float16 else ""
            raise UserError(f"{name} loss is {loss} at iteration {iter_num}: training diverged; lower "
                            f"--learning_rate{muon}{fp16}, and resume from the last checkpoint")


def stop_on_signals():
    """Ctrl-C, or SIGTERM (what SLURM, Kubernetes and spot instances send before they kill a job),
    sets the flag returned: the loop finishes its step (or evaluation), saves and exits 128 + the
    signal; --init_from=resume goes on from there. A second signal stops at once."""
    requested = []

    def request_stop(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"\nstopping ({signal.Signals(signum).name}): saving a checkpoint after this step "
              f"(Ctrl-C again to quit without saving)", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return requested


def compile_training(raw_model, optimizer, config, splits, amp, device):
    """The model and Muon's Newton-Schulz compiled now, where a failure falls back to eager."""
    def compile_step(compiled):  # one forward and backward pass: it compiles (or fails) now
        _, x, y = get_batch(splits["train"], torch.Generator().manual_seed(0), 1, config, device)
        with amp:
            compiled(x[0], y[0])[1].backward()

    model = compile_or_eager(raw_model, compile_step)
    optimizer.zero_grad(set_to_none=True)  # the warm-up's gradients
    if config.optimizer == "muon":  # one graph per stack of same-shape matrices
        muon = optimizer.optimizers[0]
        muon.orthogonalize = compile_or_eager(orthogonalize, muon.warm_up, dynamic=False)
    return model


def training_module(raw_model, optimizer, config, splits, amp, device, ddp):
    """(the module the loop calls, compiled or not): raw_model compiled where config.compile says
    (auto: on CUDA), then wrapped in DDP when several processes train it."""
    device_type = device.split(":")[0]
    use_compile = config.compile == "True" or (config.compile == "auto" and device_type == "cuda")
    model = raw_model
    if use_compile:
        model = compile_training(raw_model, optimizer, config, splits, amp, device)
    if ddp:
        local_gpu = [int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None
        model = DDP(model, device_ids=local_gpu)
    return model, use_compile


def start_logging(config, raw_model, device, dtype, use_compile, world_size, master, log_rows,
                  iter_num):
    """The run's settings printed, wandb started (wandb_log); returns its TrainingLog."""
    wandb, micro_steps = None, config.gradient_accumulation_steps
    if master:
        print("config:", json.dumps(asdict(config)))
        print(f"parameters: {raw_model.num_params(non_embedding=False) / 1e6:.2f}M "
              f"({raw_model.num_params() / 1e6:.2f}M without the position table)")
        print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, compile {use_compile}, "
              f"processes {world_size}; tokens per iteration: {micro_steps} micro-steps x "
              f"{config.batch_size} x {config.block_size} = "
              f"{micro_steps * config.batch_size * config.block_size:,}")
        if config.wandb_log:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True needs wandb: pip install wandb, or --wandb_log=False")
            wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=asdict(config))
    device_peak_flops = config.peak_flops or peak_flops(device)
    if master and config.lr_decay_iters > config.max_iters:
        print(f"note: lr_decay_iters={config.lr_decay_iters} is past max_iters={config.max_iters}: "
              f"the learning rate ends above min_lr (set both alike to decay it fully)")
    if master and device.startswith("cuda") and not device_peak_flops:
        name = torch.cuda.get_device_name(device)
        print(f"MFU: set --peak_flops (the dense bf16 FLOP/s of {name}) to see it")
    return TrainingLog(config, raw_model, device_peak_flops, master, log_rows, wandb, iter_num)


class TrainingLog:
    """log(row) adds a row to the run's log and wandb's; log.step(...) after each step writes a
    line every log_interval steps, with the loss: "iter 50/620: loss 7.1424, lr 1.99e-03, 681.0
    ms/iter, 3,007 tok/s, eta 6m28s", and between them the pace alone, every ~10 s. Only the master
    process keeps rows and prints."""

    def __init__(self, config, raw_model, peak_flops, master, rows, wandb, iter_num):
        self.config, self.raw_model, self.peak_flops = config, raw_model, peak_flops
        self.master, self.rows, self.wandb = master, rows, wandb
        # the steps' time since the last line with the loss (evaluations and saves left out)
        self.last_iter, self.seconds = iter_num, 0.0
        self.tokens = config.gradient_accumulation_steps * config.batch_size * config.block_size

    def __call__(self, row):
        if self.master:
            self.rows.append(row)
            if self.wandb is not None:
                self.wandb.log(row, step=row["iter"])

    def step(self, iter_num, step_start, lr, loss_sum, ddp, ptdtype):
        """After step iter_num, begun at step_start: the loss is read from the device only on a
        logged step (the steps between queue up without waiting); that wait counts in its time."""
        config, steps = self.config, iter_num - self.last_iter
        logged = iter_num % config.log_interval == 0 or iter_num == config.max_iters
        train_loss = read_loss(loss_sum, steps, ddp) if logged else None
        took = time.time() - step_start
        self.seconds += took
        dt = self.seconds / steps
        pace = f"{dt * 1000:.1f} ms/iter"
        line = pace if self.seconds // 10 > (self.seconds - took) // 10 else None
        if logged:
            check_finite({"train": train_loss}, iter_num, config, ptdtype)
            tokens_per_sec = self.tokens / dt
            mfu = self.peak_flops and estimate_mfu(self.raw_model, tokens_per_sec, self.peak_flops)
            line = (f"loss {train_loss:.4f}, lr {lr:.2e}, {pace}, {tokens_per_sec:,.0f} tok/s"
                    + (f", MFU {mfu * 100:.1f}%" if mfu else ""))
            self({"iter": iter_num, "train_loss": train_loss, "lr": lr, "ms_per_iter": dt * 1000,
                  "tokens_per_sec": tokens_per_sec, **({"mfu": mfu} if mfu else {})})
            self.last_iter, self.seconds = iter_num, 0.0
        if self.master and line:
            print(f"iter {iter_num}/{config.max_iters}: {line}, "
                  f"eta {duration((config.max_iters - iter_num) * dt)}", flush=True)


def train_step(model, optimizer, scaler, x, y, loss_sum, config, amp, ddp):
    """One optimizer step on the micro-batches x, y (micro_steps, batch_size, block_size), their
    gradients summed as one big batch's; their loss goes into loss_sum (on the device: no wait)."""
    micro_steps = len(x)
    for micro in range(micro_steps):
        # DDP averages gradients across processes on backward; only the last micro-step needs to
        sync = contextlib.nullcontext() if not ddp or micro == micro_steps - 1 else model.no_sync()
        with sync:
            with amp:
                _, loss = model(x[micro], y[micro])
            loss = loss / micro_steps  # the mean over micro-steps: the loss of one big batch
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def read_loss(loss_sum, steps, ddp):
    """The mean loss of the last `steps` steps, all processes', read from the device (a wait)."""
    if ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    loss = loss_sum.item() / steps
    loss_sum.zero_()
    return loss


def main():
    config, state, notices = resume_run(parse_config(TrainConfig))
    ddp, rank, world_size, device = start_processes(config.device)
    master = rank == 0  # only one process logs and writes checkpoints
    if master and notices:
        print("\n".join(notices))
    iter_num, best_val_loss, log_rows = state["iter_num"], state["best_val_loss"], state["log_rows"]
    if iter_num == config.max_iters:  # a finished run: nothing to do
        return

    ptdtype, amp, scaler = training_precision(config.dtype, device)
    torch.manual_seed(config.seed)

    # data: every process draws the same global batch and keeps its own rows of it
    meta, tokenizer, splits = load_training_data(config.data_dir, config.block_size)
    my_rows = batch_rows(config.gradient_accumulation_steps, rank, world_size)
    train_gen = torch.Generator().manual_seed(config.seed)

    # the model (raw_model: the plain module), its optimizer, the weights' average (ema_decay)
    raw_model, optimizer = build_model(config, meta["vocab_size"], state, device)
    averaged = Average(raw_model, config.ema_decay) if config.ema_decay > 0 else None
    model, use_compile = training_module(raw_model, optimizer, config, splits, amp, device, ddp)
    resumed = config.init_from == "resume"
    if resumed:  # loaded last: set-up work (compile warm-up) cannot shift the random streams
        restore_training(state, raw_model, optimizer, scaler, train_gen, config.out_dir, averaged)

    log = start_logging(config, raw_model, device, ptdtype, use_compile, world_size, master, log_rows,
                        iter_num)

    # the training loop; one run per out_dir at a time: a second is refused, naming this one's PID
    stop_requested = stop_on_signals()
    start_iter, run_start = iter_num, time.time()
    ours = resumed  # out_dir holds this run's checkpoint: its log may go on without a new one
    loss_sum = torch.zeros((), device=device)
    data_state, x, y = get_batch(splits["train"], train_gen, config.gradient_accumulation_steps,
                                 config, device, my_rows)
    with folder_lock(config.out_dir) if master else contextlib.nullcontext():
        while True:
            lr = get_lr(iter_num, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups: their own multiple

            # evaluate and save: every eval_interval steps, at the end, and when asked to stop (a
            # resumed run starts where its checkpoint's evaluation was logged)
            at_eval = iter_num % config.eval_interval == 0 or iter_num == config.max_iters or stop_requested
            if master and at_eval and (iter_num > start_iter or not resumed):
                losses = evaluate(averaged.model if averaged else model, splits, config, amp, device,
                                  stop_requested, iter_num, ptdtype, loss_sum)
                improved = losses is not None and losses["val"] < best_val_loss
                if losses is not None:  # (stopped during it: saved without it, as a stop is)
                    best_val_loss = min(best_val_loss, losses["val"])
                    log({"iter": iter_num, "train_loss_eval": losses["train"], "val_loss": losses["val"], "lr": lr})
                keep = improved or config.always_save_checkpoint  # else only the log moves on
                if iter_num > start_iter and (keep or ours):
                    # the data stream as it was before the batch drawn ahead: a resumed run draws it
                    data = torch.Generator().set_state(data_state)
                    checkpoint = training_checkpoint(raw_model, optimizer, scaler, data, averaged,
                                                     iter_num=iter_num, best_val_loss=best_val_loss)
                    save_run(config.out_dir, log_rows, asdict(config), meta, tokenizer, checkpoint if keep else None)
                    ours = True
            if iter_num >= config.max_iters or stop_requested:
                break

            step_start = time.time()
            train_step(model, optimizer, scaler, x, y, loss_sum, config, amp, ddp)
            # the next step's batch, drawn while the device works on this one
            data_state, x, y = get_batch(splits["train"], train_gen, config.gradient_accumulation_steps,
                                         config, device, my_rows)
            iter_num += 1
            if averaged:
                averaged.update(raw_model, iter_num)

            # every log_interval steps a line with the loss; between them the pace, every ~10 s
            log.step(iter_num, step_start, lr, loss_sum, ddp, ptdtype)

        if master:
            print(f"done: {iter_num} iterations in {time.time() - run_start:.0f}s, best val loss {best_val_loss:.4f}")
    end_processes(ddp)
    if stop_requested:  # saved; a script that ran this (run.sh) stops too: 130 for Ctrl-C
        sys.exit(128 + stop_requested[0])


if __name__ == "__main__":
    run_main(main)
