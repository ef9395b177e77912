"""The `tbptt` command line: one subcommand per job, each defined in the module that does the work.

    tbptt train        train a recurrent network with TBPTT(k1, k2) (app/train.py)
    tbptt sample       generate text from a trained character model (app/sample.py)
    tbptt explain      draw a TBPTT(k1, k2) schedule (app/explain_command.py)
    tbptt bias         measure truncation's gradient bias vs exact BPTT (app/bias_commands.py)
    tbptt suggest-k    choose k2 from the decay of the gradient over lags (app/bias_commands.py)

A subcommand module defines `add_<name>_arguments(parser)` and `run_<name>(args) -> int`, and
imports torch, matplotlib or tqdm only inside the functions that need them. Bad input is a
tbptt.InputError, raised where the input is read (the library's checks, the configuration, the
files): it becomes one line on stderr and exit status 2. A tbptt.errors.DistributedError (under
torchrun, another process died or stopped answering) becomes one line and exit status 1. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
from collections.abc import Sequence

from ..errors import DistributedError, InputError

# (command, module, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    (
        "train",
        "tbptt.app.train",
        "train a recurrent network with TBPTT(k1, k2) on text, numbers or a task",
    ),
    ("sample", "tbptt.app.sample", "generate text from a trained character model"),
    (
        "explain",
        "tbptt.app.explain_command",
        "draw which steps each TBPTT(k1, k2) update backpropagates",
    ),
    (
        "bias",
        "tbptt.app.bias_commands",
        "measure the gradient bias of truncation against exact BPTT",
    ),
    ("suggest-k", "tbptt.app.bias_commands", "choose k2 from the decay of the gradient over lags"),
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the long usage block is one `--help` away."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _function(module: str, prefix: str, command: str):
    mod = importlib.import_module(module)
    return getattr(mod, f"{prefix}_{command.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tbptt",
        description=(
            "Train recurrent networks with backpropagation through time (BPTT) and truncated "
            "BPTT(k1, k2): every k1 steps, backpropagate over the last k2 steps."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"tbptt {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for command, module, help_text in COMMANDS:
        try:
            add = _function(module, "add", command + "_arguments")
        except (ImportError, AttributeError):
            continue  # a command whose module is not part of this installation
        p = sub.add_parser(
            command,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # a path that is not UTF-8 (Python's surrogates for its bytes) is printed as its bytes, as ls
    # prints it, whatever the locale's error handler
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    run = _function(args._module, "run", args.command)
    try:
        return int(run(args) or 0)
    except BrokenPipeError:  # `tbptt ... | head`: the reader left; not the user's error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except InputError as exc:
        print(f"tbptt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:  # under torchrun: another process died or stopped answering
        print(f"tbptt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tbptt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
