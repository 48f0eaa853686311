"""Command line: parses argv, builds objects, calls one module's function. Nothing below sees argparse.

Each module of this package adds its commands' parsers and holds their functions."""

from __future__ import annotations

import argparse
import sys

from ..errors import MoepagerError
from .generation import add_chat_plan, add_run
from .measure import add_replay_stats, add_synth_bench
from .serving import add_list_fetch, add_serve, add_top
from .stores import add_convert_verify, add_experts, add_moefy, add_tune


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it (as for None defaults)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default:" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="moepager", description="Run MoE language models larger than memory.")
    p.add_argument("--version", action="version", version=f"moepager {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    add_run(sub)  # the order of `moepager --help`
    add_chat_plan(sub)
    add_serve(sub)
    add_top(sub)
    add_list_fetch(sub)
    add_convert_verify(sub)
    add_experts(sub)
    add_tune(sub)
    add_moefy(sub)
    add_synth_bench(sub)
    add_replay_stats(sub)
    for parser in [p, *sub.choices.values()]:
        parser.formatter_class = _DefaultsFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # a warning is one line, as an error is
            warnings.showwarning = lambda message, *_, **__: print(
                f"moepager: warning: {message}", file=sys.stderr
            )
            args.func(args)
    except MoepagerError as e:
        print(f"moepager: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
