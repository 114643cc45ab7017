"""Rich renderables for a model's summary: figures, inputs and outputs, the op histogram.

Plain functions of a `ModelAnalysis`, so the Model screen, the help and the tests share them.
"""

from __future__ import annotations

import re

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from periphery_app.units import bar, human_bytes, human_count, shape_text
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.model.analysis import ModelAnalysis


def model_summary(analysis: ModelAnalysis, name: str, file_bytes: int,
                  decoder: DecoderSpec | None = None) -> RenderableType:
    """Figures, inputs/outputs and the op histogram of a model, and what it was recognised
    as when it is a decoder LLM."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    opsets = ", ".join(f"{d} {v}" for d, v in sorted(analysis.opsets.items()))
    facts.add_row("Model", name)
    facts.add_row("File size", human_bytes(file_bytes))
    facts.add_row("Opsets", f"{opsets} (IR {analysis.ir_version})")
    facts.add_row("Nodes", f"{len(analysis.nodes):,}")
    facts.add_row("Parameters", f"{human_count(analysis.parameter_count)} "
                                f"({human_bytes(analysis.total_param_bytes)})")
    facts.add_row("Total FLOPs", human_count(analysis.total_flops, "FLOP"))
    if decoder is not None:
        facts.add_row("Recognised", decoder.describe())
        facts.add_row("Generate", "periphery generate MODEL --prompt ...")

    io = Table(title="Inputs and outputs", title_justify="left", expand=False,
               header_style="bold", padding=(0, 1), box=box.SIMPLE_HEAD)
    io.add_column("")
    io.add_column("name")
    io.add_column("dtype")
    io.add_column("shape")
    for spec in analysis.inputs:
        io.add_row("in", spec.name, str(spec.dtype), shape_text(spec.shape))
    for out in analysis.outputs:
        info = analysis.tensors.get(out)
        io.add_row("out", out, info.dtype if info else "?",
                   shape_text(info.shape) if info else "?")

    parts: list[RenderableType] = [facts, Text(""), io, Text(""), op_histogram(analysis)]
    if analysis.notes:
        parts += [Text(""), Text("Notes", style="bold")]
        parts += [Text(f"• {_app_hint(note)}", style="dim") for note in analysis.notes]
    return Group(*parts)


def _app_hint(note: str) -> str:
    """A note's CLI hint in the app's terms (the Model screen's `i` sets input shapes)."""
    return re.sub(r"set it with --input-shape \S+", "press i to set input shapes", note)


def op_histogram(analysis: ModelAnalysis, top: int = 12, width: int = 28) -> RenderableType:
    """A bar chart of the most frequent op types."""
    hist = analysis.op_histogram
    table = Table(title="Op histogram", title_justify="left", show_header=False,
                  box=None, padding=(0, 1))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="cyan")
    most = hist[0][1] if hist else 1
    for op, count in hist[:top]:
        table.add_row(op, str(count), bar(count / most, width))
    rest = hist[top:]
    if rest:
        table.add_row(f"+{len(rest)} more", str(sum(c for _, c in rest)), "")
    return table
