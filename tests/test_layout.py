"""The layout the README promises: model.py runs copied alone, every file imports only the files above it in the
README's table (and exactly those the table names), and --help explains every setting of every script."""

import ast
import dataclasses
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(path.stem for path in ROOT.glob("*.py"))


def project_imports(path):
    """The project's own modules that a file imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names & set(MODULES)


def readme_layout():
    """[(file stem, [stems it imports])] from the README's table of files, in its order (bottom layer first)."""
    rows = []
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `(\w+)\.py` \|.*\| (.*?) \|$", line)
        if m:
            rows.append((m[1], re.findall(r"`(\w+)`", m[2])))
    return rows


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
project = {"cli", "common", "tokenizer", "prepare", "runtime", "checkpoint", "gpt2"} & set(sys.modules)
assert not project and sys.excepthook is sys.__excepthook__, (project, sys.excepthook)
print("ok")
"""
    # -E -s: no PYTHONPATH, no user site: only the folder itself and the installed packages (torch)
    r = subprocess.run([sys.executable, "-E", "-s", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_model_py_imports_only_torch_and_the_standard_library():
    tree = ast.parse((ROOT / "model.py").read_text(encoding="utf-8"))
    top = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name for name in top if name not in sys.stdlib_module_names} == {"torch"}


def test_every_file_imports_only_files_above_it_as_the_readme_says():
    layout = readme_layout()
    order = [stem for stem, _ in layout]
    assert sorted(order) == MODULES, "the README's table lists every .py file of the top folder once"
    for position, (stem, listed) in enumerate(layout):
        imported = project_imports(ROOT / f"{stem}.py")
        assert imported == set(listed), f"{stem}.py imports {sorted(imported)}; the README says {listed}"
        above = set(order[:position])
        assert imported <= above, f"{stem}.py imports {sorted(imported - above)}, which come after it"


def test_tests_and_benchmarks_keep_to_their_side():
    for path in (ROOT / "tests").glob("*.py"):
        imported = {m for m in re.findall(r"^(?:from|import) ([\w.]+)", path.read_text(encoding="utf-8"), re.M)}
        assert not any(m.startswith(("bench", "test_", "conftest")) for m in imported), path.name


def config_classes():
    """(script, settings dataclass) of every script but train.py, which runs on import (its --help is run below)."""
    sys.path.insert(0, str(ROOT / "bench"))
    scripts = [p.stem for p in ROOT.glob("*.py") if "parse_config(" in p.read_text(encoding="utf-8")]
    scripts += [p.stem for p in (ROOT / "bench").glob("bench_*.py")]
    found = []
    for name in sorted(set(scripts) - {"train", "cli"}):
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


def test_train_help_prints_sections_and_comments():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert "\nthe optimizer and the learning-rate schedule (linear warmup, then cosine decay to min_lr)\n" in r.stdout
    assert re.search(r"\n  --batch_size=16 +int +sequences per micro-step per process \[>= 1\]\n", r.stdout)
    assert re.search(r"\n  --dtype=auto +str +bfloat16 \| float16 \| float32; auto: bf16 where", r.stdout)
