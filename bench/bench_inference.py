"""
Inference speed (no cache, KV cache, int8, compiled decoding, cold and warm) and the perplexity int8 costs, as
markdown tables.

    python bench/bench_inference.py                                  # speed: wikitext_small's model
    python bench/bench_inference.py --model=out-wikitext-tiny      # + perplexity float32 vs int8 on its val split
    python bench/bench_inference.py --config=tiny --repeats=5        # config/wikitext_tiny.py's
    python bench/bench_inference.py --config=config/gpt2_124m.py     # any train.py config file's
    python bench/bench_inference.py --devices=cuda                   # the GPU rows only
    python bench/bench_inference.py --devices=cuda --modes=max-autotune --tokens_per_call=1,4 \
        --attention=sdpa,written                                     # + compiled variants to A/B

Speed: tokens per second generating new_tokens tokens after a prompt_tokens-token prompt, greedy, one sequence, on
the CPU (float32, int8) and on a GPU if there is one (bfloat16). Speed does not depend on the weights' values, so a
randomly initialised model stands in for a trained one: nothing is trained here. It is the model
that train.py builds from the config file (its shape and its recipe: position encoding, head tying,
biases, activation, QK-norm...), so what is timed is what ships. The warm
variants run after a warm-up, interleaved, `repeats` times each (the slow no-cache baseline once), and each keeps
its best run: the one least disturbed by other work on the machine. A cold variant is the first generation in a
fresh process, after loading (and compiling), as sample.py's first sample: what one-off costs add to it.
With --sampled, sample.py's loop is timed too: generate.generate_ids (reading the tokens back a
few at a time on a GPU), sampling at temperature 0.8 among the top 200, seeded, its step compiled
for that setting.

The compiled variants to A/B on a GPU, each a warm row: --modes (torch.compile modes besides
reduce-overhead: max-autotune), --tokens_per_call (tokens decoded per call of the compiled step,
one CUDA graph replay each), --attention (sdpa: PyTorch's fused kernel; written: the maths written
out, for the compiler to fuse).

Ops per token: the profiler over a few tokens of generation after the prompt (the decode step,
sampling and the bookkeeping around them, as generate_tokens runs them), divided by the tokens: the
aten ops dispatched from Python (or from a compiled step: the ones it did not fuse away), and on a
GPU the kernels run and the launches the host made (kernel launches, CUDA graph replays, copies).
On a GPU, launches rather than bandwidth bound a small model's decoding.

Perplexity needs a trained checkpoint (--model): its split in float32, then with int8 weights, on the first
eval_tokens tokens. Without --model that table is skipped.
"""

import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: import the repo's modules by name

import torch  # noqa: E402

from cli import UserError, parse_config, run_main  # noqa: E402
from evaluate import evaluate_split  # noqa: E402
from generate import generate_ids  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantize import quantize_int8  # noqa: E402
from runtime import compile_decoding, load_for_inference  # noqa: E402
from train import TrainConfig  # noqa: E402

# the settings a config file can give the model; the rest (dropout) only matter in training
RECIPE = ("position", "tie_embeddings", "bias", "activation", "qk_norm", "logit_softcap")
# what the host does to start work on a GPU: a kernel, a CUDA graph's replay, a copy or a fill
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync",
            "cudaMemsetAsync")


@dataclass
class BenchInferenceConfig:
    model: str = ""             # a trained checkpoint: adds the perplexity table (none: speed only)
    config: str = "small"       # a config file, small, tiny (config/wikitext_*.py) or checkpoint
    vocab_size: int = 8192      # of the random model (prepare.py's default tokenizer size)
    new_tokens: int = 512       # tokens generated per timed run
    prompt_tokens: int = 16     # random prompt tokens before them
    repeats: int = 3            # interleaved runs per variant; the best counts
    split: str = "val"          # of the checkpoint's data, for the perplexity table
    eval_tokens: int = 50_000   # tokens of the split to score twice (0: all of it)
    threads: int = 0            # torch CPU threads; 0: torch's default
    devices: str = "cpu,cuda"   # which rows: cpu, cuda (left out without a GPU), or both
    compile: bool = True        # also time the decode step compiled (with CUDA graphs on a GPU)
    ops: bool = True            # also count the ops (on a GPU: kernels) per decoded token
    cold: bool = True           # also time the first generation in a fresh process
    sampled: bool = True        # also time sample.py's loop (generate_ids, sampling)
    modes: str = ""             # compiled variants: torch.compile modes (max-autotune)
    tokens_per_call: str = "1"  # compiled variants: tokens per call of the step (1,4: both)
    attention: str = "sdpa"     # compiled variants: sdpa, written (the maths written out), both
    child: str = ""             # internal: "device:compile" times one cold generation and prints it as JSON

# sample.py's defaults, for the sampled rows
SAMPLING = dict(temperature=0.8, top_k=200)


def model_config(path, vocab_size):
    """The GPTConfig that `train.py path` builds (its defaults, then the file), with vocab_size:
    what ships. config/wikitext_small.py -> GPTConfig(hidden_size=512, ..., position="rope",
    tie_embeddings=False, bias=False)"""
    if not os.path.isfile(path):
        raise UserError(f"no config file {path}: give --config=small, tiny, checkpoint or a "
                        f"train.py config file")
    settings = parse_config(TrainConfig, [path])
    names = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
    return GPTConfig(vocab_size=vocab_size, **{name: getattr(settings, name) for name in names})


def bench_model(config):
    """The model to time, and a line describing it."""
    if config.config == "checkpoint":
        if not config.model:
            raise UserError("--config=checkpoint needs --model")
        model, _, _ = load_for_inference(config.model, "cpu", "float32")
        where = config.model
    else:
        named = config.config in ("small", "tiny")
        path = config.config
        if named:
            path = os.path.join(ROOT, "config", f"wikitext_{config.config}.py")
        torch.manual_seed(0)
        model = GPT(model_config(path, config.vocab_size)).eval()
        where = f"{os.path.relpath(path, ROOT) if named else path}, random weights"
    c = model.config
    recipe = ", ".join(f"{name}={getattr(c, name)}" for name in RECIPE)
    return model, (f"{c.num_hidden_layers} layers x {c.hidden_size}, {c.num_attention_heads} heads, context "
                   f"{c.block_size}, vocab {c.vocab_size}, {recipe}: "
                   f"{model.num_params(non_embedding=False) / 1e6:.1f}M parameters ({where})")


def tokens_per_second(model, prompt, new_tokens, use_cache, sampled=False):
    """One generation of new_tokens tokens, timed: greedy through generate_tokens, or (sampled)
    sampling as sample.py does, through generate_ids."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if sampled:
        steps = generate_ids(model, prompt[0].tolist(), new_tokens, seed=0, **SAMPLING)
    else:
        steps = model.generate_tokens(prompt, new_tokens, temperature=0, use_cache=use_cache)
    for _ in steps:
        pass
    sync()
    return new_tokens / (time.perf_counter() - t0)


def prepared(model, device, compile, sampled=False, written=False, **options):
    """A copy of the model for `device` (bfloat16 on a GPU, float32 on the CPU), its decode step
    compiled if asked (options: compile_decoding's mode, tokens_per_call), for greedy decoding or
    (sampled) SAMPLING; written: attention with the maths written out."""
    model = copy.deepcopy(model).to(device, torch.bfloat16 if device == "cuda" else torch.float32)
    model.set_flash(not written)
    if compile:
        compile_decoding(model, device, **options, **(SAMPLING if sampled else {}))
    return model


def compiled_variants(config):
    """(name suffix, prepared's options) of each compiled variant to time: the default, then one
    per A/B choice."""
    variants = [("", {})]
    variants += [(f", mode={mode}", {"mode": mode}) for mode in config.modes.split(",") if mode]
    for n in (int(n) for n in config.tokens_per_call.split(",") if n and int(n) != 1):
        variants.append((f", {n} tokens per call", {"tokens_per_call": n}))
    if "written" in config.attention.split(","):
        variants.append((", attention written out", {"written": True}))
    return variants


def cold_speed(device, compile):
    """tokens/s of the first generation in a fresh process: this script again, with --child."""
    args = [arg for arg in sys.argv[1:] if not arg.startswith(("--child=", "--devices="))]
    run = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--child={device}:{compile}"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise UserError(f"the cold run on {device} failed: {run.stderr.strip()[-500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])["tokens_per_second"]


def cold_child(config, model):
    """--child=device:compile: prepare the model (compiling if asked), time one greedy generation,
    print it as JSON."""
    device, compile = config.child.split(":")
    model = prepared(model, device, compile == "True")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (1, config.prompt_tokens), generator=g)
    print(json.dumps({"tokens_per_second": tokens_per_second(model, prompt.to(device), config.new_tokens, True)}))


def variants_to_time(config, model, devices):
    """{variant name: (model, use_cache, sampled)}: the copies of model that the warm rows time."""
    variants = {}
    if "cpu" in devices:
        variants["cpu, no cache, float32"] = (model, False, False)
        variants["cpu, KV cache, float32"] = (model, True, False)
        blocks_only = quantize_int8_blocks(model)
        variants["cpu, KV cache, int8 except the output head"] = (blocks_only, True, False)
        variants["cpu, KV cache, int8"] = (quantize_int8(copy.deepcopy(model)), True, False)
    if "cuda" in devices:
        gpu = prepared(model, "cuda", False)
        variants["cuda, no cache, bfloat16"] = (gpu, False, False)
        variants["cuda, KV cache, bfloat16"] = (gpu, True, False)
    for device in devices:
        eager = f"{device}, KV cache, {'bfloat16' if device == 'cuda' else 'float32'}"
        graphs = " (CUDA graphs)" if device == "cuda" else ""
        compiled = f"{eager}, compiled decode{graphs}"
        for suffix, options in compiled_variants(config) if config.compile else []:
            variants[compiled + suffix] = (prepared(model, device, True, **options), True, False)
        if config.sampled:  # sample.py's loop
            variants[eager + ", sampled (sample.py's loop)"] = (variants[eager][0], True, True)
        if config.sampled and config.compile:
            sampled = prepared(model, device, True, sampled=True)
            variants[compiled + ", sampled (sample.py's loop)"] = (sampled, True, True)
    return variants


def speed_table(config, variants, prompt, devices):
    """{variant: best tokens/s}: warm variants over interleaved repeats, then the cold ones."""
    best = {name: 0.0 for name in variants}
    for name, (m, cache, sampled) in variants.items():  # warm-up: allocations, kernels, caches
        tokens_per_second(m, prompt.to(m.token_emb.weight.device), 8, cache, sampled)
    for r in range(config.repeats):
        for name, (m, cache, sampled) in variants.items():
            if not cache and r > 0:
                continue  # the slow baseline: one long run is steady enough, and repeating it costs minutes
            on_device = prompt.to(m.token_emb.weight.device)
            speed = tokens_per_second(m, on_device, config.new_tokens, cache, sampled)
            best[name] = max(best[name], speed)
            print(f"  run {r + 1}/{config.repeats} {name}: {speed:.1f} tokens/s", file=sys.stderr, flush=True)
    for device in devices if config.cold else []:
        dtype_name = "bfloat16" if device == "cuda" else "float32"
        best[f"{device}, KV cache, {dtype_name}, first sample in a fresh process"] = cold_speed(device, False)
        if config.compile:
            best[f"{device}, KV cache, {dtype_name}, compiled decode, first sample in a fresh process"] = \
                cold_speed(device, True)
    return best


def ops_per_token(model, prompt, sampled=False, tokens=8):
    """What one decoded token dispatches: the profiler over `tokens` tokens of generate_tokens after
    its prefill (the decode step, sampling, the bookkeeping between them), per token; greedy, or
    (sampled) with SAMPLING, seeded.
    {"aten ops": the ops dispatched from Python or from a compiled step, not those they call in
    turn}, and on a GPU also "GPU kernels" (run), "GPU copies" and "host launches" (the kernel
    launches, CUDA graph replays and copies the host asked for)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = prompt.is_cuda
    seeded = torch.Generator(prompt.device).manual_seed(0)
    sampling = dict(SAMPLING, generator=seeded) if sampled else dict(temperature=0)
    steps = model.generate_tokens(prompt, tokens + 1, **sampling)
    # the prompt's prefill and the first token: once per generation, not per token
    next(steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        for _ in steps:
            pass
        if on_gpu:
            torch.cuda.synchronize()
    events = profiler.events()
    host = [e for e in events if e.device_type == DeviceType.CPU]
    counts = {"aten ops": sum(1 for e in host if is_outermost_aten_op(e))}
    if on_gpu:
        gpu = [e for e in events if e.device_type == DeviceType.CUDA]
        counts["GPU kernels"] = sum(1 for e in gpu if not e.name.startswith(("Memcpy", "Memset")))
        counts["GPU copies"] = len(gpu) - counts["GPU kernels"]
        counts["host launches"] = sum(1 for e in host if e.name.startswith(LAUNCHES))
    return {name: count / tokens for name, count in counts.items()}


def is_outermost_aten_op(event):
    """An aten op that no other aten op called: aten::linear counts, not the aten::addmm in it."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def print_ops_table(variants, prompt):
    """Per decoded token, for every variant with a KV cache: what ops_per_token counts."""
    counted = {name: ops_per_token(m, prompt.to(m.token_emb.weight.device), sampled)
               for name, (m, cache, sampled) in variants.items() if cache}
    columns = list(dict.fromkeys(column for counts in counted.values() for column in counts))
    print("\nops per decoded token (profiler, 8 tokens after the prompt; greedy unless sampled):\n")
    print("| variant | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, counts in counted.items():
        cells = (f"{counts[c]:.1f}" if c in counts else "-" for c in columns)
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_greedy_agreement(variants, prompt, new_tokens):
    """Whether each compiled variant's greedy tokens are its device's eager KV cache's."""
    def greedy(m):
        steps = m.generate_tokens(prompt.to(m.token_emb.weight.device), new_tokens, temperature=0)
        return torch.cat(list(steps)).tolist()

    print(f"\ngreedy tokens ({new_tokens}) of each compiled variant vs its device's eager ones:")
    for name, (m, _, sampled) in variants.items():
        if "compiled decode" in name and not sampled:
            eager = greedy(variants[name.split(", compiled decode")[0]][0])
            mine = greedy(m)
            first = next((i for i, (a, b) in enumerate(zip(eager, mine)) if a != b), None)
            where = "identical" if first is None else f"first differs at token {first}"
            print(f"  {name}: {where}")


def quantize_int8_blocks(model):
    """int8 for the transformer blocks only: shows what quantizing the output head adds."""
    model = copy.deepcopy(model)
    quantize_int8(model.blocks)
    return model


def perplexity_table(config):
    """(float32 result, int8 result) of evaluate_split on the checkpoint's split."""
    model, tokenizer, checkpoint = load_for_inference(config.model, "cpu", "float32")
    data_dir = checkpoint.get("train_config", {}).get("data_dir")
    if not data_dir:
        raise UserError(f"{config.model} does not name its data_dir")
    kw = dict(max_tokens=config.eval_tokens, progress=False)
    fp32 = evaluate_split(model, tokenizer, data_dir, config.split, **kw)
    int8 = evaluate_split(quantize_int8(model), tokenizer, data_dir, config.split, **kw)
    return data_dir, fp32, int8


def machine_line():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
            f"{gpu}{load}")


def main():
    config = parse_config(BenchInferenceConfig, renamed={"shape": "config"})
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.new_tokens < 1 or config.prompt_tokens < 1 or config.repeats < 1:
        raise UserError("--new_tokens, --prompt_tokens and --repeats must be at least 1")
    model, description = bench_model(config)
    if config.child:
        return cold_child(config, model)
    devices = [d for d in config.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    print(f"machine: {machine_line()}")
    print(f"model: {description}")
    print(f"generating {config.new_tokens} tokens after a {config.prompt_tokens}-token prompt, greedy, batch 1, "
          f"best of {config.repeats} (no cache: one run)", flush=True)
    variants = variants_to_time(config, model, devices)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (1, config.prompt_tokens), generator=g)
    best = speed_table(config, variants, prompt, devices)
    for device in devices:
        dtype_name = "bfloat16" if device == "cuda" else "float32"
        base, cached = best[f"{device}, no cache, {dtype_name}"], best[f"{device}, KV cache, {dtype_name}"]
        print(f"\n| {device}: variant | tokens/s | vs no cache | vs KV cache {dtype_name} |")
        print("| --- | ---: | ---: | ---: |")
        for name, speed in best.items():
            if name.startswith(device + ","):
                print(f"| {name.removeprefix(device + ', ')} | {speed:,.1f} | {speed / base:.2f}x | "
                      f"{speed / cached:.2f}x |")
    if "cpu" in devices:
        base, cached, int8 = (best[f"cpu, {v}"] for v in ("no cache, float32", "KV cache, float32", "KV cache, int8"))
        print(f"\ngoals: KV cache >= 5x no cache: {cached / base:.2f}x ({'met' if cached >= 5 * base else 'NOT met'}); "
              f"int8 >= 1.5x float32: {int8 / cached:.2f}x ({'met' if int8 >= 1.5 * cached else 'NOT met'})")
    if "cuda" in devices and config.compile and config.cold:
        warm = best["cuda, KV cache, bfloat16, compiled decode (CUDA graphs)"]
        cold = best["cuda, KV cache, bfloat16, compiled decode, first sample in a fresh process"]
        print(f"goals (GPU): warm >= 5,000 tokens/s: {warm:,.0f} "
              f"({'met' if warm >= 5000 else 'NOT met'}); first sample >= 0.5x warm: "
              f"{cold / warm:.2f}x ({'met' if cold >= 0.5 * warm else 'NOT met'})")
    if "cuda" in devices and config.compile and config.sampled:
        graphs = "cuda, KV cache, bfloat16, compiled decode (CUDA graphs)"
        warm, loop = best[graphs], best[graphs + ", sampled (sample.py's loop)"]
        print(f"goal (GPU): sample.py's loop >= 0.8x the bench's: {loop / warm:.2f}x "
              f"({'met' if loop >= 0.8 * warm else 'NOT met'})")
    print_greedy_agreement(variants, prompt, config.new_tokens)
    if config.ops:
        print_ops_table(variants, prompt)

    if not config.model:
        print("\nperplexity: skipped (no --model: give a trained checkpoint to measure what int8 costs)")
        return
    data_dir, fp32, q = perplexity_table(config)
    change = q["perplexity"] / fp32["perplexity"] - 1
    print(f"\nperplexity of {config.model} on {data_dir} {config.split}, {fp32['tokens']:,} tokens scored:\n")
    print("| weights | perplexity | bits per byte | change |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| float32 | {fp32['perplexity']:.3f} | {fp32['bits_per_byte']:.4f} | |")
    print(f"| int8 | {q['perplexity']:.3f} | {q['bits_per_byte']:.4f} | {change * 100:+.2f}% |")
    print(f"\ngoal: int8 perplexity <= +2%: {'met' if change <= 0.02 else 'NOT met'}")


if __name__ == "__main__":
    run_main(main)
