"""Rich renderables for a model's summary: figures, inputs and outputs, the op histogram and,
where the pane has room, the heaviest nodes.

Plain functions of a `ModelAnalysis`, so the Model screen, the help and the tests share them.
Given the pane's size, the summary fills it: a tall pane lists more of the histogram and then
the nodes that cost most (where a cut will matter), a wide one draws longer bars.
"""

from __future__ import annotations

import io as _io
import re

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from periphery_app.units import bar, human_bytes, human_count, shape_text
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.model.analysis import ModelAnalysis


def model_summary(analysis: ModelAnalysis, name: str, file_bytes: int,
                  decoder: DecoderSpec | None = None,
                  size: tuple[int, int] | None = None) -> RenderableType:
    """Figures, inputs/outputs and the op histogram of a model, and what it was recognised
    as when it is a decoder LLM.

    Args:
        size: (columns, rows) of the pane it is drawn in; None draws the short form (12
            histogram rows, no node table).
    """
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

    notes: list[RenderableType] = []
    if analysis.notes:
        notes += [Text(""), Text("Notes", style="bold")]
        notes += [Text(f"• {_app_hint(note)}", style="dim") for note in analysis.notes]
    if size is None:
        return Group(facts, Text(""), io, Text(""), op_histogram(analysis), *notes)
    columns, rows = size
    spare = rows - 1 - _height(Group(facts, Text(""), io, Text(""), *notes), columns)
    bar_width = max(28, min(60, columns - 40))
    ops = len(analysis.op_histogram)
    top = max(12, min(ops, spare - 2))  # its title, and the "+N more" row if any
    spare -= min(top, ops) + 1 + (ops > top)
    parts: list[RenderableType] = [facts, Text(""), io, Text(""),
                                   op_histogram(analysis, top, bar_width)]
    if spare >= 10:  # a blank line, the title, the head (three rows), the rows, a blank
        parts += [Text(""), heaviest_nodes(analysis, min(30, spare - 6), bar_width)]
    return Group(*parts, *notes)


def _height(renderable: RenderableType, columns: int) -> int:
    """Rows `renderable` takes at `columns` wide."""
    console = Console(width=max(20, columns), file=_io.StringIO())
    return len(console.render_lines(renderable, console.options, pad=False))


def heaviest_nodes(analysis: ModelAnalysis, top: int, width: int = 28) -> RenderableType:
    """The `top` nodes with the most FLOPs, each with its share of the model's."""
    total = analysis.total_flops or 1
    nodes = sorted(analysis.nodes, key=lambda n: n.flops, reverse=True)[:top]
    table = Table(title="Heaviest nodes (FLOPs)", title_justify="left", box=box.SIMPLE_HEAD,
                  header_style="bold", padding=(0, 1), expand=False)
    table.add_column("node", no_wrap=True, overflow="ellipsis", max_width=40)
    table.add_column("op")
    table.add_column("FLOPs", justify="right")
    table.add_column("share", justify="right")
    table.add_column("", style="cyan", no_wrap=True)
    table.add_column("params", justify="right")
    for node in nodes:
        if node.flops <= 0:
            break
        share = node.flops / total
        table.add_row(node.key, node.op_type, human_count(node.flops), f"{share:.1%}",
                      bar(share / (nodes[0].flops / total), width // 2),
                      human_bytes(node.param_bytes) if node.param_bytes else "-")
    return table


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
