"""train.py end to end on a tiny corpus: loss goes down, resume is exact, DDP matches one process, errors are clear."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint import load_model
from cli import UserError, read_config_file
from data import load_split

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--eval_iters=2", "--log_interval=1", "--batch_size=4", "--block_size=32", "--hidden_size=32",
        "--num_hidden_layers=2", "--num_attention_heads=2", "--warmup_iters=2", "--lr_decay_iters=20",
        "--learning_rate=3e-3", "--device=cpu", "--compile=False", "--dtype=float32"]  # fp32: exact comparisons


@pytest.fixture(scope="module")
def data_dir(tiny_data):
    return tiny_data


@pytest.fixture
def train(run_train):
    """train(data_dir, out_dir, *args): train.py in this process with the tiny settings."""
    return lambda data_dir, out_dir, *args: run_train(f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *args)


def weights(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


def checkpoint(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)


def log_rows(out_dir, key):
    return [r for r in map(json.loads, open(Path(out_dir) / "log.jsonl")) if key in r]


def test_loss_goes_down_and_out_dir_is_self_contained(data_dir, tmp_path, train):
    out = tmp_path / "out"
    train(data_dir, out, "--max_iters=30", "--eval_interval=15")
    val = [row["val_loss"] for row in log_rows(out, "val_loss")]
    assert len(val) == 3 and val[-1] < val[0] - 1.0
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # pickle-free load works
    assert ckpt["iter_num"] == 30 and ckpt["train_config"]["max_iters"] == 30
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model, tokenizer, _ = load_model(str(out))  # the folder alone is enough: weights, config, tokenizer
    assert tokenizer.vocab_size == model.config.vocab_size == 300


def test_resume_is_exact(data_dir, tmp_path, train):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    args = ["--max_iters=12", "--eval_interval=6", "--dropout=0.1"]  # dropout: the RNG state must resume too
    train(data_dir, straight, *args)
    train(data_dir, halves, "--max_iters=6", "--eval_interval=6", "--dropout=0.1")
    train(data_dir, halves, *args, "--init_from=resume")
    a, b = weights(straight), weights(halves)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_with_muon_rope_and_embedding_dropout(data_dir, tmp_path, train):
    args = ["--optimizer=muon", "--position=rope", "--qk_norm=True", "--embedding_dropout=0.1",
            "--dropout=0.1", "--muon_weight_decay=0.1"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(data_dir, straight, "--max_iters=12", "--eval_interval=6", *args)
    train(data_dir, halves, "--max_iters=6", "--eval_interval=6", *args)
    train(data_dir, halves, "--max_iters=12", "--eval_interval=6", "--init_from=resume", *args)
    a, b = weights(straight), weights(halves)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="--optimizer cannot change when resuming"):
        train(data_dir, halves, "--max_iters=14", "--init_from=resume", "--optimizer=adamw")
    # the token table's own rate is a param group of its own: the optimizer state could not follow
    with pytest.raises(UserError, match="--embedding_learning_rate cannot change when resuming"):
        train(data_dir, halves, "--max_iters=14", "--init_from=resume", "--embedding_learning_rate=0.1")
    train(data_dir, halves, "--max_iters=14", "--init_from=resume")  # the run's own settings: Muon, rope, ...
    assert torch.load(halves / "ckpt.pt", weights_only=True)["train_config"]["optimizer"] == "muon"


def test_bf16_autocast_on_cpu_tracks_fp32(data_dir, tmp_path, train):
    args = ["--max_iters=20", "--eval_interval=10", "--dropout=0"]
    train(data_dir, tmp_path / "fp32", *args)
    train(data_dir, tmp_path / "bf16", *args, "--dtype=bfloat16")
    fp32, bf16 = ([r["val_loss"] for r in log_rows(tmp_path / run, "val_loss")] for run in ("fp32", "bf16"))
    assert bf16[-1] < bf16[0] - 1.0 and bf16 == pytest.approx(fp32, abs=0.05)


def test_gradient_accumulation_matches_the_big_batch(data_dir, tmp_path, train):
    train(data_dir, tmp_path / "big", "--max_iters=5", "--eval_interval=100", "--dropout=0", "--batch_size=8")
    train(data_dir, tmp_path / "acc", "--max_iters=5", "--eval_interval=100", "--dropout=0", "--batch_size=4",
          "--gradient_accumulation_steps=2")
    big = [r["train_loss"] for r in log_rows(tmp_path / "big", "train_loss")]
    acc = [r["train_loss"] for r in log_rows(tmp_path / "acc", "train_loss")]
    assert big == pytest.approx(acc, abs=1e-5)


def test_two_gloo_processes_match_one(data_dir, tmp_path, train):
    args = ["--max_iters=6", "--eval_interval=100", "--dropout=0", "--gradient_accumulation_steps=2"]
    train(data_dir, tmp_path / "one", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'two'}", *TINY, *args],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "processes 2" in r.stdout
    one = [row["train_loss"] for row in log_rows(tmp_path / "one", "train_loss")]
    two = [row["train_loss"] for row in log_rows(tmp_path / "two", "train_loss")]
    assert len(one) == 6 and one == pytest.approx(two, abs=1e-4)


def test_each_process_keeps_its_own_rows_of_the_global_batch():
    import train as train_module
    assert [train_module.batch_rows(4, rank, 2) for rank in (0, 1)] == [slice(0, 2), slice(2, 4)]
    message = "gradient_accumulation_steps must be a multiple of the 3 processes"
    with pytest.raises(UserError, match=message):
        train_module.batch_rows(4, 0, 3)


def test_ctrl_c_saves_and_exits_130_so_that_a_script_running_it_stops(data_dir, tmp_path,
                                                                        signal_training):
    out = tmp_path / "out"
    returncode, stdout, stderr = signal_training(signal.SIGINT, f"--data_dir={data_dir}", f"--out_dir={out}", *TINY,
                                                 "--max_iters=100000", "--eval_interval=100000")
    assert returncode == 130, stderr  # (run.sh, under set -e, stops there: no evaluation follows)
    assert "saved checkpoint" in stdout and "Traceback" not in stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] >= 3


def test_diverging_loss_stops_with_a_clear_message(data_dir, tmp_path, train):
    with pytest.raises(UserError, match="loss is (nan|inf) at iteration .* training diverged"):
        train(data_dir, tmp_path / "out", "--max_iters=50", "--eval_interval=100", "--learning_rate=1e30",
              "--warmup_iters=0", "--grad_clip=0")


@pytest.mark.parametrize("args, message", [
    (["--data_dir=/nonexistent"], "run prepare.py"),
    (["--hidden_size=30", "--num_attention_heads=4"], "not divisible by num_attention_heads"),
    (["--dtype=float64"], "--dtype must be"),
    (["--init_from=resume", "--out_dir=/nonexistent"], "no checkpoint"),
    (["--block_size=100000"], "fewer than block_size"),
    (["--embedding_learning_rate=0.1"], "--embedding_learning_rate is part of Muon's recipe"),
])
def test_bad_input_raises_a_clear_error(data_dir, tmp_path, args, message, train):
    with pytest.raises(UserError, match=message):
        train(data_dir, tmp_path, "--max_iters=1", *args)


def test_bad_input_on_the_command_line_is_one_line_without_traceback(data_dir, tmp_path, run_script):
    r = run_script("train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--batchsize=3")
    assert r.returncode != 0
    assert r.stderr.strip() == "error: unknown setting 'batchsize' (command line); did you mean --batch_size?"


def test_resume_refuses_other_vocab_and_longer_context(data_dir, tmp_path, train):
    out = tmp_path / "out"
    train(data_dir, out, "--max_iters=2", "--eval_interval=2")
    with pytest.raises(UserError, match="beyond the model's 32 positions"):
        train(data_dir, out, "--max_iters=4", "--init_from=resume", "--block_size=64")
    meta = json.loads((data_dir / "meta.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for name in os.listdir(data_dir):
        (other / name).write_bytes((data_dir / name).read_bytes())
    (other / "meta.json").write_text(json.dumps({**meta, "vocab_size": 512}))
    with pytest.raises(UserError, match="vocab mismatch"):
        train(other, out, "--max_iters=4", "--init_from=resume")


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "config").glob("*.py")))
def test_every_shipped_config_trains_with_its_recipe(config_file, data_dir, tmp_path, run_train):
    """Each config file's settings are valid and its recipe (positions, head, optimizer, ...) trains: the config's
    own choices, on a shrunken shape (the tiny settings come after it on the command line) for 4 steps."""
    out = tmp_path / "out"
    run_train(str(ROOT / "config" / config_file), f"--data_dir={data_dir}", f"--out_dir={out}", *TINY,
              "--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=1", "--batch_size=2",
              "--init_from=scratch")
    saved = json.loads((out / "config.json").read_text())
    recipe = {k: v for k, v in read_config_file(str(ROOT / "config" / config_file)).items()
              if k in ("position", "tie_embeddings", "optimizer", "embedding_dropout", "dropout", "activation")}
    assert recipe.items() <= saved.items()
    losses = [r["train_loss"] for r in log_rows(out, "train_loss")]
    assert len(losses) == 4 and all(map(math.isfinite, losses))


def test_a_progress_line_at_least_every_ten_seconds(data_dir, tmp_path, train, capsys, monkeypatch):
    """Between log lines (here every 100 steps), where the run is and how long it has to go: a step that takes
    11 s on the clock prints one."""
    clock = iter(range(0, 10**6, 11))
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    train(data_dir, tmp_path / "out", "--max_iters=3", "--eval_interval=100", "--log_interval=100")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    assert [line.split(":")[0] for line in lines] == ["iter 1/3", "iter 2/3", "iter 3/3"]
    assert all(" ms/iter" in line and ", eta " in line for line in lines)
    assert "loss" in lines[-1]  # the last step is logged whatever the interval


def test_resuming_a_finished_run_does_nothing(data_dir, tmp_path, train, capsys):
    out = tmp_path / "out"
    train(data_dir, out, "--max_iters=4", "--eval_interval=2")
    before = (out / "ckpt.pt").read_bytes()
    train(data_dir, out, "--max_iters=4", "--init_from=resume")
    assert "trained to --max_iters=4 already: nothing to do" in capsys.readouterr().out
    assert (out / "ckpt.pt").read_bytes() == before


def test_the_log_of_a_resumed_run_has_each_row_once(data_dir, tmp_path, train):
    out = tmp_path / "out"
    train(data_dir, out, "--max_iters=4", "--eval_interval=2")
    train(data_dir, out, "--max_iters=8", "--eval_interval=2", "--init_from=resume")
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    evals = [row["iter"] for row in rows if "val_loss" in row]
    steps = [row["iter"] for row in rows if "train_loss" in row]
    assert evals == [0, 2, 4, 6, 8] and steps == list(range(1, 9))


def test_the_model_saved_is_the_average_of_the_weights_and_resumes_exactly(data_dir, tmp_path,
                                                                            train):
    """With ema_decay, ckpt.pt's model (what evaluate.py and sample.py read) is the average of the
    weights after each step, w_i weighted by decay^(t-i); the trained weights go on beside it, and
    a run resumed at every step ends where one straight run does."""
    args = ["--eval_interval=1", "--ema_decay=0.5", "--optimizer=muon", "--dropout=0.1"]
    trained = []
    for step in (1, 2, 3):  # one step at a time, resumed each time
        resume = ["--init_from=resume"] if step > 1 else []
        train(data_dir, tmp_path / "steps", f"--max_iters={step}", *args, *resume)
        trained.append(checkpoint(tmp_path / "steps")["trained_model"])
    train(data_dir, tmp_path / "straight", "--max_iters=3", *args)
    steps, straight = checkpoint(tmp_path / "steps"), checkpoint(tmp_path / "straight")
    for k, w3 in trained[-1].items():
        expected = (trained[0][k] + 2 * trained[1][k] + 4 * w3) / 7
        torch.testing.assert_close(steps["model"][k], expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(steps["model"][k], straight["model"][k])
        assert torch.equal(w3, straight["trained_model"][k])
    name = "blocks.0.mlp.up_proj.weight"
    assert not torch.equal(steps["model"][name], trained[-1][name])
    # the folder's model is the average, and the evaluation logged was the average's
    import train as train_module
    model, _, _ = load_model(str(tmp_path / "straight"))
    assert all(torch.equal(v, straight["model"][k]) for k, v in model.state_dict().items())
    config = train_module.TrainConfig(**straight["train_config"])
    val, amp = {"val": load_split(data_dir, "val")}, contextlib.nullcontext()
    loss = train_module.estimate_loss(model, val, config, amp, "cpu")["val"]
    logged = log_rows(tmp_path / "straight", "val_loss")[-1]["val_loss"]
    assert loss == pytest.approx(logged, abs=1e-6)
    model.load_state_dict(straight["trained_model"])
    assert train_module.estimate_loss(model, val, config, amp, "cpu")["val"] != loss


@pytest.mark.parametrize("rates", [["--dropout=0.3", "--attention_dropout=0",
                                    "--residual_dropout=0"],
                                   ["--dropout=0", "--attention_dropout=0.3"],
                                   ["--dropout=0", "--residual_dropout=0.3"],
                                   ["--dropout=0", "--head_dropout=0.3"]])
def test_a_dropout_of_its_own_place_trains_and_resumes_exactly(rates, data_dir, tmp_path, train):
    """Dropout on the embeddings only, on attention weights only, on the residual branches only,
    before the output layer only: each drops something, is saved as the model's, resumes exactly."""
    args = [*rates, "--eval_interval=3"]
    train(data_dir, tmp_path / "straight", "--max_iters=6", *args)
    train(data_dir, tmp_path / "halves", "--max_iters=3", *args)
    train(data_dir, tmp_path / "halves", "--max_iters=6", "--init_from=resume", *args)
    train(data_dir, tmp_path / "none", "--max_iters=6", "--dropout=0", "--eval_interval=3")
    a, b, none = (weights(tmp_path / run) for run in ("straight", "halves", "none"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], none[k]) for k in a)  # it drops something
    config = checkpoint(tmp_path / "straight")["model_config"]
    assert all(config[rate[2:].split("=")[0]] == float(rate.split("=")[1]) for rate in rates)


def test_the_steps_between_log_lines_never_wait_for_the_device(data_dir, tmp_path, train,
                                                               monkeypatch):
    """No host sync outside log steps and evaluations: the project's code reads a tensor's value
    (.item(), float(), int(), bool(), .tolist()) once per log line, never per step, so that on a
    GPU the steps between are queued without a wait."""
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, _original=original, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename)
            if caller.parent == ROOT:  # the project's own files
                reads.append(caller.name)
            return _original(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for steps in (4, 12):  # an evaluation at 0 and at the end, a log line every 4 steps
        reads.clear()
        train(data_dir, tmp_path / f"out{steps}", f"--max_iters={steps}", "--log_interval=4",
              "--eval_interval=100", "--optimizer=muon", "--ema_decay=0.9", "--dropout=0.1")
        counts.append(len(reads))
    assert counts[1] - counts[0] == 2  # 8 more steps: 2 more log lines, one read each


def test_muons_newton_schulz_is_compiled_with_the_model(data_dir, tmp_path, train, monkeypatch):
    """With compile on, train.py compiles Newton-Schulz too (warmed up on each stack's shape, so
    that a failure falls back to eager at once), and Muon's steps run the compiled function."""
    import runtime
    compiled, calls = {}, []

    def fake_compile(fn, warm_up, **options):  # what compile_or_eager does, without compiling
        if isinstance(fn, torch.nn.Module):
            warm_up(fn)
            return fn

        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        warm_up(wrapped)
        compiled[fn.__name__] = options
        return wrapped
    monkeypatch.setattr(runtime, "compile_or_eager", fake_compile)
    train(data_dir, tmp_path / "out", "--max_iters=3", "--eval_interval=100", "--optimizer=muon",
          "--compile=True")
    assert compiled["orthogonalize"] == {"dynamic": False}
    shapes = 4  # every block's qkv, out, up and down projections: one stack each
    assert calls.count("orthogonalize") == shapes + 3 * shapes  # the warm-up, then 3 steps


def test_a_schedule_that_decays_past_max_iters_says_so(data_dir, tmp_path, train, capsys):
    """TINY decays until step 20: a 3-step run ends near its peak learning rate, and says why."""
    train(data_dir, tmp_path / "short", "--max_iters=3", "--eval_interval=100")
    assert "note: lr_decay_iters=20 is past max_iters=3" in capsys.readouterr().out
    train(data_dir, tmp_path / "full", "--max_iters=3", "--lr_decay_iters=3", "--eval_interval=100")
    assert "note:" not in capsys.readouterr().out
