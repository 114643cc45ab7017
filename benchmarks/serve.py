"""What `periphery serve` adds per HTTP request: a fresh connection against a kept-alive one.

Clients of an OpenAI-style endpoint (the `openai` package, httpx, requests sessions) keep their
connections alive, so the kept-alive figure is what they pay. It starts `periphery serve` on
mnist-8 from ../shared (two local nodes), then asks `GET /health` (the endpoint alone) and
`POST /v1/infer` (one image through both stages) --repeat times each way, interleaved, and
prints medians.

Run: `python benchmarks/serve.py [--repeat 50]`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_serve import _serving  # noqa: E402  (the tests' way of starting serve)

MNIST = ROOT.parent / "shared" / "data" / "models" / "mnist-8.onnx"
IMAGE = json.dumps({"inputs": {"Input3": {"dtype": "float32", "shape": [1, 1, 28, 28],
                                          "data": [0.5] * 784}}}).encode()


def ask(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> float:
    t = time.perf_counter()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"{method} {path}: HTTP {response.status}")
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    if not MNIST.is_file():
        print(f"error: {MNIST} not found: this benchmark needs ../shared", file=sys.stderr)
        return 2
    rows = []
    with _serving(MNIST, "--shards", "2") as server:
        for method, path, body in (("GET", "/health", None), ("POST", "/v1/infer", IMAGE)):
            fresh, kept = [], []
            alive = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            ask(alive, method, path, body)
            for _ in range(args.repeat):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                fresh.append(ask(conn, method, path, body))
                conn.close()
                kept.append(ask(alive, method, path, body))
            alive.close()
            rows.append((f"{method} {path}", statistics.median(fresh), statistics.median(kept)))
    t = Table(title=f"periphery serve, mnist-8 on 2 local nodes (medians of {args.repeat})",
              title_justify="left")
    for col in ("request", "fresh connection", "kept-alive connection"):
        t.add_column(col, justify="left" if col == "request" else "right")
    for name, fresh_s, kept_s in rows:
        t.add_row(name, f"{fresh_s * 1e3:.2f} ms", f"{kept_s * 1e3:.2f} ms")
    Console(width=100).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
