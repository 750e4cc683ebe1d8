"""runtime.py: one dtype rule over the device / CPU-flag matrix, applied the same way by training, fine-tuning,
inference (evaluate, sample) and serving; torch.compile's fallback."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import runtime
from cli import UserError
from runtime import load_for_inference
from serve import create_app

ROOT = Path(__file__).resolve().parents[1]
BF16_CPU, PLAIN_CPU = frozenset({"avx2", "avx512f", "avx512_bf16"}), frozenset({"avx2", "fma"})


@pytest.fixture
def hardware(monkeypatch):
    """hardware(cpu_flags=..., cuda_bf16=...): pretend to be a machine with these CPU flags and GPU."""

    def pretend(cpu_flags=PLAIN_CPU, cuda_bf16=True):
        monkeypatch.setattr(runtime, "cpu_flags", lambda: cpu_flags)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kw: cuda_bf16)

    return pretend


@pytest.mark.parametrize("device, cpu_flags, cuda_bf16, expected", [
    ("cuda", PLAIN_CPU, True, torch.bfloat16),             # Ampere and later
    ("cuda:1", PLAIN_CPU, False, torch.float16),           # older GPUs: fp16 (training adds a GradScaler)
    ("cpu", BF16_CPU, True, torch.bfloat16),               # AVX512-BF16
    ("cpu", frozenset({"amx_bf16"}), False, torch.bfloat16),  # AMX
    ("cpu", PLAIN_CPU, True, torch.float32),               # bf16 would be emulated, slower than fp32
    ("mps", BF16_CPU, True, torch.float32),
])
def test_auto_dtype_over_the_device_matrix(hardware, device, cpu_flags, cuda_bf16, expected):
    hardware(cpu_flags, cuda_bf16)
    assert runtime.pick_dtype("auto", device) == expected
    assert runtime.pick_dtype("float32", device) == torch.float32  # an explicit choice is kept


def test_bad_dtype_settings_are_user_errors(hardware):
    hardware(cuda_bf16=False)
    with pytest.raises(UserError, match="--dtype must be auto, float32, bfloat16 or float16, got 'float64'"):
        runtime.pick_dtype("float64", "cpu")
    with pytest.raises(UserError, match="this GPU has no bfloat16"):
        runtime.pick_dtype("bfloat16", "cuda")


def test_the_rule_lives_in_runtime_only():
    for path in ROOT.glob("*.py"):
        if path.name != "runtime.py":
            source = path.read_text(encoding="utf-8")
            for marker in ("is_bf16_supported", "/proc/cpuinfo", "torch.autocast(", "torch.compile("):
                assert marker not in source, f"{path.name} decides precision or compilation itself ({marker})"


@pytest.mark.parametrize("cpu_flags, expected", [(BF16_CPU, torch.bfloat16), (PLAIN_CPU, torch.float32)])
def test_inference_and_serving_store_weights_in_the_rules_dtype(hardware, tiny_ckpt, cpu_flags, expected):
    hardware(cpu_flags)
    model, _, _ = load_for_inference(tiny_ckpt, device="cpu")  # evaluate.py and sample.py load through this
    assert model.token_emb.weight.dtype == expected
    health = create_app(str(tiny_ckpt), device="cpu").test_client().get("/health").json
    assert health["dtype"] == str(expected).removeprefix("torch.")
    quantized, _, _ = load_for_inference(tiny_ckpt, device="cpu", quantize="int8")  # int8 computes from float32
    assert quantized.token_emb.weight.dtype == torch.float32


@pytest.mark.parametrize("cpu_flags, expected", [(BF16_CPU, torch.bfloat16), (PLAIN_CPU, torch.float32)])
def test_fine_tuning_runs_under_the_rules_autocast(hardware, random_model, cpu_flags, expected):
    hardware(cpu_flags)
    model, seen = random_model(dtype=torch.float32), []

    def loss_fn(m, batch):
        logits, loss = m(batch, batch)
        seen.append(logits.dtype)
        return loss, 0, 1

    batch = torch.randint(97, (2, 8))
    finetune.run_epoch(model, [batch], loss_fn, torch.optim.SGD(model.parameters(), lr=0.0))
    assert seen == [expected] and model.token_emb.weight.dtype == torch.float32  # weights stay float32


@pytest.mark.parametrize("cpu_flags, expected", [(BF16_CPU, "bfloat16"), (PLAIN_CPU, "float32")])
def test_training_runs_under_the_rules_autocast(hardware, tiny_data, tmp_path, capsys, run_train, cpu_flags,
                                                expected):
    hardware(cpu_flags)
    run_train(f"--data_dir={tiny_data}", f"--out_dir={tmp_path}", "--max_iters=1", "--eval_iters=1", "--batch_size=2",
              "--block_size=16", "--hidden_size=16", "--num_hidden_layers=1", "--num_attention_heads=1",
              "--device=cpu", "--compile=False")
    assert f"device cpu, dtype {expected}," in capsys.readouterr().out

# ----------------------------------------------------------------------------- torch.compile


def test_compile_falls_back_to_eager_with_one_warning(capsys):
    def add_one(x):
        return x + 1

    def failing_warm_up(compiled):
        raise RuntimeError("no compiler for this platform\nmore detail")

    assert runtime.compile_or_eager(add_one, failing_warm_up) is add_one
    err = capsys.readouterr().err
    assert err == "warning: torch.compile failed (no compiler for this platform); running eagerly\n"
    compiled = runtime.compile_or_eager(add_one, lambda f: f(torch.zeros(2)), backend="eager")
    assert compiled is not add_one and torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA A10G", 0.0), ("NVIDIA L40S", 0.0), ("Tesla V100-SXM2-16GB", 0.0),  # not in the table: --peak_flops
])
def test_peak_flops_of_known_gpus(name, flops):
    assert runtime.gpu_peak_flops(name) == flops


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_mfu_counts_six_flops_per_parameter_and_token_and_attentions_share():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=100, block_size=16, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, bias=False))
    # 100 x 32 token table (tied), 16 x 32 positions left out, 2 blocks of 12 x 32^2 + 2 x 32, a final norm
    parameters = 100 * 32 + 2 * (12 * 32 * 32 + 2 * 32) + 32
    assert model.num_params() == parameters
    per_token = 6 * parameters + 12 * 2 * 32 * 16
    assert runtime.estimate_mfu(model, 1000.0, per_token * 4000.0) == pytest.approx(0.25)


def test_freed_tensor_memory_is_kept_for_the_next_tensors():
    """keep_freed_memory (train.py on a CPU): a freed 64 MB tensor's memory serves the next one, where glibc would
    hand it back to the OS and fault it in again, page by page."""
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from runtime import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # the heap grows to what the loop needs (its free blocks settle, as in a training run's steps)
    x = torch.ones(16 << 20); del x
before = faults()
for _ in range(5):
    x = torch.ones(16 << 20); del x
print(faults() - before)
"""
    faults = {way: int(subprocess.run([sys.executable, "-c", code, way], capture_output=True, text=True,
                                      check=True).stdout) for way in ("keep", "plain")}
    assert faults["plain"] > 5 * 15_000 and faults["keep"] < 1_000, faults
