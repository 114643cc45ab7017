"""Shard plans and devices: frozen data plus their versioned file formats.

A plan is K stages, each a contiguous segment of one topological order of the graph, placed on
K devices in order, and run as R replicas of that pipeline side by side (R = 1 unless the
planner found more replicas faster, `partition.shape`). Plans are JSON (or TOML) files that
carry everything needed to apply them elsewhere: the model's path and sha256, the input shapes
they were made for, the devices, the shape, and per stage its nodes and boundary tensors.
Validation happens here, at the file edge.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from periphery_core.errors import DevicesError, PlanError
from periphery_core.wire.protocol import MAX_WORKERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PLAN_FORMAT = "periphery.plan"
PLAN_VERSION = 1
STRATEGIES = ("balanced", "even", "spectral")

# The reference machine a device's speed is relative to (speed 1.0): a modest CPU core running
# ONNX Runtime kernels, 10 GFLOP/s.
REFERENCE_FLOPS = 10e9
# What a stage pays per request besides computing, whatever the model: its node's decode, its
# call into ONNX Runtime and its encode, about 0.1 ms of Python on a current core (the README's
# hop table). A stage serves one request per (its bottleneck + this).
STAGE_OVERHEAD_S = 1e-4
# A LAN link of 1 Gbit/s, the default when a devices file does not say.
DEFAULT_BANDWIDTH = 125e6


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device a stage runs on.

    Attributes:
        name: a label (a node name once the cluster assigns one).
        speed: compute speed relative to the reference machine (2.0 runs a stage in half the time).
        memory_bytes: the most a stage may hold (parameters + peak activations); None: no cap.
        bandwidth: bytes per second of the link from this device to the next stage.
        workers: requests it computes at once (`periphery-node --workers`): its stage holds
            the parameters once and the activations of each run.
    """

    name: str
    speed: float = 1.0
    memory_bytes: int | None = None
    bandwidth: float = DEFAULT_BANDWIDTH
    workers: int = 1


@dataclass(frozen=True, slots=True)
class Boundary:
    """A tensor crossing a stage boundary."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: a contiguous run of nodes in the plan's order."""

    index: int
    device: str
    nodes: tuple[str, ...]
    inputs: tuple[Boundary, ...]
    outputs: tuple[Boundary, ...]
    compute_s: float  # predicted compute time on its device
    transfer_s: float  # predicted time to send its outputs over its device's link
    flops: int
    param_bytes: int
    peak_activation_bytes: int  # of one request
    workers: int = 1  # requests its device computes at once, each with its activations

    @property
    def cost_s(self) -> float:
        """The stage's period in a stream: a node sends one request's outputs on its own
        thread while it computes the next, so the slower of the two sets the pace."""
        return max(self.compute_s, self.transfer_s)

    @property
    def memory_bytes(self) -> int:
        return self.param_bytes + self.workers * self.peak_activation_bytes

    @property
    def output_bytes(self) -> int:
        return sum(b.nbytes for b in self.outputs)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """A whole plan. `bottleneck_s` is the largest stage cost: the pipeline's period.

    `replicas` copies of the K-stage pipeline serve side by side, each on K nodes of its own
    (the master balances requests over them); `devices` are the first replica's, on which
    the cuts were costed, and `replica_devices` name the other replicas' in order (K each;
    empty for a plan whose other replicas were not planned on named devices). `shape_reason`
    says why the planner chose this shape.
    """

    model_path: str
    model_sha256: str
    strategy: str
    # "estimate" (FLOPs), "calibrated" (FLOPs scaled to a timed run of the whole model) or
    # "profile" (each node measured)
    cost_basis: str
    input_shapes: dict[str, tuple[int, ...]]
    devices: tuple[DeviceSpec, ...]
    stages: tuple[Stage, ...]
    total_compute_s: float
    version: int = PLAN_VERSION
    notes: tuple[str, ...] = field(default=())
    replicas: int = 1
    shape_reason: str = ""
    replica_devices: tuple[str, ...] = ()

    @property
    def k(self) -> int:
        return len(self.stages)

    @property
    def cuts(self) -> list[int]:
        """The K-1 cut positions in the plan's node order."""
        ends = [sum(len(s.nodes) for s in self.stages[:i + 1]) for i in range(self.k)]
        return ends[:-1]

    @property
    def nodes_needed(self) -> int:
        """Nodes the plan runs on: K stages for each replica."""
        return self.k * self.replicas

    @property
    def cost_note(self) -> str:
        """What the plan's times are: measured on this host, FLOP estimates at its devices'
        speeds, or FLOP estimates on reference machines (how to get figures of one's own)."""
        if self.cost_basis == "profile":
            return "times measured by running the model on this host"
        what = ("FLOP estimates scaled to a timed run of the whole model on this host"
                if self.cost_basis == "calibrated" else "FLOP estimates")
        if self.devices and self.devices == uniform_devices(len(self.devices)):
            return (f"times are {what}, on reference machines of "
                    f"{REFERENCE_FLOPS / 1e9:.0f} GFLOP/s, slower than most: plan with --devices "
                    "(from 'periphery cluster ls --write-devices') or --profile (measured on "
                    "this host) for figures of your own machines")
        return f"times are {what}, at each device's speed"

    @property
    def predicted_rps(self) -> float:
        """Requests per second the cost model predicts (replicas alike; each stage's fixed
        cost per request counted)."""
        return self.replicas / (self.bottleneck_s + STAGE_OVERHEAD_S)

    def with_replicas(self, replicas: int, reason: str,
                      others: Sequence[str] = ()) -> ShardPlan:
        """The same stages, run as `replicas` copies side by side; `reason` says why, and
        `others` names the other replicas' devices in order (K each), if known."""
        return replace(self, replicas=replicas, shape_reason=reason,
                       replica_devices=tuple(others[:self.k * (replicas - 1)]))

    @property
    def device_order(self) -> list[str]:
        """Every device the plan runs on, by name: replica 0's stages, then replica 1's, ..."""
        return [d.name for d in self.devices] + list(self.replica_devices)

    @property
    def shape(self) -> str:
        """`2 replicas x 1 stage`, `1 x 3 stages`."""
        return shape_text(self.k, self.replicas)

    @property
    def bottleneck_s(self) -> float:
        return max(s.cost_s for s in self.stages)

    @property
    def ideal_s(self) -> float:
        """The perfectly balanced period: all compute spread over the devices by speed."""
        return self.total_compute_s / sum(d.speed for d in self.devices)

    @property
    def balance_ratio(self) -> float:
        return self.bottleneck_s / self.ideal_s if self.ideal_s > 0 else 1.0

    @property
    def bottleneck_stage(self) -> int:
        return max(range(self.k), key=lambda i: self.stages[i].cost_s)

    @property
    def boundary_bytes(self) -> int:
        """Bytes crossing the K-1 inner boundaries."""
        return sum(s.output_bytes for s in self.stages[:-1])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data = {"format": PLAN_FORMAT, **data}
        data["bottleneck_s"] = self.bottleneck_s
        data["devices"] = [_device_dict(d) for d in self.devices]
        data["notes"] = list(self.notes)
        data["replica_devices"] = list(self.replica_devices)
        return data

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if p.suffix.lower() == ".toml":
            p.write_text(tomli_w.dumps(_drop_none(data)))
        else:
            p.write_text(json.dumps(data, indent=1) + "\n")
        return p


def shape_text(k: int, replicas: int) -> str:
    """How a shape reads: `2 replicas x 1 stage`, `1 x 3 stages`."""
    stages = f"{k} stage{'s' if k != 1 else ''}"
    return f"1 x {stages}" if replicas == 1 else f"{replicas} replicas x {stages}"


def require_plan_for(plan: ShardPlan, sha256: str, model_name: str, plan_source: str) -> None:
    """Refuse to apply a plan to a model other than the one it was made for.

    Raises:
        PlanError: the model's sha256 is not the plan's.
    """
    if plan.model_sha256 != sha256:
        raise PlanError(
            f"{plan_source} was made for another model (sha256 {plan.model_sha256[:12]}…, "
            f"{model_name} is {sha256[:12]}…): re-plan with 'periphery plan'"
        )


def _device_dict(d: DeviceSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": d.name, "speed": d.speed, "bandwidth": d.bandwidth}
    if d.memory_bytes is not None:
        out["memory_bytes"] = d.memory_bytes
    if d.workers != 1:
        out["workers"] = d.workers
    return out


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def _read_structured(path: Path, what: str, error: type[PlanError] | type[DevicesError]) -> Any:
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    text = path.read_text(errors="replace")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        hint = "; write one with 'periphery plan MODEL -o plan.json'" if what == "plan" else ""
        raise error(f"{path} is not a {what} file: not {kind} ({exc}){hint}") from None


def load_plan(path: str | Path) -> ShardPlan:
    """Read and validate a plan file.

    Raises:
        PlanError: the file is missing, malformed, or of an unknown version.
    """
    p = Path(path)
    data = _read_structured(p, "plan", PlanError)
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanError(f"{p} is not a Periphery plan (no 'format = {PLAN_FORMAT}')")
    if data.get("version") != PLAN_VERSION:
        raise PlanError(
            f"{p} is plan version {data.get('version')}; this Periphery reads version "
            f"{PLAN_VERSION}: re-run 'periphery plan'"
        )
    try:
        devices = tuple(_device_from(d, i) for i, d in enumerate(data["devices"]))
        stages = tuple(
            Stage(
                index=int(s["index"]),
                device=str(s["device"]),
                nodes=tuple(str(n) for n in s["nodes"]),
                inputs=tuple(_boundary(b) for b in s["inputs"]),
                outputs=tuple(_boundary(b) for b in s["outputs"]),
                compute_s=float(s["compute_s"]),
                transfer_s=float(s["transfer_s"]),
                flops=int(s["flops"]),
                param_bytes=int(s["param_bytes"]),
                peak_activation_bytes=int(s["peak_activation_bytes"]),
                workers=int(s.get("workers", 1)),
            )
            for s in data["stages"]
        )
        plan = ShardPlan(
            model_path=str(data["model_path"]),
            model_sha256=str(data["model_sha256"]),
            strategy=str(data["strategy"]),
            cost_basis=str(data["cost_basis"]),
            input_shapes={k: tuple(int(x) for x in v) for k, v in data["input_shapes"].items()},
            devices=devices,
            stages=stages,
            total_compute_s=float(data["total_compute_s"]),
            notes=tuple(str(n) for n in data.get("notes", ())),
            replicas=int(data.get("replicas", 1)),
            shape_reason=str(data.get("shape_reason", "")),
            replica_devices=tuple(str(n) for n in data.get("replica_devices", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"{p} is a damaged plan file ({type(exc).__name__}: {exc})") from None
    if not plan.stages:
        raise PlanError(f"{p} has no stages")
    if plan.replicas < 1:
        raise PlanError(f"{p}: replicas must be at least 1, not {plan.replicas}")
    if [s.index for s in plan.stages] != list(range(plan.k)):
        raise PlanError(f"{p}: stage indices must run 0..{plan.k - 1} in order")
    return plan


def _boundary(b: dict[str, Any]) -> Boundary:
    return Boundary(str(b["name"]), str(b["dtype"]), tuple(int(x) for x in b["shape"]),
                    int(b["nbytes"]))


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z/]*)\s*$")
_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_RATE_UNITS = {"b/s": 1, "": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9,
               "kbit/s": 125, "mbit/s": 125e3, "gbit/s": 125e6, "bps": 0.125,
               "kbps": 125, "mbps": 125e3, "gbps": 125e6,
               "kib/s": 2**10, "mib/s": 2**20, "gib/s": 2**30}


def parse_size(value: Any, units: dict[str, float], what: str) -> float:
    """`8GiB`, `1Gbit/s`, `125e6` -> a number in bytes (or bytes per second)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        m = _SIZE.match(str(value))
        if not m or m.group(2).lower() not in units:
            raise DevicesError(f"{what} '{value}' is not a size like "
                               f"{'8GiB' if 'gib' in units else '1Gbit/s'}")
        number = float(m.group(1)) * units[m.group(2).lower()]
    if not math.isfinite(number) or number <= 0:
        raise DevicesError(f"{what} must be a positive number, got '{value}'")
    return number


def _device_from(d: Any, i: int) -> DeviceSpec:
    if not isinstance(d, dict):
        raise DevicesError(f"device {i} must be a table with name, speed, memory, bandwidth")
    unknown = set(d) - {"name", "speed", "memory", "memory_bytes", "bandwidth", "workers"}
    if unknown:
        raise DevicesError(f"device {i} has unknown key '{sorted(unknown)[0]}' "
                           "(known: name, speed, memory, bandwidth, workers)")
    memory = d.get("memory", d.get("memory_bytes"))
    workers = d.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) \
            or not 1 <= workers <= MAX_WORKERS:
        raise DevicesError(f"device {i} workers must be a whole number from 1 to {MAX_WORKERS} "
                           f"(the requests it computes at once), got {workers!r:.40}")
    return DeviceSpec(
        name=str(d.get("name", f"device{i}")),
        speed=parse_size(d.get("speed", 1.0), {"": 1, "x": 1}, f"device {i} speed"),
        memory_bytes=None if memory is None else int(parse_size(memory, _BYTE_UNITS,
                                                                f"device {i} memory")),
        bandwidth=parse_size(d.get("bandwidth", DEFAULT_BANDWIDTH), _RATE_UNITS,
                             f"device {i} bandwidth"),
        workers=workers,
    )


def load_devices(path: str | Path) -> tuple[DeviceSpec, ...]:
    """Read a devices file: a TOML/JSON list of `[[device]]` tables, in pipeline order.

    ```toml
    [[device]]
    name = "gpu-box"
    speed = 4.0          # relative to the reference machine
    memory = "8GiB"      # parameters + activations a stage may hold
    bandwidth = "1Gbit/s"  # link to the next stage
    workers = 4          # requests it computes at once, each with its activations (1)
    ```
    """
    p = Path(path)
    data = _read_structured(p, "devices", DevicesError)
    items = data.get("device", data.get("devices")) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DevicesError(f"{p} lists no devices: expected [[device]] tables")
    return tuple(_device_from(d, i) for i, d in enumerate(items))


def uniform_devices(k: int) -> tuple[DeviceSpec, ...]:
    return tuple(DeviceSpec(name=f"device{i}") for i in range(k))


def devices_for(k: int, devices: Sequence[DeviceSpec] | None) -> tuple[DeviceSpec, ...]:
    """K devices: the given ones (at least K, the first K used) or K reference devices."""
    if devices is None:
        return uniform_devices(k)
    if len(devices) < k:
        raise PlanError(f"the devices file lists {len(devices)} devices but {k} shards were "
                        f"asked for: list at least {k} devices or ask for fewer shards")
    return tuple(devices[:k])
