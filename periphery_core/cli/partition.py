"""`periphery analyze`, `plan`, `shard` and `verify`: from a model to checked shards."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from periphery_core.cli.common import (
    cli,
    handle_errors,
    input_shape_option,
    inputs_option,
    json_option,
    load_and_analyze,
    model_argument,
)
from periphery_core.errors import AnalysisError, PlanError

if TYPE_CHECKING:
    from periphery_core.model.loading import LoadedModel


@cli.command()
@model_argument
@input_shape_option
@inputs_option
@click.option("--profile", is_flag=True, help="Measure each node's time in ONNX Runtime.")
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="How many costly nodes to list (default: 20 in the table, all in --json).")
@json_option
@handle_errors
def analyze(model: Path, input_shapes: tuple[str, ...], inputs_path: Path | None, profile: bool,
            top: int | None, as_json: bool) -> None:
    """Show a model's inputs, outputs, op histogram and per-node costs."""
    from periphery_core.cli.render import analysis_dict, print_json, render_analysis

    _, analysis = load_and_analyze(model, input_shapes, profile, inputs_path)
    if as_json:
        print_json(analysis_dict(analysis, top))
    else:
        render_analysis(analysis, 20 if top is None else top)


def _make_plan(model: Path, shards: int | None, strategy: str, devices: Path | None,
               profile: bool, input_shapes: Sequence[str], inputs: Path | None,
               replicas: int | None = None, nodes: int | None = None):
    """Plan for the nodes at hand: the devices file's (or `nodes` reference machines), the
    stages and replicas asked for, the planner's choice for the rest (`partition.shape`).
    `--shards K` without `--nodes` is one pipeline of K stages."""
    from periphery_core.generate.decoder import recognize
    from periphery_core.generate.planning import plan_shape
    from periphery_core.partition.plan import load_devices, uniform_devices

    for value, what in ((shards, "shards"), (replicas, "replicas"), (nodes, "nodes")):
        if value is not None and value < 1:
            raise PlanError(f"cannot plan for {value} {what}: ask for at least 1")
    if shards is not None and replicas is None and nodes is None:
        replicas = 1  # one pipeline, unless the nodes were counted
    listed = load_devices(devices) if devices is not None else None
    count = nodes or (len(listed) if listed else None) or (
        shards * replicas if shards and replicas else None)
    if count is None:
        raise PlanError("say what to plan for: --nodes N (or --devices FILE) to let the planner "
                        "choose stages and replicas, or --shards K")
    if listed is not None and count > len(listed):
        raise PlanError(f"--nodes {count} but the devices file lists {len(listed)} devices")
    devs = listed[:count] if listed is not None else uniform_devices(count)
    loaded, analysis = load_and_analyze(model, input_shapes, profile, inputs)
    # A language model is balanced on a measured decode step, its stages' caches counted.
    plan = plan_shape(loaded, analysis, devs, k=shards, replicas=replicas, strategy=strategy,
                      decoder=recognize(loaded), use_profile=profile)
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
@click.option("--shards", "-k", type=int, default=None,
              help="Pipeline stages (default: the planner chooses for --nodes/--devices).")
@click.option("--replicas", "-r", type=int, default=None,
              help="Copies of the pipeline serving side by side (default: the planner "
                   "chooses; 1 with --shards).")
@click.option("--nodes", "-n", type=int, default=None,
              help="Plan for N nodes (default: the devices file's, or K x R).")
@strategy_option
@devices_option
@click.option("--profile", is_flag=True, help="Plan with measured node times, not FLOPs.")
@input_shape_option
@inputs_option
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Plan file to write (.json or .toml).")
@json_option
@handle_errors
def plan(model: Path, shards: int | None, replicas: int | None, nodes: int | None,
         strategy: str, devices: Path | None, profile: bool, input_shapes: tuple[str, ...],
         inputs_path: Path | None, output: Path, as_json: bool) -> None:
    """Plan R replicas of K pipeline stages for the nodes and write the plan file."""
    from periphery_core.cli.render import plan_summary, print_json, render_plan

    _, _, shard_plan = _make_plan(model, shards, strategy, devices, profile, input_shapes,
                                  inputs_path, replicas, nodes)
    shard_plan.save(output)
    if as_json:
        print_json(plan_summary(shard_plan))
    else:
        render_plan(shard_plan)
        click.echo(f"wrote {output}")


def _analysis_for_shards(loaded: LoadedModel, shapes: dict, inputs: Path | None):
    """The analysis of a model loaded without its big weights; when typing some tensor takes a
    run of the model, which needs them all, they are loaded for that run alone."""
    from periphery_core.model import load_model

    try:
        return load_and_analyze(loaded, shapes, inputs=inputs)[1]
    except AnalysisError:
        if not loaded.has_external_data:
            raise
    return load_and_analyze(load_model(loaded.path), shapes, inputs=inputs)[1]


@cli.command()
@model_argument
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="A plan file from 'periphery plan' or the app.")
@click.option("--shards", "-k", type=int, default=None, help="Plan K stages on the fly.")
@strategy_option
@devices_option
@input_shape_option
@inputs_option
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder for stage-<i>.onnx files and plan.json.")
@json_option
@handle_errors
def shard(model: Path, plan_path: Path | None, shards: int | None, strategy: str,
          devices: Path | None, input_shapes: tuple[str, ...], inputs_path: Path | None,
          output: Path, as_json: bool) -> None:
    """Write one standalone .onnx per stage, and the plan, into a folder."""
    from periphery_core.cli.render import print_json
    from periphery_core.model import load_model
    from periphery_core.model.shapes import overlay_shapes, parse_input_shapes
    from periphery_core.partition.extract import iter_shards, write_shards
    from periphery_core.partition.plan import load_plan, require_plan_for

    if (plan_path is None) == (shards is None):
        raise PlanError("give exactly one of --plan PLAN.json or --shards K")
    source = click.get_current_context().get_parameter_source
    for option, name in (("--strategy", "strategy"), ("--devices", "devices")):
        if plan_path is not None and source(name) != click.core.ParameterSource.DEFAULT:
            raise PlanError(f"{option} plans the stages on the fly: with --plan, the plan file's "
                            "are written (drop it, or plan with --shards K)")
    # The shards' weights are copied from the model's external data file to file: only the
    # graph (and the small weights inference reads) is loaded for the extraction.
    if plan_path is not None:
        shard_plan = load_plan(plan_path)
        loaded = load_model(model, weights="small")
        require_plan_for(shard_plan, loaded.sha256, loaded.name, str(plan_path))
        shapes = overlay_shapes(loaded, shard_plan.input_shapes, parse_input_shapes(input_shapes))
        analysis = _analysis_for_shards(loaded, shapes, inputs_path)
    else:
        assert shards is not None
        loaded, analysis, shard_plan = _make_plan(model, shards, strategy, devices, False,
                                                  input_shapes, inputs_path)
        if loaded.has_external_data:  # planning may have run the model; extracting need not
            loaded = load_model(loaded.path, weights="small")
    paths = write_shards(iter_shards(loaded, analysis, shard_plan), shard_plan, output,
                         keep=False, weights_dir=loaded.path.parent)
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
@inputs_option
@click.option("--seed", default=0, show_default=True, help="Seed for random inputs.")
@input_shape_option
@json_option
@handle_errors
def verify(model: Path, shard_dir: Path, exact: bool, inputs_path: Path | None, seed: int,
           input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Run the whole model and the chain of shards on the same inputs and compare.

    Exit 0 when equal (bit-identical with --exact), 1 when not, 2 on bad input.
    """
    from periphery_core.cli.common import input_specs
    from periphery_core.cli.render import print_json, render_verify, verify_dict
    from periphery_core.model import load_model
    from periphery_core.model.shapes import overlay_shapes, parse_input_shapes
    from periphery_core.partition.extract import PLAN_FILE, shard_paths
    from periphery_core.partition.plan import load_plan, require_plan_for
    from periphery_core.partition.verify import verify_chain
    from periphery_core.runtime.feeds import random_feeds

    if inputs_path is not None and \
            click.get_current_context().get_parameter_source("seed") != \
            click.core.ParameterSource.DEFAULT:
        raise PlanError("--seed makes random inputs: not with --inputs, whose are used")
    paths = shard_paths(shard_dir)
    loaded = load_model(model, weights=False)  # ONNX Runtime reads them from the file
    planned: dict[str, tuple[int, ...]] = {}
    if (shard_dir / PLAN_FILE).is_file():
        shard_plan = load_plan(shard_dir / PLAN_FILE)
        require_plan_for(shard_plan, loaded.sha256, loaded.name,
                         f"the plan of the shards in {shard_dir}")
        planned = dict(shard_plan.input_shapes)
    # the arrays given checked as `run` and `analyze` check them: against the model's fixed
    # dimensions and the shapes given (a wrong one was ONNX Runtime's message, cut short)
    specs, given = input_specs(
        loaded, overlay_shapes(loaded, planned, parse_input_shapes(input_shapes)), inputs_path)
    feeds = given if given is not None else random_feeds(specs, seed)
    report = verify_chain(loaded.path, paths, feeds, exact=exact)
    if as_json:
        print_json(verify_dict(report))
    else:
        render_verify(report, len(paths))
    sys.exit(0 if report.passed else 1)
