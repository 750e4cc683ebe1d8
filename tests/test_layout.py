"""The layout the README promises: each script runs copied with exactly the files the README names for it, every
file imports only the files above it in the README's tables (and exactly those they name), a script calls into every
project file it imports on its default path, model.py runs copied alone, and --help explains every setting."""

import ast
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(path.stem for path in ROOT.glob("*.py"))
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))


def project_imports(stem):
    """(the project's modules a file imports at its top, those it imports inside functions: optional features)."""
    tree = ast.parse((ROOT / f"{stem}.py").read_text(encoding="utf-8"))

    def names(node):
        if isinstance(node, ast.Import):
            return {alias.name.split(".")[0] for alias in node.names}
        return {node.module.split(".")[0]} if isinstance(node, ast.ImportFrom) and node.module else set()

    top = set().union(*(names(node) for node in tree.body)) & set(MODULES)
    anywhere = set().union(*(names(node) for node in ast.walk(tree))) & set(MODULES)
    return top, anywhere - top


def needs(stem, lazy=False):
    """Every project file that `stem` imports, directly or not: at the top only, or (lazy=True) also inside
    functions."""
    seen, todo = set(), [stem]
    while todo:
        top, inside = project_imports(todo.pop())
        for name in top | (inside if lazy else set()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen - {stem}


def readme_rows(heading):
    """{file stem: (names before any parenthesis, names inside parentheses)} of the table under a README heading,
    in its order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = next(block for block in text[text.index(heading):].split("\n\n") if block.startswith("|"))
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| `(\w+)\.py` \|.*\| (.*?) \|$", line)
        if m:
            main, _, optional = m[2].partition("(")
            rows[m[1]] = (set(re.findall(r"`(\w+)`", main)), set(re.findall(r"`(\w+)`", optional)))
    return rows


MODULE_ROWS, SCRIPT_ROWS = readme_rows("### Modules they share"), readme_rows("### Scripts you run")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_lists_every_file_once():
    assert sorted([*MODULE_ROWS, *SCRIPT_ROWS]) == MODULES
    assert set(SCRIPTS) - {"tokenizer"} == set(SCRIPT_ROWS)  # tokenizer.py runs too, but is first a module


def test_every_module_imports_what_the_readme_says_and_only_files_above_it():
    order = [*MODULE_ROWS, *SCRIPT_ROWS]
    for position, (stem, (top, optional)) in enumerate(MODULE_ROWS.items()):
        imported, inside = project_imports(stem)
        assert imported == top, f"{stem}.py imports {sorted(imported)} at its top; the README says {sorted(top)}"
        assert inside == optional, f"{stem}.py imports {sorted(inside)} where used; the README says {sorted(optional)}"
    for position, stem in enumerate(order):
        imported, inside = project_imports(stem)
        assert imported | inside <= set(order[:position]), f"{stem}.py imports files that come after it"


def test_every_script_names_exactly_the_files_it_needs():
    for stem, (copy, optional) in SCRIPT_ROWS.items():
        assert needs(stem) == copy, f"{stem}.py needs {sorted(needs(stem))}; the README says {sorted(copy)}"
        extra = needs(stem, lazy=True) - needs(stem)  # what the options load where they are used
        assert optional <= extra, f"{stem}.py's options never need {sorted(optional - extra)}"


def test_scripts_stay_lean():
    """The files each script imports at its top, directly or not: as few as the job needs."""
    limits = {"tokenizer": 0, "sample": 7, "evaluate": 7, "train": 8, "serve": 10}
    assert {stem: len(needs(stem)) for stem in limits} == {"tokenizer": 0, "sample": 7, "evaluate": 7, "train": 8,
                                                         "serve": 8}
    assert all(len(needs(stem)) <= limit for stem, limit in limits.items())


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_copied_with_the_files_the_readme_names_runs(script, tmp_path, tiny_data, tiny_ckpt):
    # (tokenizer.py, first a module, runs its command line with the files in its parentheses)
    copy = SCRIPT_ROWS[script][0] if script in SCRIPT_ROWS else set().union(*MODULE_ROWS[script])
    for stem in {script} | copy:
        shutil.copy(ROOT / f"{stem}.py", tmp_path / f"{stem}.py")
    row = next((line for line in README.splitlines() if line.startswith(f"| `{script}.py` |")), "")
    for name in re.findall(r"`(\w+\.(?!py`)\w+)`", row.rsplit(" | ", 1)[-1]):  # not a module: serve.py's page
        shutil.copy(ROOT / name, tmp_path / name)
    run = lambda *args: subprocess.run([sys.executable, "-E", "-s", f"{script}.py", *args], cwd=tmp_path,  # noqa
                                       capture_output=True, text=True, timeout=180)
    r = run("--help")  # -E -s: only the folder itself and the installed packages
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script}.py"), r.stderr
    if script == "train":  # and a step of training
        r = run(f"--data_dir={tiny_data}", "--out_dir=out", "--max_iters=1", "--eval_iters=1", "--batch_size=2",
                "--block_size=16", "--hidden_size=16", "--num_hidden_layers=1", "--num_attention_heads=1",
                "--device=cpu", "--compile=False")
        assert r.returncode == 0 and (tmp_path / "out" / "ckpt.pt").is_file(), r.stderr
    if script == "serve":  # and its page, from the folder it was copied into
        code = f"import serve; print(serve.create_app({str(tiny_ckpt)!r}, device='cpu').test_client().get('/').status)"
        r = subprocess.run([sys.executable, "-E", "-s", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           timeout=180)
        assert r.stdout.strip() == "200 OK", r.stderr


# A script's default path, each run under a profiler that records which project files' functions ran.
PROFILE = """
import json, os, runpy, sys
called = set()
root = os.getcwd()
def project_modules():
    return {name for name, m in list(sys.modules.items()) if os.path.dirname(getattr(m, "__file__", "") or "") == root}
def profile(frame, event, arg):
    path = frame.f_code.co_filename
    if event == "call" and frame.f_code.co_name != "<module>" and os.path.dirname(path) == root:
        name = os.path.basename(path)[:-3]
        if name not in called:
            called.add(name)
            if called >= project_modules() | {sys.argv[0][:-3]}:
                sys.setprofile(None)  # every file loaded so far has run: the rest runs at full speed
sys.path.insert(0, root)
sys.argv = sys.argv[1:]
sys.setprofile(profile)
try:
    if sys.argv[0] == "serve.py":  # the server's default path: start, answer a completion
        import serve
        app = serve.create_app(sys.argv[1], device="cpu")
        assert app.test_client().post("/v1/completions", json={"prompt": "the", "max_tokens": 3}).status_code == 200
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
finally:
    sys.setprofile(None)
    print("PROFILE", json.dumps({"imported": sorted(project_modules()), "called": sorted(called)}))
"""


def default_paths(tiny_data, tiny_ckpt, tmp_path):
    corpus, records = tmp_path / "corpus.txt", tmp_path / "records.json"
    corpus.write_text("the river valley stone bridge church people grew old near\n" * 40, encoding="utf-8")
    records.write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}] * 20), encoding="utf-8")
    labels = tmp_path / "labels.tsv"
    labels.write_text("".join(f"{'spam' if i % 2 else 'ham'}\ttext number {i}\n" for i in range(40)))
    small = ["--num_epochs=1", "--device=cpu"]
    audited = shutil.copytree(tiny_ckpt, tmp_path / "audited")  # audit.py writes audit.json beside the model
    return {
        "prepare": ["prepare.py", f"--input={corpus}", f"--out_dir={tmp_path / 'data'}", "--vocab_size=300"],
        "tokenizer": ["tokenizer.py", f"--train={corpus}", f"--out={tmp_path / 'tok'}", "--vocab_size=300"],
        "train": ["train.py", "config/wikitext_tiny.py", f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}",
                  "--max_iters=2", "--lr_decay_iters=2", "--warmup_iters=1",
                  "--eval_iters=1", "--batch_size=2", "--block_size=16", "--hidden_size=16", "--num_hidden_layers=1",
                  "--num_attention_heads=1", "--device=cpu", "--compile=False"],
        "evaluate": ["evaluate.py", f"--model={tiny_ckpt}", "--split=val", "--device=cpu"],
        "sample": ["sample.py", f"--model={tiny_ckpt}", "--max_new_tokens=5", "--device=cpu"],
        "finetune_classifier": ["finetune_classifier.py", f"--model={tiny_ckpt}", f"--data={labels}",
                                f"--out_dir={tmp_path / 'cls'}", *small],
        "finetune_instruct": ["finetune_instruct.py", f"--model={tiny_ckpt}", f"--data={records}",
                              f"--out_dir={tmp_path / 'instruct'}", "--max_new_tokens=2", *small],
        "serve": ["serve.py", str(tiny_ckpt)],
        "export": ["export.py", f"--model={tiny_ckpt}", f"--to={tmp_path / 'hf'}"],
        "audit": ["audit.py", f"--model={audited}", "--samples=4", "--prefix_tokens=8", "--suffix_tokens=8",
                  "--device=cpu"],
    }


# Default paths that fetch their data from the web (WikiText-2, SMS spam, the instruction set) call download.py
# there; offline, these tests give local files instead (test_prepare.py and test_download.py cover the downloads).
OFFLINE = {"prepare": {"download"}, "finetune_classifier": {"download"}, "finetune_instruct": {"download"}}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_calls_into_every_file_it_imports(script, tiny_data, tiny_ckpt, tmp_path):
    """No dead weight: on its default path a script runs code of every project file it loads (the optional
    features, GPT-2 weights, int8, a classifier, load theirs where they are used)."""
    args = default_paths(tiny_data, tiny_ckpt, tmp_path)[script]
    r = subprocess.run([sys.executable, "-c", PROFILE, *args], cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "PROFILE " in r.stdout, r.stderr
    found = json.loads(r.stdout.split("PROFILE ", 1)[1])
    imported, called = set(found["imported"]) - {script}, set(found["called"]) - {script}
    # it loaded nothing beyond its top-level imports (tokenizer.py's command line: its own too)
    assert imported == needs(script, lazy=script not in SCRIPT_ROWS), r.stderr
    unused = imported - called - OFFLINE.get(script, set())
    assert not unused, f"{script}.py imports {sorted(unused)} but never calls into them"


def test_model_py_runs_copied_alone_into_an_empty_folder(tmp_path):
    shutil.copy(ROOT / "model.py", tmp_path / "model.py")
    code = """
import sys, torch
from model import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=50, block_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
idx = torch.randint(50, (2, 10))
logits, loss = model(idx, idx)
loss.backward()
model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu").step()
out = model.eval().generate(idx, 20, temperature=0)  # past block_size: the KV cache is rebuilt
plain = model.generate(idx, 20, temperature=0, use_cache=False)
assert logits.shape == (2, 10, 50) and loss.item() > 0 and out.shape == plain.shape == (2, 30)
assert torch.equal(out[:, :16], plain[:, :16])
assert sys.excepthook is sys.__excepthook__
print("ok")
"""
    r = subprocess.run([sys.executable, "-E", "-s", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_model_py_imports_only_torch_and_the_standard_library():
    tree = ast.parse((ROOT / "model.py").read_text(encoding="utf-8"))
    top = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name for name in top if name not in sys.stdlib_module_names} == {"torch"}


def test_no_script_installs_a_process_wide_hook():
    """The one-line error behaviour is visible where each script starts: run_main(main), no sys.excepthook."""
    for stem in SCRIPTS:
        source = (ROOT / f"{stem}.py").read_text(encoding="utf-8")
        assert "excepthook" not in source and "run_main(main)" in source.split('if __name__ == "__main__":')[1], stem


def test_tests_and_benchmarks_keep_to_their_side():
    for path in (ROOT / "tests").glob("*.py"):
        imported = {m for m in re.findall(r"^(?:from|import) ([\w.]+)", path.read_text(encoding="utf-8"), re.M)}
        assert not any(m.startswith(("bench", "test_", "conftest")) for m in imported), path.name


def config_classes():
    """(script, settings dataclass) of every script and bench script."""
    sys.path.insert(0, str(ROOT / "bench"))
    scripts = [p.stem for p in ROOT.glob("*.py") if "parse_config(" in p.read_text(encoding="utf-8")]
    scripts += [p.stem for p in (ROOT / "bench").glob("bench_*.py")]
    found = []
    for name in sorted(set(scripts) - {"cli"}):
        module = importlib.import_module(name)
        classes = [obj for obj in vars(module).values() if dataclasses.is_dataclass(obj) and isinstance(obj, type)
                   and obj.__module__ == name and obj.__name__.endswith("Config")]
        found += [(name, cls) for cls in classes]
    return found


@pytest.mark.parametrize("script, config_class", config_classes(), ids=lambda x: getattr(x, "__name__", x))
def test_help_gives_every_setting_its_type_default_and_comment(script, config_class, capsys, monkeypatch):
    words = lambda text: text.split()  # noqa: E731  (help text is wrapped: compare words)
    helps, _ = cli.setting_comments(config_class)
    expected = "".join(part.title() for part in script.removeprefix("bench_").split("_")) + "Config"
    assert config_class.__name__ in (expected, "Bench" + expected), "a settings class is named after its script"
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        cli.parse_config(config_class)
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(f"usage: {script}.py")
    for field in dataclasses.fields(config_class):
        assert helps.get(field.name), f"{script}: --{field.name} has no comment beside it"
        line = next(line for line in out.splitlines() if line.startswith(f"  --{field.name}="))
        kind = field.type if isinstance(field.type, str) else cli.type_name(field.type)
        assert kind in line, (field.name, line)
        assert " ".join(words(helps[field.name])) in " ".join(words(out)), field.name


def test_help_works_anywhere_on_the_line():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "config/wikitext_tiny.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert "\nthe optimizer and the learning-rate schedule (linear warmup, then cosine decay to min_lr)\n" in r.stdout
    assert re.search(r"\n  --batch_size=16 +int +sequences per micro-step per process \[>= 1\]\n", r.stdout)
    assert re.search(r"\n  --dtype=auto +str +bfloat16 \| float16 \| float32; auto: bf16 where", r.stdout)
