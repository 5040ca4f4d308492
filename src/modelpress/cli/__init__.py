"""The `modelpress` command: compress, prune, quantize, fuse, search, inspect, export, bench, recipes, agent.

One module per command (as optimum's `optimum/commands/`); what they share (options, reporter, output
preparation, printing, error handling) lives in `cli.common`. The commands import nothing heavy until
they run, so `modelpress --help` stays fast.
"""

from __future__ import annotations

import sys
import warnings

import typer

from modelpress.cli import agent, bench, compress, export, fuse, inspect, recipes, search
from modelpress.cli.common import short_warnings, user_errors
from modelpress.system import apply_malloc_setting

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make trained neural networks smaller and faster, and measure what they gained.",
)
for command in (compress.compress, compress.prune, compress.quantize, fuse.fuse, inspect.inspect, export.export,
                bench.bench, recipes.recipes, search.search, agent.agent):
    app.command()(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input (a user error, a command-line mistake, an unwritable output) prints a short
    message and exits with code 2, without a traceback."""
    apply_malloc_setting()  # freed tensors leave the resident set (see system.unmap_large_blocks)
    warnings.showwarning = short_warnings(warnings.showwarning)
    with user_errors():
        code = app(args=argv, prog_name="modelpress", standalone_mode=False)
    # typer (>= 0.20) turns Ctrl-C and typer.Exit(n) into a returned exit code when not standalone
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:
            print("aborted", file=sys.stderr)
        sys.exit(code)


__all__ = ["app", "main"]
