"""
Settings and one-line errors. A script declares its settings as a dataclass of typed defaults with
a comment beside each, and calls `parse_config`:  python train.py config/small.py --batch_size=8

A config file holds `name = value` lines, read with `ast`, never run: literals, arithmetic, names
assigned above. Flags come after it and win. Each value is checked against its default's type and
its field's allowed values (`setting`); `--help` prints them all with their comments. A `UserError`
is something the user can fix: `run_main(main)` prints it as one line, without a traceback.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import math
import operator
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path


class UserError(Exception):
    """A problem with the input that the user can fix; printed as one line, without a traceback."""


# The words of CUDA's, the CPU's and MPS's allocators when memory runs out
OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|not enough memory")


def run_main(main):
    """Run main(): a UserError, an OSError (a full disk, a read-only folder) or running out of
    memory becomes one 'error: ...' line and exit status 2; Ctrl-C one 'interrupted' line, 130."""
    try:
        return main()
    except UserError as e:
        message = e
    except KeyboardInterrupt as e:
        print("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        message = f"{e.strerror or e}{where}: make room or choose another folder, then run it again"
    except (MemoryError, RuntimeError) as e:  # numpy's; torch's allocators raise RuntimeError
        if isinstance(e, RuntimeError) and not OUT_OF_MEMORY.search(str(e)):
            raise
        first_line = (str(e).splitlines() or ["MemoryError"])[0][:120]
        message = f"out of memory ({first_line}): lower --batch_size or the model's size"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- reading values

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
           ast.Mod: operator.mod}
MAX_INT, MAX_LENGTH = 10**18, 10_000  # a value beyond these is a mistake, not a setting
TOO_DEEP = "an expression nested too deeply to read: write the value out"


def _size(value):
    """Characters and items in all: 'ab' -> 2; ('ab', 'c') -> 5 (2 items + 3 characters)."""
    if isinstance(value, (list, tuple)):
        return len(value) + sum(map(_size, value))
    return len(value) if isinstance(value, str) else 0


def _bounded(value):
    """value, if a setting can be that large: integers to 1e18, strings and lists to 10,000."""
    if isinstance(value, int) and abs(value) > MAX_INT or _size(value) > MAX_LENGTH:
        limit = MAX_INT if isinstance(value, int) else f"{MAX_LENGTH} items"
        kind = type(value).__name__
        raise ValueError(f"the value is too large for a setting ({kind} beyond {limit})")
    return value


def _safe_eval(node, names):
    """Evaluate a literal, arithmetic on literals, or an earlier name: enough for configs, unable to
    run code, and bounded: 9**9**9 or 'x' * 10**10 is refused before it is computed."""
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _safe_eval(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _safe_eval(node.left, names), _safe_eval(node.right, names)
        _refuse_huge(node, left, right)
        return _bounded(_BINOPS[type(node.op)](left, right))
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_safe_eval(e, names) for e in node.elts]
        return _bounded(items if isinstance(node, ast.List) else tuple(items))
    raise ValueError(f"unsupported expression '{ast.unparse(node)}' "
                     f"(use literals and arithmetic only)")


def _refuse_huge(node, left, right):
    """Refuse arithmetic too large to compute: 10**100, 'x' * 10**9, '%*d' % (10**9, 1)."""
    text, number = ast.unparse(node), (int, float)
    if isinstance(node.op, ast.Mod) and isinstance(left, str):
        raise ValueError(f"'{text[:60]}': string formatting is not supported in a config file")
    if isinstance(node.op, ast.Pow) and isinstance(left, number) and isinstance(right, number) \
            and abs(left) > 1 and right * math.log10(abs(left)) > 18:
        raise ValueError(f"'{text}' is too large for a setting")
    sequences = [x for x in (left, right) if isinstance(x, (str, list, tuple))]
    one_count = isinstance(left, int) != isinstance(right, int)
    if isinstance(node.op, ast.Mult) and one_count and sequences:
        count = left if isinstance(left, int) else right
        if count * _size(sequences[0]) > MAX_LENGTH:
            raise ValueError(f"'{text}' is too large for a setting "
                             f"({type(sequences[0]).__name__} beyond {MAX_LENGTH} items)")


def read_config_file(path):
    """Return the {name: value} assignments of a config file, without executing it."""
    try:
        tree = ast.parse(Path(path).read_bytes().decode("utf-8"), filename=path)
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}); convert it first")
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}")
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: {TOO_DEEP}") from None
    values = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare string: documentation only
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            raise UserError(f"{path}:{stmt.lineno}: only 'name = value' assignments are allowed "
                            f"in a config file")
        try:
            values[stmt.targets[0].id] = _safe_eval(stmt.value, values)
        except (ValueError, ArithmeticError, RecursionError) as e:
            problem = TOO_DEEP if isinstance(e, RecursionError) else e
            raise UserError(f"{path}:{stmt.lineno}: {problem}") from None
    return values


def _parse_flag_value(text):
    """A flag's value: a Python literal if it reads as one (1e-3, True, None), else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def type_name(hint):
    """int -> 'int'; tuple[str, ...] -> 'tuple[str, ...]'; Optional[int] -> 'Optional[int]'."""
    plain = isinstance(hint, type) and not typing.get_args(hint)
    return hint.__name__ if plain else str(hint).replace("typing.", "")


def _coerce(name, value, hint, default):
    """value as the field's type, converted only where nothing is lost: 2.0 -> 2 for an int."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X], X | None
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = {bool: isinstance(value, bool) or value in (0, 1), str: True,
            int: number and float(value).is_integer(), float: number and math.isfinite(value),
            tuple: isinstance(value, (tuple, list))}
    kind = tuple if typing.get_origin(hint) is tuple else hint
    if kind not in fits:
        return value
    if fits[kind]:
        return kind(value)
    raise UserError(f"--{name} must be {getattr(hint, '__name__', hint)}, got {value!r} "
                    f"(default is {default!r})")


# ----------------------------------------------------------------------------- --help

def setting_comments(config_class):
    """{field: its comment} and {field: [comments of the sections it starts]}, from the source of
    the class and the dataclasses it extends. A comment in the column of the one above goes on:

        lr: float = 1e-3     # the peak learning rate,
                             # reached after warmup_iters  -> {'lr': 'the peak learning rate, ...'}
    """
    helps, sections = {}, {}
    for cls in [c for c in reversed(config_class.__mro__) if dataclasses.is_dataclass(c)]:
        try:
            lines, _ = inspect.getsourcelines(cls)
        # no source (an interactive session, a frozen program): names and types only
        except (OSError, TypeError):
            continue
        # {line index: (column, text)}
        comments = {token.start[0] - 1: (token.start[1], token.string.lstrip("#").strip())
                    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline)
                    if token.type == tokenize.COMMENT}
        body = ast.parse(textwrap.dedent("".join(lines))).body[0].body
        field_at = {node.end_lineno - 1: node.target.id for node in body
                    if isinstance(node, ast.AnnAssign)}
        continuing, column = None, None
        for i, line in enumerate(lines):
            comment_only = i in comments and not line[:comments[i][0]].strip()
            if i in field_at:
                continuing = field_at[i] if i in comments else None
                if continuing:
                    column, helps[continuing] = comments[i]
            elif comment_only and continuing and comments[i][0] == column:
                helps[continuing] += " " + comments[i][1]
            else:
                continuing = None
                following = next((field_at[j] for j in sorted(field_at) if j > i), None)
                if comment_only and following is not None:
                    sections.setdefault(following, []).append(comments[i][1])
    return helps, sections


def print_help(config_class, defaults, hints):
    print(f"usage: {Path(sys.argv[0]).name} [config_file.py] [--name=value ...]\n\nSettings: the "
          "defaults below, then a config file (name = value lines), then --name=value flags.")
    helps, sections = setting_comments(config_class)
    flags = {n: f"--{n}={v}" if isinstance(v, str) and v else f"--{n}={v!r}"
             for n, v in defaults.items()}
    kinds = {n: type_name(hints[n]) for n in defaults}
    flag_width, type_width = min(36, max(map(len, flags.values()))), max(map(len, kinds.values()))
    indent = " " * (2 + flag_width + 2 + type_width + 2)
    for name in defaults:
        for text in sections.get(name, []):
            print(f"\n{text}")
        rule = allowed(config_class.__dataclass_fields__[name].metadata)
        line = f"  {flags[name]:<{flag_width}}  {kinds[name]:<{type_width}}  {helps.get(name, '')}"
        line += f" [{rule}]" if rule else ""
        width = max(len(indent) + 40, 118)
        print(textwrap.fill(line, width=width, subsequent_indent=indent).rstrip())


def parse_config(config_class, argv=None, renamed=None, base=None):
    """A `config_class` from its defaults, then config files, then --name=value flags. renamed:
    {old name: new name}, the old one taken with a notice. base: values in place of the defaults
    and the config files (a resumed run's own settings): only flags change them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    renamed = renamed or {}
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    defaults = {n: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for n, f in fields.items()}
    if "-h" in argv or "--help" in argv:
        try:
            print_help(config_class, defaults, hints)
        except BrokenPipeError:  # `--help | head` closed the pipe: nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

    values, overrides = dict(defaults), _overrides(argv, hints, renamed)
    if base is not None:
        values.update((name, value) for name, value in base.items() if name in fields)
        overrides = [override for override in overrides if override[2] == "command line"]
    for name, value, where in overrides:
        if name in renamed and name not in fields:
            new = renamed[name]
            print(f"notice: --{name} is now --{new}; taking it as --{new}={value}", file=sys.stderr)
            name = new
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean --{close[0]}?" if close else "run with --help to see the settings"
            raise UserError(f"unknown setting '{name}' ({where}); {hint}")
        values[name] = _coerce(name, value, hints[name], defaults[name])
    return check_settings(config_class(**values))


def _overrides(argv, hints, renamed):
    """[(name, value, where it was set)] from config files and --name=value flags, in order."""
    overrides = []
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise UserError(f"unexpected argument '{arg}': give a config file (*.py) "
                                f"or --name=value")
            overrides += [(name, value, arg) for name, value in read_config_file(arg).items()]
            continue
        name, eq, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        # a bare --flag switches a boolean on; any other setting needs its value
        if not eq:
            target = renamed.get(name, name) if name not in hints else name
            if target in hints and hints[target] is not bool:
                raise UserError(f"--{name} needs a value: --{name}=VALUE")
            text = "True"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a Latin-1 terminal's bytes, kept as lone surrogates
            bad = ord(text[e.start]) - 0xDC00
            raise UserError(f"--{name} is not UTF-8 text (byte {bad:#04x} at character {e.start}): "
                            f"set the terminal to UTF-8, or write the value in a config file") \
                from None
        value = text if hints.get(name) is str else _parse_flag_value(text)
        try:
            overrides.append((name, _bounded(value), "command line"))
        except ValueError as e:
            raise UserError(f"--{name}: {e}")
    return overrides


# ----------------------------------------------------------------------------- allowed values

def setting(default, *, low=None, high=None, above=None, below=None, choices=None):
    """A dataclass field with the values it allows, checked by parse_config and shown by --help:
    low/high inclusive, above/below exclusive, or choices.  setting(0.1, low=0, below=1)"""
    rules = {"low": low, "high": high, "above": above, "below": below, "choices": choices}
    metadata = {k: v for k, v in rules.items() if v is not None}
    return dataclasses.field(default=default, metadata=metadata)


# a setting's bounds: the word --help shows, and the test
BOUNDS = {"low": (">=", operator.ge), "above": (">", operator.gt), "high": ("<=", operator.le),
          "below": ("<", operator.lt)}


def allowed(metadata):
    """The values a setting allows, in words: {"low": 1, "high": 65535} -> ">= 1 and <= 65535"."""
    if "choices" in metadata:
        return "one of " + ", ".join(map(str, metadata["choices"]))

    def shown(n):
        big_power_of_two = isinstance(n, int) and n > 2**20 and n & (n - 1) == 0
        return f"2**{n.bit_length() - 1}" if big_power_of_two else n
    return " and ".join(f"{word} {shown(metadata[k])}" for k, (word, _) in BOUNDS.items()
                        if k in metadata)


def check_allowed(name, value, metadata):
    """A UserError unless value is one the setting allows (see setting())."""
    if value is None:
        return
    inside = all(test(value, metadata[k]) for k, (_, test) in BOUNDS.items() if k in metadata)
    if not (inside and value in metadata.get("choices", (value,))):
        raise UserError(f"--{name} must be {allowed(metadata)}, got {value!r}")


def check_settings(config):
    """config itself, after checking every setting against what its field allows (see setting())."""
    for field in dataclasses.fields(config):
        check_allowed(field.name, getattr(config, field.name), field.metadata)
    return config
