"""What every `periphery` subcommand shares: the click group, the one error path, options.

Subcommand modules (`partition`, `cluster`, `quantize`) register their commands on `cli` when
imported; `main` imports them all. Errors are one line on stderr and exit 2 (`handle_errors`,
`run_click`); set PERIPHERY_DEBUG=1 to see a traceback for unexpected failures.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from periphery_core import __version__
from periphery_core.errors import PeripheryError
from periphery_core.model.loading import LoadedModel

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    """Print `message` as the one error line on stderr and exit with `code`."""
    from periphery_core.cli.render import err_console

    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn a command's errors into one line and an exit code (the one error path)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeripheryError as exc:
            fail(exc.message)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            fail("out of memory: try smaller input shapes or fewer in flight")
        except OSError as exc:  # a path of the user's that cannot be read or written
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}: check that the path exists and that you "
                 "may read or write it")
        except Exception as exc:  # a bug of ours: one line, traceback on request
            if os.environ.get("PERIPHERY_DEBUG"):
                raise
            fail(f"internal error ({type(exc).__name__}: {exc}); set PERIPHERY_DEBUG=1 "
                 "for a traceback and please report it")
        return None

    return wrapper  # type: ignore[return-value]


def model_argument(fn: F) -> F:
    """The MODEL path argument."""
    return click.argument("model", type=click.Path(path_type=Path))(fn)


def input_shape_option(fn: F) -> F:
    """The repeatable `--input-shape NAME=DIMS` option."""
    return click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS",
        help="Concrete shape of an input, e.g. tokens=1x128 (repeatable). Symbolic dims "
             "not given default to 1.",
    )(fn)


def json_option(fn: F) -> F:
    """The `--json` flag: print JSON for scripts."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def load_and_analyze(model: Path | LoadedModel, input_shapes: Sequence[str] | dict,
                     profile: bool = False):
    """Load a model (unless given loaded) and analyse it at the given input shapes.

    Args:
        model: an .onnx path or an already loaded model.
        input_shapes: `NAME=DIMS` strings from the command line, or a name -> shape dict.
        profile: also measure each node's time in ONNX Runtime.

    Returns:
        (the loaded model, its analysis).
    """
    from periphery_core.model import analyze, load_model
    from periphery_core.model.profile import profile_model
    from periphery_core.model.shapes import parse_input_shapes

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    shapes = input_shapes if isinstance(input_shapes, dict) else parse_input_shapes(input_shapes)
    analysis = analyze(loaded, shapes)
    if profile:
        analysis = profile_model(loaded, analysis)
    return loaded, analysis


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="periphery")
def cli() -> None:
    """Periphery: split an ONNX model into shards and run them as a pipeline."""


def run_click(command: click.Command, prog: str) -> None:
    """Run a click command with its usage errors as one line and exit 2."""
    try:
        command.main(prog_name=prog, standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else prog
        fail(f"{exc.format_message()} (see '{where} --help')")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        fail("aborted", 130)
    except click.ClickException as exc:
        fail(exc.format_message())
