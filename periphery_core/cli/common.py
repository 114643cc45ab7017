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
from typing import TYPE_CHECKING, Any, TypeVar

import click

from periphery_core import __version__
from periphery_core.errors import PeripheryError
from periphery_core.model.loading import LoadedModel
from periphery_core.wire.protocol import MAX_WORKERS

if TYPE_CHECKING:
    from periphery_core.cluster.events import Event

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    """Print `message` as the one error line on stderr and exit with `code`."""
    from rich.text import Text

    from periphery_core.cli.render import err_console

    err_console.print(Text.assemble(("error:", "bold red"), f" {message}"), soft_wrap=True)
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
        help="Concrete shape of an input, e.g. tokens=1x128, or the size of a symbolic "
             "dimension, e.g. past_sequence_length=16 (repeatable). Dims neither given nor "
             "declared by the model (genai_config.json, config.json, metadata) default to 1 "
             "(cache lengths to 0).",
    )(fn)


def json_option(fn: F) -> F:
    """The `--json` flag: print JSON for scripts."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def device_option_for(nodes: str) -> Callable[[F], F]:
    """--device for the nodes a command starts (`nodes` names them in the help)."""
    return click.option(
        "--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
        help=f"What {nodes} run their stages on (cuda: the CUDA execution provider, the CPU "
             "for what it lacks).")


def workers_option_for(nodes: str) -> Callable[[F], F]:
    """--workers for the nodes a command starts (`nodes` names them in the help)."""
    return click.option(
        "--workers", type=click.IntRange(1, MAX_WORKERS), default=None, metavar="N",
        help=f"Requests each of {nodes} computes at once (default: 1 on a CPU, 4 on CUDA); "
             "on a CPU each node's threads are shared out among them.")


device_option = device_option_for("the --local nodes")
workers_option = workers_option_for("the --local nodes")


def local_only(local: bool, device: str, workers: int | None = None,
               peers: Sequence[str] = (), keys: Path | None = None) -> None:
    """--device and --workers checked: a device there is, and --local to start the nodes
    they describe (a node started by hand takes its own); --peer and --keys, which name nodes
    started apart and their keys, not with --local (which starts nodes and keys of its own)."""
    from periphery_core.runtime.gpu import parse_device

    if local and (peers or keys is not None):
        option = "--peer" if peers else "--keys"
        raise PeripheryError(f"--local starts nodes with keys of their own, and {option} is for "
                             "nodes started apart: give one or the other")

    parse_device(device)
    for given, option in ((device != "cpu", "--device"), (workers is not None, "--workers")):
        if given and not local:
            raise PeripheryError(f"{option} sets the --local nodes' {option[2:]}: give it "
                                 f"with --local (a node started by hand takes "
                                 f"'periphery-node {option}')")


def warn_cpu_fallback(device: str, providers: Sequence[tuple[int, str | None]]) -> None:
    """One warning line when --device asked for CUDA but stages (stage, provider) ran on the
    CPU."""
    on_cpu = sorted({str(stage) for stage, provider in providers
                     if device != "cpu" and provider not in (None, "CUDAExecutionProvider")})
    if on_cpu:
        from periphery_core.cli.render import err_console

        err_console.print(f"warning: --device {device}, but stage {', '.join(on_cpu)} ran on "
                          "the CPU: no GPU was usable (onnxruntime-gpu in place of onnxruntime, "
                          "and an NVIDIA driver; see the README)", soft_wrap=True,
                          highlight=False)


def tell_pipeline_news(event: Event, failures: bool = True) -> None:
    """Say on stderr, one line each, what happens to a serving pipeline that whoever runs the
    command should read as it happens: a recovery starting and done, a local node that exited
    (and was started again), a spreading back, a rebalance, and (unless the command ends with
    that error anyway) a recovery that failed. For a bus subscription (`master.bus.subscribe`)."""
    from periphery_core.cli.render import err_console
    from periphery_core.cluster import events as ev

    if isinstance(event, (ev.RecoveryStarted, ev.Recovered, ev.NodeExited, ev.SpreadBack,
                          ev.Rebalanced)) or (failures and isinstance(event, ev.RecoveryFailed)):
        err_console.print(ev.describe(event), soft_wrap=True, highlight=False)


def inputs_option(fn: F) -> F:
    """The `--inputs FEEDS.npz` option: real input values, one array per model input."""
    return click.option(
        "--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
        metavar="FEEDS.npz",
        help="A .npz with one array per model input. Shapes come from it, and where the graph "
             "can only be typed by running it (control flow on input values) it runs on these "
             "(default: seeded random data).",
    )(fn)


def input_specs(loaded: LoadedModel, input_shapes: Sequence[str] | dict,
                inputs: Path | None = None):
    """The model's inputs at the given shapes (or those of the `.npz` of feeds), and the feeds.

    For commands that need the inputs but not a typed graph (quantize, evaluate): nothing runs.
    """
    from periphery_core.model.shapes import parse_input_shapes, resolve_input_shapes
    from periphery_core.runtime.feeds import load_npz

    shapes = input_shapes if isinstance(input_shapes, dict) else parse_input_shapes(input_shapes)
    specs, _ = resolve_input_shapes(loaded, shapes)
    if inputs is None:
        return specs, None
    feeds = load_npz(inputs, specs)
    shapes = {**shapes, **{n: tuple(v.shape) for n, v in feeds.items()}}
    return resolve_input_shapes(loaded, shapes)[0], feeds


def load_and_analyze(model: Path | LoadedModel, input_shapes: Sequence[str] | dict,
                     profile: bool = False, inputs: Path | None = None):
    """Load a model (unless given loaded) and analyse it at the given input shapes.

    Args:
        model: an .onnx path (or a model folder) or an already loaded model.
        input_shapes: `NAME=DIMS` strings from the command line, or a name -> shape dict.
        profile: also measure each node's time in ONNX Runtime.
        inputs: a `.npz` of real input values; the analysis takes its shapes from them and
            types the graph by running on them.

    Returns:
        (the loaded model, its analysis).
    """
    from periphery_core.model import load_model
    from periphery_core.model.analysis import analyze
    from periphery_core.model.profile import profile_model
    from periphery_core.model.shapes import parse_input_shapes

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    shapes = input_shapes if isinstance(input_shapes, dict) else parse_input_shapes(input_shapes)
    _, feeds = input_specs(loaded, shapes, inputs)  # (the analysis takes shapes from feeds)
    analysis = analyze(loaded, shapes, feeds=feeds)
    if profile:
        analysis = profile_model(loaded, analysis, feeds=feeds)
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
