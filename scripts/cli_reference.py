"""Write docs/cli.md from the command line's own help, so the reference cannot drift.

    python scripts/cli_reference.py            # rewrite docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 if docs/cli.md is out of date (CI)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

from dpcert.cli import main

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    lines = ["# Command-line reference", "",
             "Generated from `dpcert --help` by `scripts/cli_reference.py`; every option, its "
             "meaning and default. User mistakes end in one line on stderr (`dpcert: error: "
             "...`) and exit status 2, with no partial output; warnings about suspicious input "
             "are one `dpcert: warning: ...` line.", ""]
    with click.Context(main, info_name="dpcert", terminal_width=100) as ctx:
        lines += ["```text", main.get_help(ctx), "```", ""]
        for name in sorted(main.list_commands(ctx)):
            cmd = main.get_command(ctx, name)
            with click.Context(cmd, info_name=name, parent=ctx,
                               terminal_width=100) as sub:
                lines += [f"## dpcert {name}", "", "```text", cmd.get_help(sub), "```", ""]
    return "\n".join(lines)


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            sys.exit(1)
        return
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main_()
