"""`periphery`: every step headless, so a plan made in the app runs in a script.

Exit codes: 0 success, 1 a check failed (verify found a difference), 2 bad input. Errors are one
line on stderr; set PERIPHERY_DEBUG=1 to see a traceback for unexpected failures.
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
from periphery_core.errors import PeripheryError, PlanError
from periphery_core.model.loading import LoadedModel

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 2) -> None:
    from periphery_core.cli.render import err_console

    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeripheryError as exc:
            _fail(exc.message)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoryError:
            _fail("out of memory: try smaller input shapes or fewer in flight")
        except OSError as exc:  # a path of the user's that cannot be read or written
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}: check that the path exists and that you "
                  "may read or write it")
        except Exception as exc:  # a bug of ours: one line, traceback on request
            if os.environ.get("PERIPHERY_DEBUG"):
                raise
            _fail(f"internal error ({type(exc).__name__}: {exc}); set PERIPHERY_DEBUG=1 "
                  "for a traceback and please report it")
        return None

    return wrapper  # type: ignore[return-value]


def model_argument(fn: F) -> F:
    return click.argument("model", type=click.Path(path_type=Path))(fn)


def input_shape_option(fn: F) -> F:
    return click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS",
        help="Concrete shape of an input, e.g. tokens=1x128 (repeatable). Symbolic dims "
             "not given default to 1.",
    )(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def _analysis(model: Path | LoadedModel, input_shapes: Sequence[str] | dict,
              profile: bool = False):
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


@cli.command()
@model_argument
@input_shape_option
@click.option("--profile", is_flag=True, help="Measure each node's time in ONNX Runtime.")
@click.option("--top", default=20, show_default=True, help="How many costly nodes to list.")
@json_option
@handle_errors
def analyze(model: Path, input_shapes: tuple[str, ...], profile: bool, top: int,
            as_json: bool) -> None:
    """Show a model's inputs, outputs, op histogram and per-node costs."""
    from periphery_core.cli.render import analysis_dict, print_json, render_analysis

    _, analysis = _analysis(model, input_shapes, profile)
    if as_json:
        print_json(analysis_dict(analysis))
    else:
        render_analysis(analysis, top)


def _make_plan(model: Path, shards: int, strategy: str, devices: Path | None,
               profile: bool, input_shapes: Sequence[str]):
    from periphery_core.partition.costs import make_plan
    from periphery_core.partition.plan import load_devices

    loaded, analysis = _analysis(model, input_shapes, profile)
    devs = load_devices(devices) if devices is not None else None
    plan = make_plan(analysis, shards, strategy=strategy, devices=devs, use_profile=profile)
    return loaded, analysis, plan


strategy_option = click.option(
    "--strategy", type=click.Choice(["balanced", "even", "spectral"]), default="balanced",
    show_default=True, help="balanced: optimal bottleneck; even: equal node counts; "
    "spectral: spectral clustering repaired into contiguous stages.",
)
devices_option = click.option(
    "--devices", type=click.Path(path_type=Path), default=None,
    help="TOML/JSON file of [[device]] tables (name, speed, memory, bandwidth), in order.",
)


@cli.command()
@model_argument
@click.option("--shards", "-k", type=int, required=True, help="Number of pipeline stages.")
@strategy_option
@devices_option
@click.option("--profile", is_flag=True, help="Plan with measured node times, not FLOPs.")
@input_shape_option
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Plan file to write (.json or .toml).")
@json_option
@handle_errors
def plan(model: Path, shards: int, strategy: str, devices: Path | None, profile: bool,
         input_shapes: tuple[str, ...], output: Path, as_json: bool) -> None:
    """Plan K pipeline stages and write the plan file."""
    from periphery_core.cli.render import plan_summary, print_json, render_plan

    _, _, shard_plan = _make_plan(model, shards, strategy, devices, profile, input_shapes)
    shard_plan.save(output)
    if as_json:
        print_json(plan_summary(shard_plan))
    else:
        render_plan(shard_plan)
        click.echo(f"wrote {output}")


@cli.command()
@model_argument
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="A plan file from 'periphery plan' or the app.")
@click.option("--shards", "-k", type=int, default=None, help="Plan K stages on the fly.")
@strategy_option
@devices_option
@input_shape_option
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder for stage-<i>.onnx files and plan.json.")
@json_option
@handle_errors
def shard(model: Path, plan_path: Path | None, shards: int | None, strategy: str,
          devices: Path | None, input_shapes: tuple[str, ...], output: Path,
          as_json: bool) -> None:
    """Write one standalone .onnx per stage, and the plan, into a folder."""
    from periphery_core.cli.render import print_json
    from periphery_core.model.shapes import parse_input_shapes
    from periphery_core.partition.extract import extract_shards, write_shards
    from periphery_core.partition.plan import load_plan, require_plan_for

    if (plan_path is None) == (shards is None):
        raise PlanError("give exactly one of --plan PLAN.json or --shards K")
    if plan_path is not None:
        from periphery_core.model import load_model

        shard_plan = load_plan(plan_path)
        loaded = load_model(model)
        require_plan_for(shard_plan, loaded.sha256, model.name, str(plan_path))
        shapes = {**shard_plan.input_shapes, **parse_input_shapes(input_shapes)}
        loaded, analysis = _analysis(loaded, shapes)
    else:
        assert shards is not None
        loaded, analysis, shard_plan = _make_plan(model, shards, strategy, devices, False,
                                                  input_shapes)
    paths = write_shards(extract_shards(loaded, analysis, shard_plan), shard_plan, output)
    if as_json:
        print_json({"stages": [str(p) for p in paths], "plan": str(output / "plan.json")})
    else:
        for p in paths:
            click.echo(f"wrote {p}")


@cli.command()
@model_argument
@click.argument("shard_dir", type=click.Path(path_type=Path))
@click.option("--exact", is_flag=True,
              help="Graph optimizations off on both sides; outputs must be bit-identical.")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
              help="A .npz with one array per model input (default: seeded random data).")
@click.option("--seed", default=0, show_default=True, help="Seed for random inputs.")
@input_shape_option
@json_option
@handle_errors
def verify(model: Path, shard_dir: Path, exact: bool, inputs_path: Path | None, seed: int,
           input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Run the whole model and the chain of shards on the same inputs and compare.

    Exit 0 when equal (bit-identical with --exact), 1 when not, 2 on bad input.
    """
    from periphery_core.cli.render import print_json, render_verify, verify_dict
    from periphery_core.model import load_model
    from periphery_core.model.shapes import parse_input_shapes, resolve_input_shapes
    from periphery_core.partition.extract import PLAN_FILE, shard_paths
    from periphery_core.partition.plan import load_plan, require_plan_for
    from periphery_core.partition.verify import verify_chain
    from periphery_core.runtime.feeds import load_npz, random_feeds

    paths = shard_paths(shard_dir)
    loaded = load_model(model)
    planned: dict[str, tuple[int, ...]] = {}
    if (shard_dir / PLAN_FILE).is_file():
        shard_plan = load_plan(shard_dir / PLAN_FILE)
        require_plan_for(shard_plan, loaded.sha256, model.name, f"the shards in {shard_dir}")
        planned = dict(shard_plan.input_shapes)
    specs, _ = resolve_input_shapes(loaded.proto, {**planned, **parse_input_shapes(input_shapes)})
    feeds = load_npz(inputs_path, specs) if inputs_path else random_feeds(specs, seed)
    report = verify_chain(model if loaded.has_external_data else loaded.proto, paths, feeds,
                          exact=exact)
    if as_json:
        print_json(verify_dict(report))
    else:
        render_verify(report, len(paths))
    sys.exit(0 if report.passed else 1)


def main() -> None:
    import periphery_core.cli.cluster
    import periphery_core.cli.quantize  # noqa: F401  (registers `quantize`, `evaluate`)

    run_click(cli, "periphery")


def run_click(command: click.Command, prog: str) -> None:
    """Run a click command with its usage errors as one line and exit 2."""
    try:
        command.main(prog_name=prog, standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else prog
        _fail(f"{exc.format_message()} (see '{where} --help')")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message())


if __name__ == "__main__":
    # Run the importable module's `main`: commands register on its `cli`, not on __main__'s.
    from periphery_core.cli.main import main as _main

    _main()
