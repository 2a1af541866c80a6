"""The ``metad2a`` command: a thin typer layer over the library.

Each subcommand lives in its own module and imports torch-heavy code inside its function,
so ``metad2a --help`` answers without loading torch.
"""

from __future__ import annotations

import os
import sys

import typer

from .._version import __version__
from ..errors import UserError
from . import cell, db, encode, export, fit, search, train
from .common import print_error, reflowed

app = typer.Typer(
    name="metad2a",
    help=(
        "Pick a NAS-Bench-201 architecture for an image dataset in seconds (MetaD2A).\n\n"
        "Example: metad2a export --arch 1462 --format onnx -o model.onnx"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metad2a {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


app.command("search")(reflowed(search.search))
app.command("cell")(reflowed(cell.cell))
app.command("fit")(reflowed(fit.fit))
app.command("export")(reflowed(export.export))
app.command("encode")(reflowed(encode.encode))
app.command("train")(reflowed(train.train))
app.add_typer(db.app, name="db")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of exiting (for tests and embedding)."""
    # Set before torch loads OpenMP: idle worker threads then sleep instead of spinning.
    # On a 2-core machine busy with other work, spinning made encoding 4x slower
    # (docs/encoder.md). An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = db.ray_address_optional(sys.argv[1:] if argv is None else argv)
    try:
        # Not standalone: the parser's own errors (an unknown option, a value that is no
        # number) come here, to be printed as one line like ours instead of a boxed panel.
        code = app(args=argv, prog_name="metad2a", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except UserError as err:
        print_error(str(err))
        return err.exit_code
    except OSError as err:
        # A path check or read the command did not foresee (a name too long, an unreadable
        # disk): the message names the file; a traceback would add nothing for the user.
        where = f"{err.filename}: " if err.filename else ""
        print_error(f"{where}{err.strerror or err}")
        return UserError.exit_code
    except Exception as err:
        if not _parser_error(err):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # the help is printed already
            return err.exit_code
        ctx = getattr(err, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        print_error(f"{err.format_message().rstrip('.')}{hint}")
        return err.exit_code
    return 0


def _parser_error(err: Exception) -> bool:
    """Whether ``err`` is the command-line parser's (click's, or the copy of click that typer
    carries from 0.29 on): a usage mistake, with its message and exit code."""
    return hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int)


def main() -> None:
    sys.exit(run())
