"""
Configuration and error handling shared by every script.

Each script describes its settings as a dataclass of typed defaults, then calls `parse_config`:

    python train.py config/wikitext_small.py --batch_size=8 --compile=False

A config file is a plain Python file of `name = value` assignments. It is read with `ast`, never executed:
values may be literals, arithmetic on literals, or names assigned earlier in the same file. `--name=value`
flags come after the file and win. Every value is checked against the type of its default, and an unknown
name is an error that suggests the nearest real one.

Errors a user can fix are raised as `UserError`; `run_main` prints them as one line, without a traceback.
"""

import ast
import dataclasses
import difflib
import operator
import sys
import types
import typing


class UserError(Exception):
    """A problem with the input that the user can fix; printed as one line, without a traceback."""


def run_main(main):
    """Run main(), turning a UserError into one 'error: ...' line and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _excepthook(kind, value, tb, _default=sys.excepthook):
    """Scripts written top to bottom (like train.py) get the same one-line errors without a wrapper."""
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
    else:
        _default(kind, value, tb)


sys.excepthook = _excepthook


# ----------------------------------------------------------------------------- reading values

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}


def _safe_eval(node, names):
    """Evaluate a literal, arithmetic on literals, or an earlier name: enough for configs, unable to run code."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _safe_eval(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_safe_eval(node.left, names), _safe_eval(node.right, names))
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_safe_eval(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    raise ValueError(f"unsupported expression '{ast.unparse(node)}' (use literals and arithmetic only)")


def read_config_file(path):
    """Return the {name: value} assignments of a config file, without executing it."""
    try:
        source = open(path, encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}")
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}")
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
    return values


def _parse_flag_value(text):
    """A command-line value: a Python literal if it reads as one (1e-3, True, None), else the plain string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        return value if isinstance(value, str) else str(value)
    elif typing.get_origin(hint) is tuple or hint is tuple:
        if isinstance(value, (tuple, list)):
            return tuple(value)
    else:
        return value
    raise UserError(f"--{name} must be {getattr(hint, '__name__', hint)}, got {value!r} (default is {default!r})")


# ----------------------------------------------------------------------------- the one entry point

def parse_config(config_class, argv=None):
    """Build a `config_class` from defaults, then an optional config file, then --name=value flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    defaults = {n: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for n, f in fields.items()}

    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {sys.argv[0]} [config_file.py] [--name=value ...]\n\nsettings and their defaults:")
        for n, v in defaults.items():
            print(f"  --{n}={v!r}")
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
            if not eq:  # a bare --flag switches a boolean on
                text = "True"
            value = text if hints.get(name) is str else _parse_flag_value(text)
            overrides.append((name, value, "command line"))

    values = dict(defaults)
    for name, value, where in overrides:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; run with --help to see the settings"
            raise UserError(f"unknown setting '{name}' ({where}){hint}")
        values[name] = _coerce(name, value, hints[name], defaults[name])
    return config_class(**values)


def config_to_dict(config):
    """A plain dict of a config dataclass, for printing and for saving beside a checkpoint."""
    return dataclasses.asdict(config)
