"""Human output for the CLI: rich tables and number formatting. No UI toolkit."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from periphery_core.model.analysis import ModelAnalysis
from periphery_core.partition.plan import ShardPlan
from periphery_core.partition.verify import VerifyReport
from periphery_core.units import (
    device_text,
    human_bytes,
    human_count,
    human_seconds,
    shape_text,
)

# No markup: what is printed holds users' paths, node names and library messages, where "[inc]"
# or "[red]" is text to show, not a style to apply (pip's extras vanished from an install hint,
# and "[/]" in a file name raised). Styles are given as `style=`.
console = Console(highlight=False, markup=False)
err_console = Console(stderr=True, highlight=False, markup=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def analysis_dict(a: ModelAnalysis, top: int | None = None) -> dict[str, Any]:
    nodes = sorted(a.nodes, key=lambda n: -(n.measured_s or 0) if a.profiled else -n.flops)
    return {
        "model": a.path,
        "sha256": a.sha256,
        "ir_version": a.ir_version,
        "opsets": dict(a.opsets),
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)}
                   for s in a.inputs],
        "outputs": [{"name": o, "dtype": a.tensors[o].dtype, "shape": list(a.tensors[o].shape)}
                    for o in a.outputs if o in a.tensors],
        "node_count": len(a.nodes),
        "total_flops": a.total_flops,
        "parameter_count": a.parameter_count,
        "parameter_bytes": a.total_param_bytes,
        "profiled": a.profiled,
        "measured_s": sum(n.measured_s or 0 for n in a.nodes) if a.profiled else None,
        "op_histogram": dict(a.op_histogram),
        "type_sources": dict(a.type_sources()),
        "notes": list(a.notes),
        "nodes": [
            {
                "key": n.key, "op_type": n.op_type, "domain": n.domain, "flops": n.flops,
                "param_bytes": n.param_bytes, "output_bytes": n.output_bytes,
                "measured_s": n.measured_s,
                "outputs": [{"name": o, "dtype": a.tensors[o].dtype,
                             "shape": list(a.tensors[o].shape)} for o in n.outputs
                            if o in a.tensors],
            }
            for n in (nodes if top is None else nodes[:top])
        ],
    }


def render_analysis(a: ModelAnalysis, top: int) -> None:
    summary = Table(title=f"{a.path}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    for s in a.inputs:
        summary.add_row("input", f"{s.name}: {s.dtype} [{shape_text(s.shape)}]")
    for o in a.outputs:
        t = a.tensors.get(o)
        if t is not None:
            summary.add_row("output", f"{o}: {t.dtype} [{shape_text(t.shape)}]")
    summary.add_row("opsets", ", ".join(f"{d} {v}" for d, v in a.opsets.items()))
    summary.add_row("nodes", str(len(a.nodes)))
    summary.add_row(
        "parameters", f"{human_count(a.parameter_count)} ({human_bytes(a.total_param_bytes)})"
    )
    summary.add_row("FLOPs", human_count(a.total_flops))
    if a.profiled:
        summary.add_row("measured", human_seconds(sum(n.measured_s or 0 for n in a.nodes)))
    console.print(summary)
    hist = Table(title="ops", title_justify="left")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    hist.add_column("FLOPs", justify="right")
    flops_by_op: dict[str, int] = {}
    for n in a.nodes:
        flops_by_op[n.op_type] = flops_by_op.get(n.op_type, 0) + n.flops
    total = max(1, a.total_flops)
    for op, count in a.op_histogram[:15]:
        hist.add_row(op, str(count), f"{100 * flops_by_op[op] / total:.1f}%")
    console.print(hist)
    key = (lambda n: -(n.measured_s or 0)) if a.profiled else (lambda n: -n.flops)
    costly = Table(title=f"top {top} nodes", title_justify="left")
    for col in ("node", "op", "output shape", "FLOPs", "params", "activations"):
        costly.add_column(col, justify="left" if col in ("node", "op", "output shape") else "right")
    if a.profiled:
        costly.add_column("measured", justify="right")
    for n in sorted(a.nodes, key=key)[:top]:
        first = a.tensors.get(n.outputs[0]) if n.outputs else None
        shape = shape_text(first.shape) if first is not None else ""
        row = [n.key, n.op_type, shape, human_count(n.flops), human_bytes(n.param_bytes),
               human_bytes(n.output_bytes)]
        if a.profiled:
            row.append(human_seconds(n.measured_s or 0))
        costly.add_row(*row)
    console.print(costly)
    for note in a.notes:
        err_console.print(f"note: {note}")


def render_plan(plan: ShardPlan) -> None:
    t = Table(title=f"{plan.strategy} plan, {plan.shape}",
              title_justify="left")
    for col in ("stage", "device", "nodes", "first → last", "compute", "transfer", "memory",
                "out bytes"):
        t.add_column(col, justify="left" if col in ("device", "first → last") else "right")
    b = plan.bottleneck_stage
    for s in plan.stages:
        style = "bold red" if s.index == b else None
        device = f"{s.device} ({s.workers} at once)" if s.workers > 1 else s.device
        t.add_row(str(s.index), device, str(len(s.nodes)), f"{s.nodes[0]} → {s.nodes[-1]}",
                  human_seconds(s.compute_s), human_seconds(s.transfer_s),
                  human_bytes(s.memory_bytes), human_bytes(s.output_bytes), style=style)
    console.print(t)
    console.print(f"bottleneck {human_seconds(plan.bottleneck_s)} (stage {b}); "
                  f"ideal {human_seconds(plan.ideal_s)}; ratio "
                  f"{plan.balance_ratio:.3f}; boundary bytes "
                  f"{human_bytes(plan.boundary_bytes)}")
    if plan.shape_reason:
        console.print(f"shape {plan.shape_reason}", soft_wrap=True, highlight=False)
    console.print(plan.cost_note, soft_wrap=True, highlight=False)


def plan_summary(plan: ShardPlan) -> dict[str, Any]:
    return {**plan.to_dict(), "balance_ratio": plan.balance_ratio,
            "boundary_bytes": plan.boundary_bytes, "nodes_needed": plan.nodes_needed,
            "predicted_rps": plan.predicted_rps}


def verify_dict(report: VerifyReport) -> dict[str, Any]:
    return {
        "passed": report.passed,
        "exact": report.exact,
        "outputs": [
            {"name": o.name, "dtype": o.dtype, "shape": list(o.shape), "max_abs": o.max_abs,
             "max_rel": o.max_rel, "bit_identical": o.bit_identical,
             "within_tolerance": o.within_tolerance}
            for o in report.outputs
        ],
    }


def render_verify(report: VerifyReport, k: int) -> None:
    t = Table(title=f"{k} shards vs whole model ({'exact' if report.exact else 'optimized'})",
              title_justify="left")
    for col in ("output", "shape", "max abs diff", "max rel diff", "bit-identical"):
        t.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for o in report.outputs:
        t.add_row(o.name, shape_text(o.shape), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                  "yes" if o.bit_identical else "no")
    console.print(t)
    console.print("PASS" if report.passed else "FAIL",
                  style="bold green" if report.passed else "bold red")

def render_nodes(rows: list[dict[str, Any]]) -> None:
    """`cluster ls`'s table (rows as its --json prints them) and, below it, each node that did
    not answer, in one line.

    It fits 80 columns: the address whole (what a user copies into --peer), the device name
    shortened and cut first; workers only where a node computes several requests at once.
    """
    several = any(r.get("workers", 1) != 1 for r in rows)
    cols = ["name", "address", "device", "cores", *(["workers"] if several else []), "memory",
            "speed", "rtt", "link"]
    cells = []
    for r in rows:
        if "error" in r:  # (said whole below the table)
            cells.append(["?", r["address"], "no answer", *[""] * (len(cols) - 3)])
            continue
        cells.append([r["name"], r["address"], device_text(r["device"]), str(r["cores"]),
                      *([str(r["workers"])] if several else []), human_bytes(r["memory"]),
                      f"{r['speed']:.2f}x" if r["speed"] is not None else "unknown",
                      human_seconds(r["rtt_s"] or 0),
                      f"{human_bytes(r['bandwidth'])}/s" if r["bandwidth"] else "?"])
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    room = console.width - (sum(widths) - widths[2]) - (len(cols) - 1)
    t = Table(title=f"{len(rows)} nodes", title_justify="left", box=box.SIMPLE_HEAD,
              padding=0, show_edge=False)
    for i, col in enumerate(cols):
        t.add_column(col, no_wrap=True, min_width=widths[i] if i != 2 else None,
                     max_width=max(6, room) if i == 2 else None, overflow="ellipsis",
                     justify="left" if i < 3 else "right")
    for row in cells:
        t.add_row(*row)
    console.print(t)
    for r in rows:
        if "error" in r:
            console.print(r["error"], soft_wrap=True, style="red")
