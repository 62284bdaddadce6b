"""The ``lowcomm`` command line.

    lowcomm --version
    lowcomm env            # versions to paste into a bug report
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import lowcomm

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train one model across many machines over slow links (DiLoCo, Streaming DiLoCo, NoLoCo).")
console = Console()


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"lowcomm {lowcomm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """lowcomm: DiLoCo-style training with compressed, fault-tolerant communication."""


@app.command()
def env() -> None:
    """Print the versions of Python, torch, hivemind, libp2p and the platform (for bug reports)."""
    from lowcomm.envinfo import environment

    table = Table(show_header=False, box=None)
    for k, v in environment().items():
        table.add_row(k, v)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
