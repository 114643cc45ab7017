"""What the app works on, without any UI: the model, the cluster and the request load.

Design choice: every method here may block (loading, analysing, connecting, deploying), so the
app calls them only from thread workers and hears back through messages. `ClusterControl` owns the
`Master`, an optional `LocalCluster`, the `StateTracker` that folds the master's events, and
the core's `Pipeline`, the one serving object: the app deploys and streams through it, so a
lost node is re-planned around and its requests replayed exactly as `periphery run` does. The
app reads the folded `ClusterState` on a timer. `close()` is idempotent and safe from any
thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from periphery_core.cluster.handles import NodeHandle
from periphery_core.cluster.keys import KeyRing, keyring_or_insecure
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.cluster.tracker import StateTracker
from periphery_core.discovery import NodeAddress
from periphery_core.discovery.mdns_browser import MdnsBrowser
from periphery_core.discovery.static import parse_peer
from periphery_core.errors import PeripheryError
from periphery_core.generate.decoder import DecoderSpec, recognize
from periphery_core.model import LoadedModel, load_model
from periphery_core.model.analysis import ModelAnalysis, analyze
from periphery_core.partition.plan import ShardPlan
from periphery_core.progress import CancelToken, ProgressFn
from periphery_core.runtime.feeds import Feeds, random_feeds

if TYPE_CHECKING:  # the HTTP stack loads when an endpoint starts, not with the app
    from periphery_core.serve.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class OpenedModel:
    """A model loaded and analysed."""

    loaded: LoadedModel
    analysis: ModelAnalysis
    decoder: DecoderSpec | None = None  # a decoder LLM with a KV cache, recognised


def open_model(
    path: Path, progress: ProgressFn | None = None, cancel: CancelToken | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> OpenedModel:
    """Load and analyse a model (blocking), at the given input shapes (or dimension sizes).

    Raises:
        PeripheryError: the file is not a usable model, or a shape does not fit it.
    """
    loaded = load_model(path)
    return OpenedModel(loaded, analyze(loaded, shapes, progress=progress, cancel=cancel),
                       recognize(loaded))


class ClusterControl:
    """The cluster side of the app: master, local nodes, state tracker.

    Keys follow the CLI's rule: the master uses `keys_dir` (or $PERIPHERY_KEYS, or the default
    folder), or runs without keys only when `insecure` says so. Local nodes started before
    the master get fresh keys shared with it; started after an insecure master, none.
    """

    def __init__(self, keys_dir: Path | None = None, insecure: bool = False,
                 device: str = "cpu") -> None:
        self.keys_dir = keys_dir
        self.insecure = insecure
        self.device = device  # what local nodes run their stages on
        self._lock = threading.Lock()
        self._master: Master | None = None
        self.tracker: StateTracker | None = None
        self.local: LocalCluster | None = None
        self._browser: MdnsBrowser | None = None  # mDNS, from the Cluster screen's first look
        self.pipeline: Pipeline | None = None
        self.endpoint: Endpoint | None = None  # the deployed model over HTTP, when started
        self._closed = False

    def master(self) -> Master:
        """The master, started (with its threads) on the first call.

        Raises:
            PeripheryError: no keys were found and `insecure` was not given.
        """
        return self._ensure_master(None)

    def _ensure_master(self, local_keys: KeyRing | None) -> Master:
        with self._lock:
            if self._closed:
                raise PeripheryError("the cluster control is closed")
            if self._master is None:
                keys = local_keys or keyring_or_insecure(self.keys_dir, self.insecure)
                self._master = Master(keys=keys)
                self.tracker = StateTracker(self._master.bus)
            return self._master

    @property
    def master_failure(self) -> str | None:
        """Why the master stopped working (a thread of it died), or None."""
        master = self._master
        return master.failure if master is not None else None

    @property
    def has_master(self) -> bool:
        return self._master is not None

    def start_local(self, n: int) -> list[NodeHandle]:
        """Start `n` node processes on 127.0.0.1 and connect to each (blocking); from then on
        one that dies is started again at its address (`LocalCluster.watch`).

        Raises:
            PeripheryError: a node did not start or did not answer.
        """
        if self.local is not None:
            raise PeripheryError("local nodes are already running")
        existing = self._master
        if existing is not None and existing.guard.secure:
            raise PeripheryError("this master already uses keys of its own, which fresh local "
                                 "nodes would not trust: start local nodes before adding others")
        cluster = LocalCluster(n, secure=existing is None, device=self.device)
        cluster.start()
        self.local = cluster
        try:
            master = self._ensure_master(cluster.master_keys)
            handles = [master.connect(a) for a in cluster.addresses]
            # One that dies is started again (the event log says so) and the pipeline, having
            # recovered without it, spreads back over it.
            cluster.watch(master.bus.publish)
            return handles
        except BaseException:
            self.local = None
            cluster.stop()
            raise

    def start_discovery(self) -> None:
        """Browse mDNS for nodes, from now until `close` (idempotent). Interfaces come from
        $PERIPHERY_MDNS_INTERFACES (comma-separated addresses), else every interface."""
        with self._lock:
            if self._browser is not None or self._closed:
                return
            raw = os.environ.get("PERIPHERY_MDNS_INTERFACES", "")
            interfaces = [a.strip() for a in raw.split(",") if a.strip()] or None
            self._browser = MdnsBrowser(interfaces=interfaces)
        self._browser.start()

    def discovered(self) -> list[NodeAddress]:
        """Nodes advertised over mDNS now (none before `start_discovery`)."""
        browser = self._browser
        return browser.nodes() if browser is not None else []

    def connect_address(self, address: NodeAddress) -> NodeHandle:
        """Connect to a discovered node (blocking)."""
        return self.master().connect(address)

    def connect(self, spec: str) -> NodeHandle:
        """Connect to a node given as HOST:PORT (blocking).

        Raises:
            PeripheryError: the address is malformed or the node does not answer.
        """
        host, port = parse_peer(spec)
        key = f"{host}:{port}"
        address = NodeAddress(node_id=key, name=key, host=host, port=port, properties={},
                              source="static")
        return self.master().connect(address)

    def deploy(
        self,
        opened: OpenedModel,
        plan: ShardPlan,
        assignment: Sequence[str],
        progress: ProgressFn | None = None,
    ) -> None:
        """Deploy the plan, stage i to node `assignment[i]`, through the serving pipeline.

        A pipeline of the same model is redeployed in place: requests in flight are replayed
        on the new stages, so a load that streams meanwhile loses nothing.

        Raises:
            PeripheryError: extraction failed, a node is unknown or lost, or a node refused.
        """
        master = self.master()
        endpoint = self.endpoint
        if endpoint is not None and endpoint.service.pipeline.loaded is not opened.loaded:
            self.stop_endpoint()  # it served the model being replaced
        with self._lock:
            pipeline = self.pipeline
            if pipeline is None or pipeline.loaded is not opened.loaded:
                if pipeline is not None:
                    pipeline.close()
                # A language model's stages keep their own KV caches (generate.stateful).
                pipeline = self.pipeline = Pipeline(master, opened.loaded, opened.analysis,
                                                    plan=plan, decoder=opened.decoder)
        pipeline.deploy(list(assignment), plan=plan, progress=progress)

    def start_endpoint(self, opened: OpenedModel, port: int = 8000,
                       api_key: str | None = None) -> Endpoint:
        """Serve the deployed model over HTTP on 127.0.0.1 (`periphery serve`'s endpoint: a
        language model OpenAI-compatible, any other at /v1/infer), at `port` or, if that is
        taken, any free one.

        Raises:
            PeripheryError: nothing of this model is deployed, or no port can be had.
        """
        from periphery_core.serve.endpoint import Endpoint, listen, service_for

        pipeline = self.pipeline
        if pipeline is None or not pipeline.deployed or pipeline.loaded is not opened.loaded:
            raise PeripheryError("deploy the model first (Shards screen, 3), then serve it")
        self.stop_endpoint()
        try:
            sock = listen("127.0.0.1", port, api_key)
        except PeripheryError:
            sock = listen("127.0.0.1", 0, api_key)
        endpoint = Endpoint(service_for(pipeline, opened.loaded, opened.decoder), sock, api_key)
        endpoint.start()
        with self._lock:
            self.endpoint = endpoint
        return endpoint

    def stop_endpoint(self) -> None:
        with self._lock:
            endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.stop()
            endpoint.service.close()

    def close(self) -> None:
        """Close the master and stop local nodes; safe to call twice and from any thread."""
        self.stop_endpoint()
        with self._lock:
            self._closed = True
            master, self._master = self._master, None
            local, self.local = self.local, None
            tracker, self.tracker = self.tracker, None
            pipeline, self.pipeline = self.pipeline, None
            browser, self._browser = self._browser, None
        if browser is not None:
            browser.stop()
        if tracker is not None:
            tracker.close()
        if master is not None:  # first: it wakes a deploy or recovery waiting on a node
            master.close()
        if pipeline is not None:
            pipeline.close()
        if local is not None:
            local.stop()


@dataclass
class LoadFigures:
    """Counters of a running load, read by the UI."""

    inflight: int = 4
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    last_error: str = ""


def run_load(
    submit: Callable[[Feeds], Future],
    feeds_pool: Sequence[Feeds],
    *,
    stop: Callable[[], bool],
    figures: LoadFigures,
    wait_s: float = 0.25,
) -> None:
    """Stream requests with at most `figures.inflight` outstanding until `stop()` says so.

    A failed request is counted, not raised; a pipeline that cannot take requests (nothing
    deployed) raises `PeripheryError`.
    """
    window: list[Future] = []
    i = 0
    while not stop():
        while len(window) < max(1, figures.inflight) and not stop():
            window.append(submit(feeds_pool[i % len(feeds_pool)]))
            figures.submitted += 1
            i += 1
        if not window:
            break
        try:
            window[0].result(timeout=wait_s)
        except FutureTimeout:
            continue
        except PeripheryError as exc:
            figures.failed += 1
            figures.last_error = exc.message
            time.sleep(0.05)
        else:
            figures.completed += 1
        window.pop(0)
    # Outstanding requests are left to finish: cancelling a future the master still holds
    # would make its result thread fail when the answer arrives.


def feeds_for(analysis: ModelAnalysis, count: int = 4) -> list[Feeds]:
    """A few seeded random requests for a model."""
    return [random_feeds(analysis.inputs, seed=i) for i in range(count)]
