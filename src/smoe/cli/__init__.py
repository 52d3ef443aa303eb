"""The ``smoe`` command line: it parses arguments and calls the library, nothing more.

One module per command group (``smoe.cli.train``, ``smoe.cli.plan``, ...); each exposes
``REGISTER``, the functions that add its subcommands to the parser and set ``handler``. Handlers
import what they need lazily, and building the parser imports no torch, so that ``smoe --help``
answers at once (a command whose options come from a torch-importing module, ``bench``, gets
them only when it is the command being parsed: :func:`wants_full_parser`).

Errors: whatever a user can cause ends in one line ``smoe CMD: error: ...`` on stderr and exit
status 2 (argparse's own usage errors too); ``--debug`` (or ``SMOE_DEBUG=1``) shows the
traceback instead. Ctrl-C outside training exits 130 with one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

from smoe.cli.errors import CLIError

__all__ = ["main", "build_parser", "CLIError", "COMMAND_MODULES", "wants_full_parser"]

Handler = Callable[[argparse.Namespace], int]

#: The command groups, in the order ``smoe --help`` lists them.
COMMAND_MODULES = (
    "smoe.cli.train",
    "smoe.cli.runs",
    "smoe.cli.quantize",
    "smoe.cli.hf",
    "smoe.cli.plan",
    "smoe.cli.route",
    "smoe.cli.bench",
    "smoe.cli.monitor",
    "smoe.cli.serve",
    "smoe.cli.hybrid",
)

#: The command whose parser is being built in full (None: only the light ones).
_FULL: set[str] = set()


def wants_full_parser(command: str) -> bool:
    """Whether ``command``'s heavy options (those needing torch to describe) are wanted."""
    return command in _FULL


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``smoe train: error: ... (see smoe train --help)``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from smoe import __version__

    return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``smoe`` parser. ``command``: the subcommand about to be parsed, whose options are
    then all loaded (without it, a heavy command shows only its name and help)."""
    _FULL.clear()
    if command is not None:
        _FULL.add(command)
    parser = _Parser(
        prog="smoe",
        description="smoe: sparse mixture-of-experts layers, models, training and tools. "
                    "`smoe COMMAND --help` describes a command.",
    )
    parser.add_argument("--version", action="version", version=f"smoe {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (or set SMOE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        for register in importlib.import_module(name).REGISTER:
            register(sub)
    for p in sub.choices.values():  # --debug after the command too; SUPPRESS keeps the top one
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    return parser


#: Subcommands that run long CPU work: the console entry re-executes them with tcmalloc.
_HEAVY_COMMANDS = {"train", "bench", "eval", "generate"}


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _message(exc: BaseException) -> str | None:
    """The one-line message of an error a user can cause (``None``: not one of those)."""
    import errno

    name = type(exc).__name__
    if isinstance(exc, (CLIError, ValueError, FileNotFoundError, FileExistsError,
                        NotADirectoryError, IsADirectoryError)):
        return _one_line(exc)
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or _one_line(exc)}"
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or \
            "out of memory" in str(exc).lower():
        return ("out of memory: try a smaller --batch-size (or --grad-accum), a smaller model "
                "or --seq-len, or --dtype bfloat16")
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on the device: free some disk space and run it again"
        return _one_line(exc)
    if name == "SafetensorError" or "safetensors" in type(exc).__module__:
        return f"a safetensors file is damaged or unreadable: {_one_line(exc)}"
    if isinstance(exc, (UnicodeDecodeError, ImportError)):
        return _one_line(exc)
    if isinstance(exc, RuntimeError) and ("size mismatch" in str(exc)
                                          or "Error(s) in loading" in str(exc)):
        return f"the weights do not fit the model config: {_one_line(exc)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(args_in)
    parser = build_parser(command)
    try:
        args = parser.parse_args(args_in)
    except SystemExit as exit_:  # --help, --version (0) or a usage error (2, one usage line)
        return int(exit_.code or 0)
    debug = bool(getattr(args, "debug", False))
    if not debug:
        from smoe.cli.options import env_debug

        debug = env_debug()
    if argv is None and args.command in _HEAVY_COMMANDS:
        from smoe.launch import reexec_with_tcmalloc

        reexec_with_tcmalloc()
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except BrokenPipeError:  # e.g. `smoe plan ... | head`: the reader left, not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"\nsmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error ends in one line unless --debug
        if debug:
            traceback.print_exc()
        message = _message(exc)
        if message is not None:
            print(f"smoe {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(f"smoe {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(run with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1
