"""The `sae` command line: finds the commands, parses options into each command's config tree, runs it.

Each package owns its commands (activations: cache; sae: export; training: train; analysis: eval,
inspect, steer, catalogue), listed in pyproject.toml's `saelab.commands` entry points, so this module,
at the bottom of the import graph, imports none of them. A command module defines:

    HELP, DESCRIPTION   one line for `sae --help`, a paragraph for `sae COMMAND --help`
    Config              its config dataclass tree (activations.options fields): the options
    make_config(values) optional: the Config from what the user gave (default: those values over the
                        defaults); `sae train --resume` and `sae cache` merge a saved config here
    run(cfg)            does the work
    follow_up(cfg, result)  optional: the command lines to run next (train → eval)

Every mistake a user can make ends as one line on stderr naming the problem and the fix, exit code 2,
before any model or text is loaded where the mistake is in the options; finished work is never deleted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points
from types import ModuleType

from activations.errors import UserError
from activations.options import add_options, build, explicit_values, flatten, read_config_file

ENTRY_POINTS = "saelab.commands"
# as `sae --help` lists them
ORDER = (
    "train",
    "eval",
    "bench",
    "compare",
    "sweep",
    "inspect",
    "steer",
    "cache",
    "export",
    "catalogue",
    "heads",
    "neurons",
    "circuit",
    "explain",
)


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError (one line, exit 2) instead of usage text and exit."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def commands() -> dict[str, str]:
    """Command name -> the module that defines it, from the installed entry points."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINTS)}
    if not found:
        raise UserError("no saelab commands are installed; install saelab with `pip install -e .` in its folder.")
    return dict(sorted(found.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


def load_command(name: str) -> ModuleType:
    """The module of command `name`, or a UserError listing the commands."""
    table = commands()
    if name not in table:
        raise UserError(f"unknown command {name!r}; use one of {', '.join(table)} (see 'sae --help').")
    return importlib.import_module(table[name])


def command_parser(name: str, module: ModuleType) -> Parser:
    """The options of one command, made from its Config tree."""
    parser = Parser(prog=f"sae {name}", description=module.DESCRIPTION)
    add_options(parser, module.Config)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON file whose keys set any of these options (the command line wins)",
    )
    return parser


def make_config(name: str, module: ModuleType, argv: list[str]):
    """The command's config from --config FILE and the command line (which wins), validated."""
    args = command_parser(name, module).parse_args(argv)
    values = flatten(module.Config, read_config_file(args.config), f"config file {args.config}") if args.config else {}
    values.update(explicit_values(args))
    if hasattr(module, "make_config"):
        return module.make_config(values)
    return build(module.Config, values)


def print_overview() -> None:
    """`sae` or `sae --help`: the commands, one line each."""
    print("usage: sae COMMAND [options]   (sae COMMAND --help for its options)\n")
    print("saelab: train sparse autoencoders on language-model activations and find out what their features do.\n")
    for name in commands():
        print(f"  {name:<10} {load_command(name).HELP}")
    print("\nStart with 'sae train' (embedded SmolLM2-135M on wikitext-2, offline, a few minutes on CPU).")


def run_command(argv: list[str]) -> None:
    """Parse and run one command line (and the command lines it asks to run next)."""
    name, rest = argv[0], argv[1:]
    module = load_command(name)
    cfg = make_config(name, module, rest)
    result = module.run(cfg)
    for next_argv in module.follow_up(cfg, result) if hasattr(module, "follow_up") else []:
        run_command(next_argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print_overview()
            return 0
        run_command(argv)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or missing folder: name the file and the fix
        where = f" {e.filename}" if e.filename else ""
        print(
            f"error: could not write or read{where}: {e.strerror or e}; check that the folder exists, is "
            "writable and has free space, then run the command again (finished work is kept).",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; finished checkpoints are kept (continue a training run with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
