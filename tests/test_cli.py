"""The shared config parser: config files are read, never executed; values are type-checked."""
from dataclasses import dataclass
from typing import Optional

import pytest

from cli import UserError, parse_config, read_config_file


@dataclass
class Settings:
    batch_size: int = 4
    learning_rate: float = 1e-3
    compile: bool = True
    name: str = "run"
    seed: Optional[int] = None


def test_defaults_then_file_then_flags(tmp_path):
    config = tmp_path / "c.py"
    config.write_text('"""doc"""\nbatch_size = 2 * 8\nlearning_rate = 6e-4\nname = "from-file"\n')
    s = parse_config(Settings, [str(config), "--name=flag", "--compile=False", "--seed=3"])
    assert s == Settings(batch_size=16, learning_rate=6e-4, compile=False, name="flag", seed=3)


def test_names_assigned_earlier_in_the_file_can_be_used(tmp_path):
    config = tmp_path / "c.py"
    config.write_text("learning_rate = 1e-3\nbatch_size = 10\nname = 'x'\n")
    assert read_config_file(str(config)) == {"learning_rate": 1e-3, "batch_size": 10, "name": "x"}
    config.write_text("batch_size = 10\nlearning_rate = batch_size / 4\n")
    assert parse_config(Settings, [str(config)]).learning_rate == 2.5


def test_config_file_code_is_never_run(tmp_path):
    config = tmp_path / "c.py"
    config.write_text("import os\nbatch_size = 2\n")
    with pytest.raises(UserError, match="only 'name = value' assignments"):
        parse_config(Settings, [str(config)])
    config.write_text("batch_size = __import__('os').getpid()\n")
    with pytest.raises(UserError, match="unsupported expression"):
        parse_config(Settings, [str(config)])


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean --batch_size"):
        parse_config(Settings, ["--batchsize=3"])


def test_types_are_checked():
    with pytest.raises(UserError, match="--batch_size must be int"):
        parse_config(Settings, ["--batch_size=3.5"])
    with pytest.raises(UserError, match="--compile must be bool"):
        parse_config(Settings, ["--compile=maybe"])
    assert parse_config(Settings, ["--learning_rate=1"]).learning_rate == 1.0   # int widens to float
    assert parse_config(Settings, ["--name=123"]).name == "123"                # strings stay strings
    assert parse_config(Settings, ["--compile"]).compile is True               # bare flag switches on


def test_bad_positional_argument():
    with pytest.raises(UserError, match="unexpected argument"):
        parse_config(Settings, ["oops"])


def test_help_anywhere_on_the_line(capsys):
    with pytest.raises(SystemExit) as done:
        parse_config(Settings, ["--batch_size=3", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_a_renamed_setting_still_works_with_a_notice(capsys):
    @dataclass
    class Reader:
        model: str = "out"  # the model to read

    assert parse_config(Reader, ["--out_dir=mine"], renamed={"out_dir": "model"}).model == "mine"
    assert capsys.readouterr().err == "notice: --out_dir is now --model; taking it as --model=mine\n"
    with pytest.raises(UserError, match="unknown setting 'out_dir'"):
        parse_config(Reader, ["--out_dir=mine"])
