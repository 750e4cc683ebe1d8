"""
What every script shares with its user: settings, errors they can fix, progress lines, and the files they hand over
or get back.

Each script describes its settings as a dataclass of typed defaults, a comment beside each one, then calls
`parse_config`:

    python train.py config/wikitext_small.py --batch_size=8 --compile=False

A config file is a plain Python file of `name = value` assignments. It is read with `ast`, never executed:
values may be literals, arithmetic on literals, or names assigned earlier in the same file. `--name=value`
flags come after the file and win. Every value is checked against the type of its default and the values its
field allows (`setting`), and an unknown name is an error that suggests the nearest real one. `--help`, anywhere on
the line, prints every setting with its type, its default and the comment written beside it.

Errors a user can fix are raised as `UserError`; `run_main(main)`, where each script starts, prints them as one line
without a traceback. Files a user names are read as UTF-8 (`read_utf8`); files we write are written atomically
(`atomic_write`): a crash leaves the old file or the new one, never half of one.
"""

import ast
import collections
import dataclasses
import difflib
import inspect
import io
import json
import math
import operator
import os
import re
import sys
import textwrap
import time
import tokenize
import types
import typing
from pathlib import Path


class UserError(Exception):
    """A problem with the input that the user can fix; printed as one line, without a traceback."""


def run_main(main):
    """Run main(), turning a UserError, an OSError from the machine (a full disk, a read-only folder) or running out of
    memory into one 'error: ...' line and exit status 2, and Ctrl-C into one 'interrupted' line (with what the script
    says about its files) and exit status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the machine's answer (a full disk, a read-only folder): what it says, and where
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}: make room or choose another folder, then run it again",
              file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # numpy's MemoryError; torch's allocators raise RuntimeError
        if isinstance(e, RuntimeError) and not OUT_OF_MEMORY.search(str(e)):
            raise
        print(f"error: out of memory ({(str(e).splitlines() or ['MemoryError'])[0][:120]}): lower --batch_size or the "
              f"model's size", file=sys.stderr)
        sys.exit(2)


OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|not enough memory")  # CUDA's, the CPU's, MPS's words


def decode_utf8(data, name):
    """bytes -> str, or a UserError naming the file: b'caf\\xc3\\xa9' -> 'café'."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text (byte {e.start}); convert it first")


def read_utf8(path, what="file"):
    """The text of a UTF-8 file the user named, or a UserError that says what is wrong with it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}")
    return decode_utf8(data, f"{what} {path}")


def atomic_write(path, write):
    """Call write(temporary path), then rename the result over `path`: readers (and a crash) see the old file or
    the new one, never half of one. A write that fails leaves no temporary file behind.

        atomic_write("ckpt.pt", lambda tmp: torch.save(checkpoint, tmp))
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path, flag, folder=True):
    """Refuse, before any work, an output path this script could not write: a file where the folder should be, or a
    folder (the one named, else the nearest above it that exists) the user may not write into. folder=False: path is
    a file to write.  check_writable("README.md", "out_dir") -> UserError("--out_dir=README.md is a file: ...")"""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--{flag}={path} is a file: choose a folder")
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--{flag}={path}: {folder} is read-only here: choose a folder you can write into")


def write_json(path, data):
    """Write data as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def duration(seconds):
    """75.4 -> '1m15s'; 4000 -> '1h06m'."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A progress line on stderr with the rate and an ETA, redrawn at most 5 times a second on a terminal and every
    10 s into a log file:  encoding train: 45% (4.9/10.8 MB, 3.1 MB/s, eta 0m02s)"""

    def __init__(self, desc, total, unit="MB", scale=1e6):
        self.desc, self.total, self.unit, self.scale = desc, total, unit, scale
        self.start = self.last = time.time()
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.interval = 0.2 if self.tty else 10.0

    def update(self, done, force=False):
        self.done, now = done, time.time()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        digits = 0 if self.scale == 1 else 1
        size = f"{done / self.scale:,.{digits}f}" + (f"/{self.total / self.scale:,.{digits}f}" if self.total else "")
        text = f"{self.desc}: " + (f"{100 * done / self.total:3.0f}% " if self.total else "") + \
               f"({size} {self.unit}, {rate / self.scale:,.1f} {self.unit}/s"
        if self.total and rate > 0 and done < self.total:
            text += f", eta {duration((self.total - done) / rate)}"
        print(("\r" if self.tty else "") + text + ")", end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self, done):
        self.update(done, force=True)
        if self.tty:
            print(file=sys.stderr)


# ----------------------------------------------------------------------------- worker processes


def cpu_count():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_pool(processes):
    """A multiprocessing pool whose workers leave Ctrl-C to the parent and end when the parent dies (kill -9
    included), instead of waiting forever for work. Forked where the system can (fast to start), else spawned."""
    import multiprocessing
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(processes, initializer=_worker_start, initargs=(os.getpid(),))


def end_pool(pool, wait=5.0):
    """pool.terminate(), waiting for it at most `wait` seconds. After Ctrl-C or an error it can wait forever: a task
    half-written to a worker it kills leaves the pool's feeder thread blocked on the pipe, and it joins that thread.
    By then its workers are gone (it ends them first), so the process may end without it."""
    import threading
    ending = threading.Thread(target=pool.terminate, daemon=True)
    ending.start()
    ending.join(wait)


def _worker_start(parent):
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def end_with_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=end_with_parent, daemon=True).start()


def ordered_map(pool, function, tasks, ahead):
    """function(*task) for each task, run on the pool, results in the order of the tasks, with at most `ahead`
    tasks given out at a time: unlike Pool.imap, which reads every task at once, memory stays bounded.
    Without a pool, each runs here."""
    if pool is None:
        yield from (function(*task) for task in tasks)
        return
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(function, task))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ----------------------------------------------------------------------------- reading values

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}


MAX_INT, MAX_LENGTH = 10**18, 10_000  # a config value beyond these is a mistake, not a setting
TOO_DEEP = "an expression nested too deeply to read: write the value out"


def _size(value):
    """Characters and items in all: 'ab' -> 2; ('ab', 'c') -> 5 (2 items + 3 characters)."""
    if isinstance(value, (list, tuple)):
        return len(value) + sum(map(_size, value))
    return len(value) if isinstance(value, str) else 0


def _bounded(value):
    """value, if it is of a size a setting can have: integers to 1e18, strings and lists to 10,000 characters and
    items in all (nested ones counted)."""
    too_long = _size(value) > MAX_LENGTH
    if isinstance(value, int) and abs(value) > MAX_INT or too_long:
        raise ValueError(f"the value is too large for a setting ({type(value).__name__} beyond "
                         f"{MAX_INT if isinstance(value, int) else f'{MAX_LENGTH} items'})")
    return value


def _safe_eval(node, names):
    """Evaluate a literal, arithmetic on literals, or an earlier name: enough for configs, unable to run code, and
    bounded: 9**9**9 or 'x' * 10**10 is refused before it is computed."""
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _safe_eval(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _safe_eval(node.left, names), _safe_eval(node.right, names)
        if isinstance(node.op, ast.Mod) and isinstance(left, str):  # '%*d' % (10**9, 1) would build 1 GB
            raise ValueError(f"'{ast.unparse(node)[:60]}': string formatting is not supported in a config file")
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and isinstance(left, (int, float)) \
                and abs(left) > 1 and right * math.log10(abs(left)) > 18:
            raise ValueError(f"'{ast.unparse(node)}' is too large for a setting")
        if isinstance(node.op, ast.Mult) and isinstance(left, int) != isinstance(right, int) and \
                any(isinstance(x, (str, list, tuple)) for x in (left, right)):
            count, sequence = (left, right) if isinstance(left, int) else (right, left)
            if count * _size(sequence) > MAX_LENGTH:  # refused before it is built
                raise ValueError(f"'{ast.unparse(node)}' is too large for a setting ({type(sequence).__name__} "
                                 f"beyond {MAX_LENGTH} items)")
        return _bounded(_BINOPS[type(node.op)](left, right))
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_safe_eval(e, names) for e in node.elts]
        return _bounded(items if isinstance(node, ast.List) else tuple(items))
    raise ValueError(f"unsupported expression '{ast.unparse(node)}' (use literals and arithmetic only)")


def read_config_file(path):
    """Return the {name: value} assignments of a config file, without executing it."""
    source = read_utf8(path, "config file")
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}")
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: {TOO_DEEP}") from None
    values = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare string: documentation only
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise UserError(f"{path}:{stmt.lineno}: only 'name = value' assignments are allowed in a config file")
        try:
            values[stmt.targets[0].id] = _safe_eval(stmt.value, values)
        except (ValueError, ArithmeticError) as e:
            raise UserError(f"{path}:{stmt.lineno}: {e}")
        except RecursionError:
            raise UserError(f"{path}:{stmt.lineno}: {TOO_DEEP}") from None
    return values


def _parse_flag_value(text):
    """A command-line value: a Python literal if it reads as one (1e-3, True, None), else the plain string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def type_name(hint):
    """int -> 'int'; tuple[str, ...] -> 'tuple[str, ...]'; Optional[int] -> 'Optional[int]'."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(name, value, hint, default):
    """Check `value` against the declared type of field `name`, converting only where it loses nothing."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] / X | None
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        return value if isinstance(value, str) else str(value)
    elif typing.get_origin(hint) is tuple or hint is tuple:
        if isinstance(value, (tuple, list)):
            return tuple(value)
    else:
        return value
    raise UserError(f"--{name} must be {getattr(hint, '__name__', hint)}, got {value!r} (default is {default!r})")


# ----------------------------------------------------------------------------- --help from the dataclass's comments

def setting_comments(config_class):
    """{field: the comment written beside it} and [(field before which a section starts, section comment)],
    read from the source of the class and of the dataclasses it extends. A comment line that continues the one
    above it (same column) joins it:

        lr: float = 1e-3     # the peak learning rate,
                             # reached after warmup_iters        -> {'lr': 'the peak learning rate, reached ...'}
    """
    helps, sections = {}, []
    for cls in reversed(config_class.__mro__):
        if dataclasses.is_dataclass(cls):
            class_helps, class_sections = _comments_of_one_class(cls)
            helps.update(class_helps)  # a subclass that redefines a field redefines its comment
            sections += class_sections
    return helps, sections


def _comments_of_one_class(cls):
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (an interactive session, a frozen program): names and types only
        return {}, []
    comments = {}  # line index -> (column, text)
    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0] - 1] = (token.start[1], token.string.lstrip("#").strip())
    body = ast.parse(textwrap.dedent("".join(lines))).body[0].body
    field_lines = {node.end_lineno - 1: node.target.id for node in body if isinstance(node, ast.AnnAssign)}
    helps, sections, current, column = {}, [], None, None  # current: the field whose comment may go on below
    for i, line in enumerate(lines):
        if i in field_lines:
            current = field_lines[i] if i in comments else None
            if current is not None:
                helps[current], column = comments[i][1], comments[i][0]
        elif i in comments and not line[:comments[i][0]].strip():  # a line holding only a comment
            if current is not None and comments[i][0] == column:
                helps[current] += " " + comments[i][1]
                continue
            current = None
            following = next((field_lines[j] for j in sorted(field_lines) if j > i), None)
            if following is not None:
                sections.append((following, comments[i][1]))
        else:
            current = None
    return helps, sections


def print_help(config_class, defaults, hints):
    print(f"usage: {Path(sys.argv[0]).name} [config_file.py] [--name=value ...]\n\n"
          "Settings: the defaults below, then a config file (name = value lines), then --name=value flags.")
    helps, sections = setting_comments(config_class)
    section_starts = {}
    for field, text in sections:
        section_starts.setdefault(field, []).append(text)
    rows = [(f"--{n}={v}" if isinstance(v, str) and v else f"--{n}={v!r}", type_name(hints[n]), n)
            for n, v in defaults.items()]
    flag_width = min(36, max(len(flag) for flag, _, _ in rows))
    type_width = max(len(kind) for _, kind, _ in rows)
    indent = " " * (2 + flag_width + 2 + type_width + 2)
    for flag, kind, name in rows:
        for text in section_starts.get(name, []):
            print(f"\n{text}")
        rule = allowed(config_class.__dataclass_fields__[name].metadata)
        line = f"  {flag:<{flag_width}}  {kind:<{type_width}}  {helps.get(name, '')}" + (f" [{rule}]" if rule else "")
        print(textwrap.fill(line, width=max(len(indent) + 40, 118), subsequent_indent=indent).rstrip())


# ----------------------------------------------------------------------------- the one entry point

def parse_config(config_class, argv=None, renamed=None, base=None):
    """Build a `config_class` from defaults, then an optional config file, then --name=value flags. renamed: {old
    name: new name} of settings that were renamed; the old name still works, with a one-line notice. base: values
    that take the place of the defaults and the config file (a resumed run's own settings): only flags change them."""
    argv = sys.argv[1:] if argv is None else list(argv)
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

    overrides = []
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise UserError(f"unexpected argument '{arg}': give a config file (*.py) or --name=value")
            overrides.extend((name, value, arg) for name, value in read_config_file(arg).items())
        else:
            name, eq, text = arg[2:].partition("=")
            name = name.replace("-", "_")
            if not eq:  # a bare --flag switches a boolean on; any other setting needs its value
                target = renamed.get(name, name) if renamed and name not in hints else name
                if target in hints and hints[target] is not bool:
                    raise UserError(f"--{name} needs a value: --{name}=VALUE")
                text = "True"
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # bytes a Latin-1 terminal sent, kept by Python as lone surrogates
                bad = ord(text[e.start]) - 0xDC00
                raise UserError(f"--{name} is not UTF-8 text (byte {bad:#04x} at character {e.start}): set the "
                                f"terminal to UTF-8, or write the value in a config file") from None
            value = text if hints.get(name) is str else _parse_flag_value(text)
            try:
                overrides.append((name, _bounded(value), "command line"))
            except ValueError as e:
                raise UserError(f"--{name}: {e}")

    values = dict(defaults)
    if base is not None:
        values.update((name, value) for name, value in base.items() if name in fields)
        overrides = [override for override in overrides if override[2] == "command line"]
    for name, value, where in overrides:
        if name in (renamed or {}) and name not in fields:
            print(f"notice: --{name} is now --{renamed[name]}; taking it as --{renamed[name]}={value}", file=sys.stderr)
            name = renamed[name]
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; run with --help to see the settings"
            raise UserError(f"unknown setting '{name}' ({where}){hint}")
        values[name] = _coerce(name, value, hints[name], defaults[name])
    return check_settings(config_class(**values))


def check_settings(config):
    """config itself, after checking every setting against what its field allows (see setting())."""
    for field in dataclasses.fields(config):
        check_allowed(field.name, getattr(config, field.name), field.metadata)
    return config


def setting(default, *, low=None, high=None, above=None, below=None, choices=None):
    """A dataclass field that declares the values it allows, checked by parse_config for every script and shown by
    --help: low/high inclusive, above/below exclusive, or a tuple of choices.

        batch_size: int = setting(16, low=1)                   # sequences per step
        dropout: float = setting(0.1, low=0, below=1)          # --dropout=1 -> error: --dropout must be < 1, got 1.0
    """
    rules = {"low": low, "high": high, "above": above, "below": below, "choices": choices}
    return dataclasses.field(default=default, metadata={k: v for k, v in rules.items() if v is not None})


BOUNDS = {"low": (">=", operator.ge), "above": (">", operator.gt), "high": ("<=", operator.le),
          "below": ("<", operator.lt)}  # a setting's bounds: the word --help shows, and the test


def allowed(metadata):
    """The values a setting allows, in words: {"low": 1, "high": 65535} -> ">= 1 and <= 65535"."""
    if "choices" in metadata:
        return "one of " + ", ".join(map(str, metadata["choices"]))
    power_of_two = lambda n: isinstance(n, int) and n > 2**20 and n & (n - 1) == 0  # noqa: E731
    shown = {k: f"2**{v.bit_length() - 1}" if power_of_two(v) else v for k, v in metadata.items()}
    return " and ".join(f"{word} {shown[k]}" for k, (word, _) in BOUNDS.items() if k in metadata)


def check_allowed(name, value, metadata):
    """A UserError unless value is one the setting allows (see setting())."""
    if value is None:
        return
    inside = all(test(value, metadata[k]) for k, (_, test) in BOUNDS.items() if k in metadata)
    if not (inside and value in metadata.get("choices", (value,))):
        raise UserError(f"--{name} must be {allowed(metadata)}, got {value!r}")
