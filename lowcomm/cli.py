"""The ``lowcomm`` command line.

    lowcomm simulate                 # compare algorithms on the built-in task
    lowcomm join [--peers MULTIADDR] # train as a volunteer node of a swarm
    lowcomm plan --params 1B --step-time 2s --bandwidth 100Mbit
    lowcomm env                      # versions to paste into a bug report
    lowcomm --version

Options of `simulate` and `plan` are built from `lowcomm.config`'s dataclasses;
precedence is flag > --config FILE.toml > default, and every setting that
differs from its default is printed once. ``LOWCOMM_LOG=info`` (or ``debug``)
prints lowcomm's log lines at that level to standard error: every round's
phases, sends that failed, deadlines.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import MISSING, fields
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lowcomm
from lowcomm.config import ConfigError, JoinConfig, PlanConfig, SimulateConfig, load_toml, merge

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train one model across many machines over slow links (DiLoCo, Streaming DiLoCo, NoLoCo, "
                       "SparseLoCo).")
console = Console()
err = Console(stderr=True)


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"lowcomm {lowcomm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """lowcomm: DiLoCo-style training with compressed, fault-tolerant communication."""


def fail(message: str) -> None:
    """One line on stderr, exit code 2, no traceback."""
    err.print(f"[bold red]error[/]: {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def command_from(cls, name: str, run: Callable, help: str) -> None:
    """Register command ``name`` whose options are the fields of dataclass ``cls``
    (plus ``--config FILE.toml``); ``run(config)`` does the work."""
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                default=typer.Option(None, "--config", help="TOML file of settings (flags win)."))]
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not MISSING else str
        text = escape(f"{f.metadata.get('help', '')} [default: {f.default!r}]")  # help is rich markup
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if kind is bool else [flag]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                        default=typer.Option(None, *decls, help=text, show_default=False)))

    def command(**kwargs):
        try:
            file_values = load_toml(kwargs.pop("config")) if kwargs.get("config") else {}
            kwargs.pop("config", None)
            config, notes = merge(cls, file_values, kwargs)
            for note in notes:
                console.print(f"[dim]setting {note}[/]", highlight=False)
            run(config)
        except ConfigError as e:
            fail(str(e))

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    app.command(name)(command)


def _simulate(config: SimulateConfig) -> None:
    from lowcomm.sim.simulate import simulate

    simulate(config, console)


def _plan(config: PlanConfig) -> None:
    from lowcomm.sim.plan_cli import run_plan

    run_plan(config, console)


def _join(config: JoinConfig) -> None:
    from lowcomm.join.node import Node, Refused

    if config.nproc_per_node > 1:  # G rank processes (lowcomm.join.launch); they print their own errors
        from lowcomm.join.launch import Launcher

        code = Launcher(config, console).run()
        if code:
            raise typer.Exit(code)
        return
    try:
        Node(config, console).run()
    except Refused as e:
        fail(str(e))


command_from(JoinConfig, "join", _join,
             "Join a training swarm as a volunteer (or start one): catch up from peers, train, sync, checkpoint. "
             "With no --peers it starts a new swarm and prints the exact command others should run. Ctrl+C or "
             "SIGTERM leaves cleanly with a checkpoint; a second Ctrl+C quits at once.")
command_from(SimulateConfig, "simulate", _simulate,
             "Train the built-in task (or yours) with N simulated workers and compare algorithms: loss, bytes on "
             "the wire, and the wall clock and compute utilisation a network model predicts. With no options: "
             "tinylm, 4 workers, IID shards, ddp vs diloco vs streaming (fp4) vs noloco vs sparseloco. "
             "Writes runs/<name>/.")
command_from(PlanConfig, "plan", _plan,
             "Predict each algorithm's compute utilisation for a model size, step time and network, and the "
             "least bandwidth at which it reaches 95%. No training; the same network model as simulate.")


@app.command()
def env() -> None:
    """Print the versions of Python, torch, hivemind, libp2p and the platform (for bug reports)."""
    from lowcomm.envinfo import environment

    table = Table(show_header=False, box=None)
    for k, v in environment().items():
        table.add_row(k, v)
    console.print(table)


def main() -> None:
    from lowcomm.logs import configure_from_env

    problem = configure_from_env()
    if problem:
        err.print(problem)
        raise SystemExit(2)
    app()


if __name__ == "__main__":
    main()
