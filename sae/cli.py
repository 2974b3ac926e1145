"""The `sae` command line: parses options and dispatches to the command modules.

Every mistake a user can make ends as one line on stderr naming the problem and the fix, with a
non-zero exit code; finished work (checkpoints, run folders) is never deleted on the way out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from activations.errors import UserError

# Subcommand name -> module under sae/commands defining HELP, DESCRIPTION, add_options(parser) and run(args).
COMMANDS = {
    "train": "train",
    "eval": "evaluate",
    "inspect": "inspect",
    "steer": "steer",
    "cache": "cache",
    "export": "export",
    "catalogue": "catalogue",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae",
        description="saelab: train sparse autoencoders on language-model activations and find out what their features do.",
        epilog="Start with 'sae train' (embedded SmolLM2-135M on wikitext-2, offline, a few minutes on CPU).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = _command_module(name)
        module.add_options(sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return parser


def _command_module(name: str):
    return importlib.import_module(f"sae.commands.{COMMANDS[name]}")


def _apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Options from --config become defaults, so anything given on the command line still wins."""
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; check the path given to --config.")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(path.read_text()) or {}
        else:
            values = json.loads(path.read_text())
    except Exception as e:
        raise UserError(f"config file {path} could not be parsed ({type(e).__name__}: {e}); fix its syntax.") from e
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value.")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(vars(args)) - {"config"})
    if unknown:
        raise UserError(f"config file {path} has unknown options {unknown}; see 'sae {args.command} --help' for valid ones.")
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's own parser
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "config", None):
            args = _apply_config_file(parser, args, argv)
        _command_module(args.command).run(args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; finished checkpoints are kept (continue a training run with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
