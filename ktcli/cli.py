"""ktcli entry point: registers the commands and turns known errors into one `Error:` line + hint."""
from __future__ import annotations

import functools

import typer

from .commands import bench, chat, plan, serve, validate_config
from .errors import KtcliError


def report_error(e: KtcliError) -> None:
    from rich.console import Console
    from rich.markup import escape
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]Error:[/] {escape(e.message)}")
    if e.hint:
        err.print(f"[dim]Hint:[/] {escape(e.hint)}")


def known_errors(fn):
    """A KtcliError anywhere below a command ends it with one line and its exit code, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KtcliError as e:
            report_error(e)
            raise typer.Exit(e.code) from None
    return wrapper


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run large Mixture-of-Experts models on one GPU plus CPU RAM, CUDA graphs on.")
for name, mod, fn in (("chat", chat, chat.chat), ("bench", bench, bench.bench), ("serve", serve, serve.serve),
                      ("plan", plan, plan.plan), ("validate-config", validate_config, validate_config.validate_config)):
    app.command(name, help=mod.__doc__)(known_errors(fn))


def main():
    app()


if __name__ == "__main__":
    main()
