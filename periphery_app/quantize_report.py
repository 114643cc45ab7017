"""The Quantize wizard's report: a quantized model against its fp32 original, as one Rich
renderable (accuracy, closeness per output, size, latency, the most sensitive nodes).

Design choice: a pure function of the core's `EvalReport` and `QuantResult`, so the pane shows
exactly what `periphery evaluate` measures and a test can render it without a screen.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from periphery_app.units import human_bytes, human_seconds
from periphery_core.quantize.config import weight_bits
from periphery_core.quantize.evaluate import EvalReport
from periphery_core.quantize.methods import QuantResult


def _ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def _db(x: float) -> str:
    return "∞" if math.isinf(x) and x > 0 else f"{x:.1f}"


def report_view(report: EvalReport, result: QuantResult, model_name: str) -> RenderableType:
    """The report pane: accuracy, closeness per output, size, latency, sensitive nodes."""
    config = result.config
    head = Text()
    head.append(f"{model_name} · {result.method} ({config.engine})", style="bold")
    head.append(f" · {weight_bits(config)}-bit weights · evaluated on {report.samples} samples")
    lines: list[RenderableType] = [head, Text("")]
    if report.task_metric is not None:
        name, fp32, quant = report.task_metric
        style = "green" if quant >= fp32 - 0.5 else "yellow" if quant >= fp32 - 2 else "red"
        line = Text(f"{name.replace(' %', '')}: fp32 {fp32:.2f}%, quantized ")
        line.append(f"{quant:.2f}%", style=f"bold {style}")
        line.append(f" ({quant - fp32:+.2f})")
        lines.append(line)
    else:
        lines.append(Text("no task metric: the evaluation data have no labels", style="dim"))
    if report.top1_agreement is not None:
        lines.append(Text(f"top-1 agreement with fp32: {100 * report.top1_agreement:.2f}%"))
    lines.append(Text(f"size {human_bytes(report.quant_bytes)} vs {human_bytes(report.fp32_bytes)}"
                      f" fp32: {_ratio(report.size_ratio)}   latency "
                      f"{human_seconds(report.quant_latency_s)} vs "
                      f"{human_seconds(report.fp32_latency_s)}: {_ratio(report.latency_ratio)}"))
    outputs = Table(box=box.SIMPLE_HEAD, title="Outputs against fp32", title_justify="left",
                    title_style="bold", padding=(0, 1))
    for col in ("output", "cosine", "max abs", "SQNR dB"):
        outputs.add_column(col, justify="left" if col == "output" else "right")
    for o in report.outputs:
        outputs.add_row(o.name, f"{o.cosine:.5f}", f"{o.max_abs:.3g}", _db(o.sqnr_db))
    lines += [Text(""), outputs]
    if report.sensitive_nodes:
        nodes = Table(box=box.SIMPLE_HEAD, title="Most sensitive nodes (noise they add)",
                      title_justify="left", title_style="bold", padding=(0, 1))
        for col in ("node", "op", "SQNR dB", "added dB"):
            nodes.add_column(col, justify="left" if col in ("node", "op") else "right")
        for n in report.sensitive_nodes[:5]:
            nodes.add_row(n.node, n.op_type, _db(n.sqnr_db), _db(n.local_sqnr_db))
        lines.append(nodes)
        lines.append(Text("SQNR dB: signal over quantization noise in the node's output, all the "
                          "noise before it included (higher is closer to fp32; ∞: none). "
                          "added dB: the same for the noise this node adds alone; the lowest "
                          "comes first, where excluding a node (kept in float) helps most.",
                          style="dim"))
    if result.excluded:
        lines.append(Text(f"kept in float: {', '.join(result.excluded)}", style="dim"))
    lines += [Text(f"note: {note}", style="dim") for note in result.notes]
    return Group(*lines)
