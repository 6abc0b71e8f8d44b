"""`moesim` console script: argparse subcommands, one module per verb.

Each verb lives in `moesim/cmd_<verb>.py` and provides
    HELP: str                        one line for `moesim --help`
    add_arguments(parser) -> None    its options (keep module imports light: torch etc.
                                     are imported inside run())
    run(args) -> int                 the exit code
Errors the user can fix (bad config, bad trace, bad topology, bad arguments) are raised as
the packages' own exception types; main() turns them into one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# Order is the order `moesim --help` lists them in.
VERBS = [
    "demo",
    "model",
    "train",
    "profile",
    "parse",
    "overlap",
    "cluster",
    "calibrate",
    "simulate",
    "validate",
    "sweep",
    "dashboard",
]


class UsageError(ValueError):
    """A command-line value that parses but makes no sense (raised by cmd_* modules)."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input", not "bug". Imported lazily."""
    types: list[type[BaseException]] = [UsageError]
    for module_name, attr in [
        ("model.config", "ConfigError"),
        ("traces.errors", "TraceError"),
        ("simulator.errors", "SimulationError"),
        ("dashboards.errors", "DashboardError"),
    ]:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            types.append(getattr(module, attr))
    return tuple(types)


def _verb_modules() -> dict[str, object]:
    modules = {}
    for verb in VERBS:
        name = f"moesim.cmd_{verb}"
        if importlib.util.find_spec(name) is not None:
            modules[verb] = importlib.import_module(name)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Profile and simulate Mixture-of-Experts compute and communication "
        "(LongCat-Flash and friends).",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, module in _verb_modules().items():
        # argparse %-formats help strings; a verb's HELP is plain text.
        p = sub.add_parser(verb, help=module.HELP.replace("%", "%%"), description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`moesim model | head`): stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:  # noqa: BLE001 - filtered right below
        if isinstance(err, _user_error_types()):
            print(f"moesim {args.verb}: {err}", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and err.filename:
            # "PATH: reason", like the packages' own errors (not "[Errno 2] ...: 'PATH'")
            print(f"moesim {args.verb}: {err.filename}: {(err.strerror or str(err)).lower()}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
