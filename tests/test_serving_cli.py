"""`periphery run` as a user runs it against a `periphery cluster up`, with a node killed.

Everything is a real process: the cluster, its nodes, the run. The kill lands mid-stream: the
test reads the run's own Prometheus endpoint and kills the node running stage 1 once some
requests have completed (`cluster up --restart` starts it again), then expects exit 0, every
request checked against the unsharded model, and the recovery and the spreading back
reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from periphery_core.wire import PROTOCOL_VERSION
from tests.streaming import save_mlp
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "periphery_core.cli.main", *map(str, args)]


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(10)


@pytest.fixture
def cluster_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, list[str], str]]:
    """`periphery cluster up --nodes 3 --restart` with keys: (process, peers in order, master
    keys); its output goes to cluster-up.log."""
    log = open(tmp_path / "cluster-up.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(_cli("cluster", "up", "--nodes", 3, "--no-advertise", "--restart"),
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=tmp_path)
    try:
        def started() -> str | None:
            text = (tmp_path / "cluster-up.log").read_text()
            if proc.poll() is not None:
                raise AssertionError(f"cluster up exited {proc.returncode}: {text}")
            return text if "nodes up" in text else None

        text = wait_for(started, 60, "cluster up to start its nodes")
        peers = re.findall(r"--peer (\S+)", text)
        keys = re.search(r"--keys (\S+)", text)
        assert len(peers) == 3 and keys is not None, text
        yield proc, peers, keys.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            _kill_tree(proc)
        log.close()


def _node_process(cluster: subprocess.Popen, name: str) -> psutil.Process:
    for child in psutil.Process(cluster.pid).children(recursive=True):
        if name in child.cmdline():
            return child
    raise AssertionError(f"no node process named {name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _completed(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    m = re.search(r"^periphery_requests_total(?:\{\})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _run_killing(tmp_path: Path, shards: int, victim: str, nodes_of: subprocess.Popen | None,
                 *args: object) -> tuple[dict, str]:
    """`periphery run MODEL --plan PLAN ARGS --requests 12000 --check --exact --json` on a plan
    of `shards` stages of an MLP, with the node named `victim` (a child of `nodes_of`, else of
    the run) SIGKILLed once 100 requests have completed: its JSON summary and its stderr, after
    asserting that it exited 0 without a traceback and checked every request bit for bit."""
    model = save_mlp(tmp_path / "mlp.onnx")
    plan = tmp_path / "plan.json"
    subprocess.run(_cli("plan", model, "--shards", shards, "-o", plan), check=True, env=ENV,
                   capture_output=True, cwd=tmp_path)
    port = _free_port()  # for the run's metrics endpoint
    requests = 12000  # long enough for the loss, the restart and the join (about 1 ms each)
    run = subprocess.Popen(_cli("run", model, "--plan", plan, *args, "--requests", requests,
                                "--inflight", 8, "--check", "--exact", "--json",
                                "--metrics-port", port),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                           cwd=tmp_path)
    try:
        wait_for(lambda: run.poll() is not None or _completed(port) >= 100, 120,
                 "the run to complete 100 requests")
        assert run.poll() is None, "the run ended before the node could be killed"
        _node_process(nodes_of or run, victim).kill()
        out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            _kill_tree(run)
    assert run.returncode == 0, err
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["completed"] == requests
    assert summary["check"]["passed"] and summary["check"]["mismatches"] == 0
    assert summary["check"]["bit_identical_outputs"] == requests
    return summary, err


def test_run_recovers_from_a_node_killed_mid_stream_and_spreads_back_when_it_restarts(
        tmp_path: Path, cluster_up) -> None:
    """The node of stage 1 is SIGKILLed mid-stream and `cluster up --restart` starts it again
    at its address: the run recovers onto the two others, the new process joins, the run
    spreads back over three nodes, and every request completes with the whole model's
    result."""
    cluster, peers, keys = cluster_up
    args: list[object] = ["--keys", keys, "--no-mdns"]
    for p in peers:
        args += ["--peer", p]
    summary, err = _run_killing(tmp_path, 3, "local1", cluster, *args)
    (rec,) = summary["recoveries"]
    assert rec["lost"] == ["local1"] and rec["stages"] == ["local0", "local2"]
    (back,) = summary["spread_back"]
    assert back["joined"] == ["local1"], back
    assert sorted(back["stages"]) == ["local0", "local1", "local2"], back
    assert summary["shape"] == "1 x 3 stages" and len(summary["stages"]) == 3, summary
    assert [line for line in err.splitlines() if line.startswith("recovered:")], err
    assert [line for line in err.splitlines() if line.startswith("spread back:")], err
    # the cluster lives on, local1 started again where it listened
    assert cluster.poll() is None
    said = (tmp_path / "cluster-up.log").read_text()
    assert re.search(rf"node local1 exited \(signal 9\); started again at {peers[1]}, id \w+",
                     said), said
    assert len(_node_process(cluster, "local1").cmdline()) > 0
    print(f"\nperiphery run: loss detected after {rec['detected_s']:.2f} s, serving again "
          f"{rec['recovered_s']:.2f} s later, {rec['replayed']} requests replayed; spread back "
          f"over 3 nodes, {back['replayed']} requests replayed")


def test_run_local_starts_its_only_node_again_when_killed_and_loses_nothing(
        tmp_path: Path) -> None:
    """`periphery run --local` on one node: the node is the run's own, so when it is SIGKILLed
    mid-stream the run starts it again at its address (said on stderr), its recovery waits for
    the new process to join rather than failing for want of a node, and every request
    completes, checked bit for bit against the whole model."""
    summary, err = _run_killing(tmp_path, 1, "local0", None, "--local")
    (rec,) = summary["recoveries"]
    assert rec["lost"] == ["local0"] and rec["stages"] == ["local0"], rec
    restarted = re.findall(r"^node local0 exited \(signal 9\); started again at "
                           r"127\.0\.0\.1:\d+, id \w+$", err, re.M)
    assert len(restarted) == 1, err
    assert [line for line in err.splitlines() if line.startswith("recovered:")], err
    print(f"\nperiphery run --local: {restarted[0]}; loss detected after "
          f"{rec['detected_s']:.2f} s, serving again {rec['recovered_s']:.2f} s later, "
          f"{rec['replayed']} requests replayed")


def test_run_with_no_node_left_is_one_clear_line(tmp_path: Path) -> None:
    """The only node, one the run did not start (so none starts it again), is killed
    mid-stream: the recovery waits for a node to join, none does, and the run ends with one
    line saying so and what to do."""
    model = save_mlp(tmp_path / "mlp.onnx")
    plan = tmp_path / "plan.json"
    subprocess.run(_cli("plan", model, "--shards", 1, "-o", plan), check=True, env=ENV,
                   capture_output=True, cwd=tmp_path)
    node_port, port = _free_port(), _free_port()
    node = subprocess.Popen([sys.executable, "-m", "periphery_core.cli.node", "--name", "only",
                             "--host", "127.0.0.1", "--port", str(node_port), "--insecure",
                             "--no-advertise", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ENV, cwd=tmp_path)
    run = None
    try:
        assert node.stdout is not None and "ready" in node.stdout.readline()
        run = subprocess.Popen(_cli("run", model, "--plan", plan, "--peer",
                                    f"127.0.0.1:{node_port}", "--insecure", "--no-mdns",
                                    "--requests", 100000, "--inflight", 4, "--metrics-port",
                                    port),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV, cwd=tmp_path)
        wait_for(lambda: run.poll() is not None or _completed(port) >= 20, 60,
                 "the run to stream")
        node.kill()
        out, err = run.communicate(timeout=60)
    finally:
        for proc in (run, node):
            if proc is not None and proc.poll() is None:
                _kill_tree(proc)
    assert run.returncode == 2, (out, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "no node is left" in last, err
    assert "none joined within 10 s" in last, last


# A node of another release: the node's own code, speaking wire protocol 1 (before same-host
# shared memory), as an older `pip install periphery` on that host would.
_OLD_NODE = ("import sys, periphery_core.wire.codec as codec; codec.PROTOCOL_VERSION = 1; "
             "from periphery_core.cli.node import main; sys.exit(main())")


def test_a_node_of_another_release_is_named_in_one_line_at_once(tmp_path: Path) -> None:
    """`cluster ls` and `run` against a node that speaks another protocol version say so, and
    what to do, as soon as it answers (before, they waited out the timeout and blamed the
    network or the keys)."""
    port = _free_port()
    node = subprocess.Popen([sys.executable, "-c", _OLD_NODE, "--name", "old", "--host",
                             "127.0.0.1", "--port", str(port), "--insecure", "--no-advertise",
                             "--threads", "1", "--no-recalibrate"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ENV, cwd=tmp_path)
    try:
        assert node.stdout is not None and "ready" in node.stdout.readline()
        want = (f"node 127.0.0.1:{port} speaks wire protocol 1 and this master "
                f"{PROTOCOL_VERSION}: install the same Periphery release on both")
        t0 = time.monotonic()
        ls = subprocess.run(_cli("cluster", "ls", "--peer", f"127.0.0.1:{port}", "--no-mdns",
                                 "--insecure", "--json"), capture_output=True, text=True,
                            env=ENV, cwd=tmp_path, timeout=60)
        ls_s = time.monotonic() - t0
        assert ls.returncode == 0, ls.stderr
        (row,) = json.loads(ls.stdout)
        assert row["error"].startswith(want), row
        model = save_mlp(tmp_path / "mlp.onnx")
        plan = tmp_path / "plan.json"
        subprocess.run(_cli("plan", model, "--shards", 1, "-o", plan), check=True, env=ENV,
                       capture_output=True, cwd=tmp_path)
        run = subprocess.run(_cli("run", model, "--plan", plan, "--peer", f"127.0.0.1:{port}",
                                  "--no-mdns", "--insecure", "--requests", 4),
                             capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert want in run.stderr and run.stderr.strip().splitlines()[-1].startswith("error:")
        assert ls_s < 5, f"cluster ls took {ls_s:.1f} s"  # it waited 5 s for an answer before
        print(f"\ncluster ls named the other release in {ls_s:.1f} s: {row['error']}")
    finally:
        node.terminate()
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
