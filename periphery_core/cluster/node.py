"""`periphery-node`: the headless daemon that runs one pipeline stage on a child host.

Threads, each owning its own sockets (ZeroMQ sockets are not thread-safe):

- control (the caller of `serve_forever`): a ROUTER socket for the master: hello, ping, shard
  upload, shutdown. It never blocks on work (a session is built on a thread of its own).
- data (`cluster.node_data`): a PULL socket for activations, the stage in ONNX Runtime, and
  PUSH sockets to the next stage (or the master) and to the master's result socket.
- stats and calibration: the node's figures to the master, its speed measured again when idle.

ZeroMQ high-water marks on the sockets give backpressure: a slow stage slows its upstream
instead of growing memory. A frame that does not parse is logged and dropped; the node keeps
serving. A thread that dies anyway stops the whole node, loudly (see `NodeDaemon._guarded`): a
node is never left half-alive.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from periphery_core.cluster import same_host
from periphery_core.cluster.keys import Guard, KeyRing
from periphery_core.cluster.node_control import ControlChannel, control_socket
from periphery_core.cluster.node_data import (
    Deployment,
    NodeDataPath,
    default_workers,
    run_threads,
    warm_up,
)
from periphery_core.cluster.shard_load import Received, build_stage
from periphery_core.cluster.shard_policy import ShardRefused, check_destinations
from periphery_core.cluster.speed import device_description, measure_speed
from periphery_core.errors import ClusterError
from periphery_core.generate.stateful import StatefulStage
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.gpu import gpu_usage, memory_for_caches, parse_device, providers_for
from periphery_core.runtime.session import SessionConfig
from periphery_core.wire import PROTOCOL_VERSION, Limits, Message, WireError, encode

log = logging.getLogger("periphery.node")

CHUNK_BYTES = 1 << 20
MASTER_LOST_S = 3.0
CALIBRATE_AT_S = (2.0, 6.0, 20.0, 60.0)  # after start: measure the speed again, when idle
CALIBRATE_RETRY_S = 30.0  # while the speed is unknown (the measurement failed)
IDLE_CPU_PERCENT = 50.0  # host CPU use under which a node calibrates again


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """How a node runs. Port 0 picks a free port."""

    name: str = field(default_factory=platform.node)
    host: str = "127.0.0.1"
    port: int = 0
    data_port: int = 0
    device: str = "cpu"
    threads: int = 0
    advertise: bool = True
    mdns_interfaces: tuple[str, ...] | None = None
    queue_depth: int = 4
    limits: Limits = field(default_factory=Limits)
    max_shard_bytes: int = 8 << 30
    stats_interval_s: float = 1.0
    keys: KeyRing | None = None  # None: insecure (logged loudly)
    same_host_ipc: bool = True  # also take data over a private Unix socket (same_host.py)
    private_parent: Path | None = None  # where its folder for that socket goes (None: temp)
    recalibrate: bool = True  # measure the speed again while idle (False: once, at start)
    kv_budget: int = 0  # bytes of KV cache a decoder stage may hold; 0: a quarter of memory
    workers: int = 0  # requests the stage computes at once; 0: node_data.default_workers


@dataclass
class _Upload:
    stage: int
    stages: int
    sha256: str
    size: int  # as declared: what is held grows to it only as chunks arrive, in order
    fields: dict[str, Any]
    received: Received


class NodeDaemon:
    """One node: binds its sockets on `start`, serves until `stop`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node_id = uuid.uuid4().hex
        self.ctx = zmq.Context()
        self._stop = threading.Event()
        self._stopped = False
        self._upload: _Upload | None = None
        self.data: NodeDataPath | None = None  # made by `start`
        self._master: bytes | None = None
        self._master_seen = time.time()  # last ping or hello from a master
        self._master_lost = False
        self._threads: list[threading.Thread] = []
        self._advertiser: Any = None
        self.speed: float | None = None
        self.channel: ControlChannel | None = None  # made by `start`
        self.failure: str | None = None  # why a thread died, stopping the node
        self.control_endpoint = self.data_endpoint = ""
        self.data_ipc = ""  # the data socket for processes on this host (same_host.py)
        self._private: same_host.PrivateFolder | None = None
        self._warned_cuda = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        cfg = self.config
        self.guard = Guard(self.ctx, cfg.keys, f"node {cfg.name}")
        self.control = control_socket(self.ctx, self.guard, cfg.limits)
        port = self._bind(self.control, cfg.port)
        self.control_endpoint = f"tcp://{cfg.host}:{port}"
        self.channel = ControlChannel(self.control, cfg.limits, self._handle, self._stop)
        self.pull = self.guard.server(self.ctx.socket(zmq.PULL), admit="any")
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, cfg.queue_depth)
        self.pull.setsockopt(zmq.MAXMSGSIZE, cfg.limits.max_total_bytes + (1 << 20))
        dport = self._bind(self.pull, cfg.data_port)
        self.data_endpoint = f"tcp://{cfg.host}:{dport}"
        if cfg.same_host_ipc:
            self._private, self.data_ipc = same_host.bind_private(self.pull, "data",
                                                                  cfg.private_parent)
        self.data = NodeDataPath(self.ctx, self.guard, self.pull, cfg.limits, cfg.queue_depth,
                                 self._stop, cfg.workers or default_workers(cfg.device))
        self._measure()  # before serving: a master's first hello already gets a speed
        loops = [("data", self.data.run), ("stats", self._stats_loop)]
        for name, target in loops + ([("calibrate", self._calibrate)] if cfg.recalibrate
                                     else []):
            self._threads.append(threading.Thread(target=self._guarded, args=(name, target),
                                                  name=f"node-{name}", daemon=True))
            self._threads[-1].start()
        if cfg.advertise:
            self._start_advertising()
        log.info("node %s (%s) control %s data %s device %s", cfg.name, self.node_id[:8],
                 self.control_endpoint, self.data_endpoint, cfg.device)

    def halt(self) -> None:
        """End `serve_forever` (any thread, a signal's relay too); `stop` then cleans up."""
        self._stop.set()
        if self.channel is not None:
            self.channel.wake()

    def _bind(self, sock: zmq.Socket, port: int) -> int:
        if port:
            sock.bind(f"tcp://{self.config.host}:{port}")
            return port
        return int(sock.bind_to_random_port(f"tcp://{self.config.host}"))

    def _start_advertising(self) -> None:
        from periphery_core.discovery.mdns_advertiser import MdnsAdvertiser

        self._advertiser = MdnsAdvertiser(
            node_id=self.node_id, name=self.config.name,
            port=int(self.control_endpoint.rsplit(":", 1)[1]), host=self.config.host,
            properties=self._txt(), interfaces=(list(self.config.mdns_interfaces)
                                                if self.config.mdns_interfaces else None),
        )
        self._advertiser.start()

    def _txt(self) -> dict[str, str]:
        mem = psutil.virtual_memory()
        return {
            "id": self.node_id, "name": self.config.name, "proto": str(PROTOCOL_VERSION),
            "device": self._device_name(), "cores": str(os.cpu_count() or 1),
            "memory": str(mem.total), "free": str(mem.available),
            "data": self.data_endpoint,
            **({"key": self.config.keys.public.decode()} if self.config.keys else {}),
        }

    def _device_name(self) -> str:
        return device_description() if not self.config.device.startswith("cuda") else \
            f"{self.config.device} ({device_description()})"

    def stop(self) -> None:
        """Stop serving: unregister from mDNS, fail queued work explicitly, close sockets."""
        if self._stopped:
            return
        self._stopped = True
        self.halt()  # (already halted when a signal ended serve_forever)
        if self._advertiser is not None:
            self._advertiser.stop()
        for t in self._threads:
            t.join(timeout=2.0)
        failed = self.data.fail_queued(self.config.name) if self.data is not None else 0
        if failed:
            log.info("node stopping: %d queued requests failed explicitly", failed)
        self.guard.close()
        self.ctx.destroy(linger=0)
        if self._private is not None:
            self._private.remove()
        self._abandon()
        log.info("node %s stopped", self.config.name)

    def _abandon(self) -> None:
        """Drop the upload in progress, if any (its file too)."""
        up, self._upload = self._upload, None
        if up is not None:
            up.received.close()

    def _guarded(self, name: str, loop: Callable[[], None]) -> None:
        """Run one of the node's loops; if it dies anyway, stop the whole node, loudly.

        Each loop logs and drops a message it cannot handle, so a loop that dies is a bug. A
        node missing a thread would be half-alive: answering heartbeats, so the master keeps
        it, but never computing again. Restarting the thread is not safe either (its sockets
        and the item it held are in an unknown state). So the node stops: `serve_forever`
        raises, the process exits non-zero, and the master sees the node lost and recovers
        the pipeline on the others.
        """
        try:
            loop()
        except BaseException as exc:
            if self._stop.is_set() and self.failure is None:  # torn down under it: no bug
                log.warning("node thread %s ended while stopping: %s", name, exc)
                return
            self.failure = self.failure or (
                f"its {name} thread died: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}")
            log.critical("node %s stopping: %s", self.config.name, self.failure, exc_info=True)
            self.halt()

    # ------------------------------------------------------------------ control

    def serve_forever(self) -> None:
        """Serve the master until stopped.

        Raises:
            ClusterError: a thread of the node died despite its guards, so the node stopped.
        """
        if self.channel is None:
            raise ClusterError(f"node {self.config.name} was not started")
        self._guarded("control", self.channel.run)
        if self.failure is not None:
            raise ClusterError(f"node {self.config.name} stopped: {self.failure}")

    @property
    def rejected(self) -> int:
        """Messages refused so far, control and data."""
        return (self.channel.rejected if self.channel is not None else 0) + \
            (self.data.rejected if self.data is not None else 0)

    def _reply(self, ident: bytes, kind: str, fields: dict[str, Any],
               at_once: bool = False) -> None:  # (at once: before a build holds the GIL)
        assert self.channel is not None  # (only the channel's thread calls this)
        self.channel.reply(ident, kind, fields, at_once)

    def _handle(self, ident: bytes, msg: Message) -> None:
        kind = msg.kind
        silent = time.time() - self._master_seen
        if kind in ("ping", "hello"):
            self._master_seen = time.time()
            if self._master_lost:
                self._master_lost = False
                log.info("a master is back")
        if kind == "ping":
            self._reply(ident, "pong", {"t": msg.fields["t"], "node": self.node_id})
        elif kind == "hello":
            self._master = ident
            mem = psutil.virtual_memory()
            dep = self._deployed()
            self._reply(ident, "info", {
                "node": self.node_id, "name": self.config.name, "device": self._device_name(),
                "data": self.data_endpoint, "cores": os.cpu_count() or 1,
                "memory": int(mem.total), "free": int(mem.available),
                **({"speed": self.speed} if self.speed is not None else {}),  # None: unknown
                "key": self.config.keys.public.decode() if self.config.keys else "",
                "stage": dep.stage if dep else -1,
                "sha256": dep.sha256 if dep else "",
                "exact": dep.exact if dep else True,
                "master_silent_s": round(silent, 3),
                "ipc": self.data_ipc, "host": same_host.host_identity() if self.data_ipc else "",
                "workers": self.data.workers if self.data is not None else 1,
            })
        elif kind == "deploy_begin":
            self._begin_upload(ident, msg)
        elif kind == "deploy_chunk":
            self._chunk(ident, msg)
        elif kind == "deploy_end":
            self._end_upload(ident, msg)
        elif kind == "release":
            dep = self._deployed()
            if dep is not None and isinstance(dep.runner, StatefulStage):
                dep.runner.release(msg.fields["seqs"])
        elif kind == "shutdown":
            log.info("shutdown requested by the master")
            self.halt()
        else:
            raise WireError(f"'{kind}' is not a control message")

    def _begin_upload(self, ident: bytes, msg: Message) -> None:
        f = msg.fields  # types and ranges already checked by decode (wire/protocol.py)
        self._abandon()  # a new deploy abandons any upload still in progress
        size, head = f["size"], f.get("head", f["size"])
        if not 0 < size <= self.config.max_shard_bytes:
            raise WireError(f"shard of {size} bytes is outside 1..{self.config.max_shard_bytes}")
        if not 0 < head <= size:
            raise WireError(f"deploy_begin's model of {head} bytes is outside 1..{size}")
        if f["stage"] >= f["stages"]:
            raise WireError(f"deploy_begin names stage {f['stage']} of {f['stages']}")
        check_destinations(f, self.guard.ring)
        if f.get("reuse") is True:
            self._reuse(ident, f)
            return
        # Nothing is allocated for the declared size: what is held grows as chunks arrive (so
        # a small message cannot make the node zero-fill gigabytes), and a shard that cannot
        # fit in the memory free here is refused now, not when it is half uploaded.
        free = int(psutil.virtual_memory().available)
        try:
            if size > free:
                raise ShardRefused(f"stage {f['stage']}: a shard of {size >> 20} MiB does not "
                                   f"fit in the {free >> 20} MiB of memory free on this node")
            received = Received(size, head, f["stage"])
        except ShardRefused as exc:
            log.warning("refused shard for stage %d: %s", f["stage"], exc.message)
            self._reply(ident, "error", {"reason": exc.message, "stage": f["stage"]})
            return
        self._upload = _Upload(f["stage"], f["stages"], f["sha256"], size, dict(f), received)
        log.info("receiving shard for stage %d (%d bytes)", f["stage"], size)

    def _reuse(self, ident: bytes, f: dict[str, Any]) -> None:
        """Keep the shard already loaded (a restarted master found it here); only rewire."""
        dep = self._deployed()
        if (dep is None or dep.sha256 != f["sha256"] or dep.stage != f["stage"]
                or dep.exact != bool(f.get("exact", True))):
            self._reply(ident, "error", {"reason": f"stage {f['stage']}: this node does not "
                                         "hold that shard any more", "stage": f["stage"]})
            return
        self._activate(ident, dep.stage, dep.runner, dep.provider, f, dep.sha256)
        log.info("stage %d kept; rewired for a new master", dep.stage)

    def _chunk(self, ident: bytes, msg: Message) -> None:
        up = self._upload
        if up is None or msg.payload is None:
            raise WireError("shard chunk without an upload in progress")
        offset, received = msg.fields["offset"], up.received.count
        if offset != received or offset + len(msg.payload) > up.size:
            raise WireError(f"shard chunk at {offset} does not follow {received} "
                            f"(of {up.size} bytes)")
        if up.received.add(msg.payload):  # (every few MiB) the master hears it is alive
            self._reply(ident, "received", {"stage": up.stage, "bytes": up.received.count})

    def _end_upload(self, ident: bytes, msg: Message) -> None:
        up, self._upload = self._upload, None
        if up is None:
            raise WireError("deploy_end without an upload")
        digest = up.received.finish()
        if up.received.count != up.size or digest != up.sha256 \
                or msg.fields["sha256"] != digest:
            up.received.close()
            log.warning("refused shard for stage %d: sha256 mismatch", up.stage)
            self._reply(ident, "error", {"reason": f"stage {up.stage}: shard bytes do not match "
                                         "their sha256", "stage": up.stage})
            return
        self._reply(ident, "building", {"stage": up.stage}, at_once=True)  # (before the build)
        threading.Thread(target=self._build, args=(ident, up), daemon=True,
                         name="node-build").start()

    def _build(self, ident: bytes, up: _Upload) -> None:
        try:
            providers = providers_for(self.config.device)
            exact = bool(up.fields.get("exact", True))
            assert self.data is not None  # started before any master can deploy
            threads = run_threads(self.config.threads, self.data.workers, self.config.device)
            runner, state = build_stage(up.received, SessionConfig(
                exact=exact, threads=threads, providers=providers))
            provider = runner.session.get_providers()[0]
            if self.config.device.startswith("cuda") and provider != "CUDAExecutionProvider" \
                    and not self._warned_cuda:
                self._warned_cuda = True
                log.warning("CUDA was asked for but is not available here: running on CPU")
        except Exception as exc:  # a shard that ONNX Runtime refuses: report, keep serving
            up.received.close()  # (build_stage has, unless it was not reached)
            log.warning("stage %d failed to load: %s", up.stage, exc)
            self._reply(ident, "error", {"reason": f"stage {up.stage} failed to load: {exc}",
                                         "stage": up.stage})
            return
        try:
            if state is None:
                warm_up(runner)
            budget = self.config.kv_budget or memory_for_caches(runner.device, runner.device_id)
            stage: StageRunner | StatefulStage = runner if state is None \
                else StatefulStage(runner, state, budget)
            self._activate(ident, up.stage, stage, provider, up.fields, up.sha256)
        except Exception as exc:  # a bug: the master must hear of it, not wait out its timeout
            log.exception("stage %d failed to start", up.stage)
            self._reply(ident, "error", {"reason": f"stage {up.stage} failed to start: "
                                         f"{type(exc).__name__}: {exc}", "stage": up.stage})
            return
        log.info("stage %d ready on %s%s", up.stage, provider, f", KV caches in "
                 f"{'GPU' if stage.on_device else 'host'} memory" if isinstance(
                     stage, StatefulStage) else "")

    def _activate(self, ident: bytes, stage: int, runner: StageRunner | StatefulStage,
                  provider: str, f: dict[str, Any], sha256: str) -> None:
        keys = {k: str(f.get(k) or "").encode() or None for k in ("next_key", "results_key")}
        assert self.data is not None  # started before any master can deploy
        self.data.deploy(Deployment(stage, runner, f["next"], f["results"], provider,
                                    keys["next_key"], keys["results_key"],
                                    int(f.get("epoch", 0)), sha256, bool(f.get("exact", True))))
        self._reply(ident, "ready", {"stage": stage, "provider": provider})

    def _deployed(self) -> Deployment | None:
        return self.data.deployment if self.data is not None else None

    # ------------------------------------------------------------------ housekeeping

    def _measure(self) -> None:
        """Measure the speed once more; keep the best figure (the least contended)."""
        try:
            speed = measure_speed()
        except Exception as exc:  # a failed benchmark must not take the node down
            log.warning("speed measurement failed: %s", exc)
            return
        if self.speed is None or speed > self.speed:
            log.info("speed %.2fx the reference device", speed)
            self.speed = speed

    def _calibrate(self) -> None:
        """Measure again a few times while the node (and the host) is idle.

        The first figure is taken while sibling nodes may be starting on the same cores; later
        ones, when nothing runs, replace it if faster. An unknown speed is retried until known.
        The stats message carries each new figure to the master.
        """
        now = time.monotonic()
        # Jittered, so sibling nodes started together do not calibrate at the same moment.
        due = [now + at * random.uniform(1.0, 1.5) for at in CALIBRATE_AT_S]
        psutil.cpu_percent(None)
        while not self._stop.wait(0.5):
            host_cpu = psutil.cpu_percent(None)  # over the last half second
            now = time.monotonic()
            if not due:
                if self.speed is not None:
                    return
                due.append(now + CALIBRATE_RETRY_S)  # still unknown: keep trying now and then
            idle = (host_cpu < IDLE_CPU_PERCENT and self._upload is None
                    and not (self.data is not None and self.data.busy))
            if now < due[0] or (self.speed is not None and not idle):
                continue
            due = [d for d in due if d > now]  # those missed while busy are one
            self._measure()

    def _stats_loop(self) -> None:
        proc = psutil.Process()
        proc.cpu_percent(None)
        while not self._stop.wait(self.config.stats_interval_s):
            try:
                self._send_stats(proc)
            except Exception:  # one missed report is no reason to stop reporting
                log.exception("stats not sent")

    def _cache_stats(self) -> dict[str, int]:
        """KV cache bytes and sequences held, for a stage of a language model."""
        dep = self._deployed()
        if dep is None or not isinstance(dep.runner, StatefulStage):
            return {}
        return {"kv": dep.runner.cache_bytes, "seqs": dep.runner.sequences}

    def _gpu_stats(self) -> dict[str, float | int]:
        """Use and memory of this node's GPU, where it runs on one."""
        index = parse_device(self.config.device)
        usage = gpu_usage(index) if index is not None else None
        return {} if usage is None else {"gpu": usage.percent, "gmem": usage.memory_used_bytes}

    def _send_stats(self, proc: psutil.Process) -> None:
        if self._master is None or self.channel is None:
            return
        silent = time.time() - self._master_seen
        if silent > MASTER_LOST_S and not self._master_lost:
            self._master_lost = True
            dep = self._deployed()
            stage = dep.stage if dep else None
            log.warning("master silent for %.1f s: keeping stage %s and waiting for a "
                        "master to come back", silent, stage)
        self.channel.post(self._master, encode("stats", {
            "node": self.node_id, "cpu": proc.cpu_percent(None),
            "rss": int(proc.memory_info().rss),
            "mem": float(psutil.virtual_memory().percent),
            "rejected": self.rejected,
            **({"speed": self.speed} if self.speed is not None else {}),
            **self._cache_stats(), **self._gpu_stats(),
        }))
        if self._advertiser is not None:
            self._advertiser.update(self._txt())
