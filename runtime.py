"""
Where and how the maths runs, decided one way for every script: the device (and torchrun's processes), the dtype,
autocast, torch.compile with a fallback, the peak FLOP/s of known GPUs and MFU, memory (reuse on CPUs, a training
step checked against what is free), and a model loaded ready for inference.

The dtype rule (train, evaluate, sample, fine-tuning and serve all call `pick_dtype`): 'auto' is bfloat16 where the
hardware computes in it (GPUs from Ampere on, CPUs with AVX512-BF16 or AMX), else float16 on a GPU and float32
elsewhere. Training and fine-tuning keep float32 weights and run the maths under `autocast`; inference stores the
weights in that dtype:

    model, tokenizer, checkpoint = load_for_inference("out-wikitext-tiny", device="auto", dtype="auto", quantize="none")
"""

import contextlib
import ctypes
import functools
import os
import re
import sys

import torch

from checkpoint import load_model
from cli import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device="auto"):
    """'auto' picks cuda, then mps (Apple), then cpu; cpu, cuda, cuda:N and mps are used as given, if present."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device}, but torch sees no CUDA GPU here: use --device=cpu (or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device={device}, but there are {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps, but there is no Apple GPU here: use --device=cpu (or auto)")
    return device


@functools.cache
def start_processes(device="auto"):
    """(ddp, rank, world_size, device) of a training process: alone, or one of torchrun's (it sets
    RANK, WORLD_SIZE and LOCAL_RANK), each on a GPU of its own, in one process group."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(device)
    if ddp and device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if ddp:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ddp, rank, world_size, device


def end_processes(ddp):
    """start_processes' other end: the process group taken down once every process is past its
    last checkpoint write (none tears it down while another still writes)."""
    if ddp:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def cpu_flags():
    """The CPU's feature flags on Linux ({'avx2', 'avx512_bf16', ...}); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def has_fast_bf16(device_type):
    """True where bfloat16 matmuls run in hardware: GPUs from Ampere on, CPUs with AVX512-BF16 or AMX (Linux)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":  # without these instructions bf16 is emulated on the CPU, slower than fp32
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def pick_dtype(dtype, device):
    """The torch dtype for a --dtype setting (auto | float32 | bfloat16 | float16) on `device` ('cuda:1' is fine).

        pick_dtype("auto", "cuda") -> torch.bfloat16 on an A100, torch.float16 on a V100
        pick_dtype("auto", "cpu")  -> torch.bfloat16 with AVX512-BF16 or AMX, else torch.float32
    """
    device_type = device.split(":")[0]
    if dtype == "auto":
        if has_fast_bf16(device_type):
            return torch.bfloat16
        return torch.float16 if device_type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16: use --dtype=float16 or --dtype=float32")
    return DTYPES[dtype]


def autocast(device, dtype):
    """Matmuls in `dtype` while weights and reductions stay float32; nothing to do for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def training_precision(dtype, device):
    """(dtype, its autocast, the loss scaler): matmuls in low precision (auto: bf16 where the
    hardware has it, on CPUs too), weights and reductions in fp32; fp16 gradients underflow unless
    scaled. TF32 for fp32 matmuls on CUDA; on a CPU, freed memory kept for the next step."""
    dtype, device_type = pick_dtype(dtype, device), device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_memory()  # activations reuse the last step's memory: 10-15% of a CPU step
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    return dtype, autocast(device, dtype), scaler


def compile_or_eager(fn, warm_up, **options):
    """torch.compile(fn, **options), compiled at once by warm_up(compiled fn) so that a failure shows here, where
    it can fall back: then one warning, and fn itself is returned."""
    compiled = torch.compile(fn, **options)
    try:
        warm_up(compiled)
        return compiled
    except Exception as e:
        print(f"warning: torch.compile failed ({str(e).splitlines()[0][:120]}); running eagerly", file=sys.stderr)
        return fn


# Dense bfloat16 tensor-core peaks (float32 accumulation, no sparsity) from NVIDIA's data sheets and whitepapers, in
# FLOP/s. The first pattern found in torch.cuda.get_device_name() counts: "NVIDIA H100 80GB HBM3" is the SXM card.
PEAK_FLOPS = ((r"H100.*PCIe", 756e12), (r"H100", 989e12), (r"H200", 989e12), (r"A100", 312e12), (r"\bL4\b", 121e12),
              (r"\bA10\b", 125e12), (r"4090", 165e12), (r"3090", 71e12))


def peak_flops(device):
    """The peak FLOP/s of a known GPU, for MFU; 0.0 for anything else.

        peak_flops("cuda") -> 756e12 on "NVIDIA H100 PCIe", 0.0 on "NVIDIA A10G" (not in the table) or "cpu"
    """
    if not device.startswith("cuda"):
        return 0.0
    return gpu_peak_flops(torch.cuda.get_device_name(device))


def gpu_peak_flops(name):
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), 0.0)


def estimate_mfu(model, tokens_per_second, peak_flops):
    """Model FLOPs utilisation: the share of the device's peak that training's useful maths takes,
    6 FLOPs per parameter and token (forward and backward) plus attention's 12 x layers x hidden x
    context (PaLM, appendix B)."""
    c = model.config
    flops_per_token = 6 * model.num_params() + 12 * c.num_hidden_layers * c.hidden_size * c.block_size
    return flops_per_token * tokens_per_second / peak_flops


def keep_freed_memory():
    """Keep the memory of freed tensors in the process for the next ones, instead of handing it back to the OS (Linux
    with glibc; elsewhere nothing happens), as jemalloc or tcmalloc would. A training step frees and reallocates its
    activations; glibc maps each large block afresh, and the kernel hands it out zeroed, page by page: ~70k page
    faults a step at the tiny shape, 10–15% of a CPU step. The price: the process keeps its free blocks, ~20% more
    peak memory there (docs/RESULTS.md)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # no block gets its own mapping: all come from the heap, and go back to it
    mallopt(M_TRIM_THRESHOLD, 2**30)  # the heap keeps up to 1 GiB of free memory at its top


# ----------------------------------------------------------------------------- will it fit?

def free_memory(device):
    """Bytes a new allocation can still take on device: the GPU's free memory, or on Linux the RAM the kernel counts
    as available plus free swap; None where that is unknown (mps, other systems)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            kib = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[1:2] != []}
        return (kib["MemAvailable"] + kib.get("SwapFree", 0)) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_training_fits(model_config, batch_size, block_size, optimizer_states, device):
    """Refuse in one line, before allocating, a training step that needs more memory than device has free. A lower
    bound: float32 weights, gradients and optimizer_states values per parameter (AdamW keeps 2), and what backward
    keeps per token: ~34 bytes per hidden unit per layer in 16-bit with fused attention (Korthikanti et al. 2022)
    and the float32 logits with their gradient. wikitext_tiny (7.3M parameters, Muon: 1 state, batch 16 x 128):
    0.09 GB of weights and state, 0.21 GB of activations."""
    c = model_config
    weights = c.num_params() * 4 * (2 + optimizer_states)
    activations = batch_size * block_size * (34 * c.hidden_size * c.num_hidden_layers + 8 * c.vocab_size)
    free = free_memory(device)
    if free is not None and weights + activations > free:
        raise UserError(f"training {c.num_params() / 1e6:,.1f}M parameters ({weights / 1e9:,.1f} GB with gradients "
                        f"and optimizer state) at batch_size={batch_size} x block_size={block_size} "
                        f"({activations / 1e9:,.1f} GB of activations) needs at least "
                        f"{(weights + activations) / 1e9:,.1f} GB of memory and {device} has {free / 1e9:,.1f} GB "
                        f"free: lower --batch_size (raising --gradient_accumulation_steps keeps the batch), or the "
                        f"model's size")


# ----------------------------------------------------------------------------- a model ready for inference

def load_for_inference(name_or_dir, device="auto", dtype="auto", quantize="none", compile=False):
    """(model, tokenizer, checkpoint dict) ready to generate or score: on `device`, weights in `dtype` (the rule of
    pick_dtype), optionally int8 (CPU, float32) and with a compiled decode step."""
    if quantize not in ("none", "int8"):
        raise UserError(f"--quantize must be none or int8, got '{quantize}'")
    device = "cpu" if quantize == "int8" and device == "auto" else pick_device(device)
    ptdtype = pick_dtype("float32" if quantize == "int8" and dtype == "auto" else dtype, device)
    if quantize == "int8" and (device != "cpu" or ptdtype != torch.float32):
        raise UserError("--quantize=int8 runs on the CPU in float32: add --device=cpu --dtype=float32 "
                        "(on a GPU use --dtype=bfloat16 instead)")
    model, tokenizer, checkpoint = load_model(name_or_dir, device)
    model.to(dtype=ptdtype)  # weights in the compute dtype: no autocast needed, and the KV cache follows them
    if quantize == "int8":
        from quantize import quantize_int8  # int8 weights: only when asked for
        quantize_int8(model)
    if compile:
        compile_decoding(model, device)
    return model, tokenizer, checkpoint


def compile_decoding(model, device, mode=None, tokens_per_call=1, **sampling):
    """torch.compile the decode step that generation repeats (GPT.decode_tokens: tokens_per_call
    tokens a call, each sampled inside it); on a GPU with CUDA graphs ("reduce-overhead"), which
    replay the whole step as one launch. mode: another torch.compile mode ("max-autotune"). The
    step reads and writes the model's decoding buffers in place (static_buffers): its shapes never
    change, and a replay copies nothing in. It compiles once per sampling setting: `sampling`
    (generate_tokens' temperature, top_k, top_p, suppress_ids; greedy by default) is the one
    warmed up here. The prompt's prefill runs eagerly. Where compiling fails: a warning, and eager
    decoding."""
    model.tokens_per_call = tokens_per_call
    static_buffers(model)

    def warm_up(decode):
        model.decode_tokens = decode
        prompt = torch.zeros(1, 3, dtype=torch.long, device=device)
        seeded = torch.Generator(device).manual_seed(0)
        settings = {"temperature": 0, **sampling, "generator": seeded}
        # a call of tokens_per_call tokens, then (at the end) of one: both compile here
        for _ in model.generate_tokens(prompt, 2 * tokens_per_call, **settings):
            pass

    mode = mode or ("reduce-overhead" if device.startswith("cuda") else "default")
    model.decode_tokens = compile_or_eager(model.decode_tokens, warm_up, mode=mode, fullgraph=True)


def static_buffers(model):
    """Mark the buffers that decoding reads and writes in place (GPT.setup_kv_cache's: those there
    are, and those it makes for another batch size) as living at fixed addresses: CUDA graphs then
    use them where they are, rather than copy them into their own at every replay (or give up the
    graph for a step that writes them)."""
    from torch._dynamo import mark_static_address
    setup = model.setup_kv_cache

    def mark():
        tables = (model.causal_bias, *model.rotary_table)
        state = (model.tokens, model.pos, model.noise, model.suppress)
        for buffer in (*tables, *state, *(block.attn.kv_cache for block in model.blocks)):
            mark_static_address(buffer)

    def setup_static(batch_size):
        setup(batch_size)
        mark()

    model.setup_kv_cache = setup_static
    if model.blocks[0].attn.kv_cache is not None:
        mark()


def compile_batch_decoding(model, use_rows, batch_sizes):
    """The batching engine's step (GPT.decode_one_token: a token per row, at the row's position)
    compiled for each of batch_sizes, the KV cache's rows that use_rows(0, size) points the model
    at: on a GPU one CUDA graph per size. Compiled, and warmed up, here; where compiling fails: a
    warning, and the eager step."""
    import torch._dynamo
    device = model.token_emb.weight.device
    static_buffers(model)
    limit = torch._dynamo.config.recompile_limit  # a compilation per batch size
    torch._dynamo.config.recompile_limit = max(limit, len(batch_sizes) + 1)

    def warm_up(decode):
        for size in batch_sizes:
            use_rows(0, size)
            for block in model.blocks:  # these rows' view of the cache
                torch._dynamo.mark_static_address(block.attn.kv_cache)
            decode(*torch.zeros(2, size, 1, dtype=torch.long, device=device))  # tokens, positions

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    step = model.decode_one_token
    return compile_or_eager(step, warm_up, mode=mode, fullgraph=True, dynamic=False)
