#!/usr/bin/env python3
"""What recording metrics costs: requests/s of examples/hello at
concurrency 16 through a node that counts (the default) and one started
with --no-metrics, measured in alternating rounds so both see the same
machine. Run through bench/run-metrics. Results:
bench/results/metrics.md and bench/results/metrics.json.
"""
import argparse
import json
import statistics
import tempfile
import urllib.request
from pathlib import Path

import suite
from suite import Node, RESULTS, hello_manifest, wait_until_serving, wrk


def counted(node):
    """Invocations the node's per-function counters recorded."""
    info = json.loads((node.data_dir / "node.json").read_text())
    token = (node.data_dir / "admin-token").read_text().strip()
    req = urllib.request.Request(f"{info['admin_url']}/v1/stats",
                                 headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req) as resp:
        return sum(f["counters"]["invocations"] for f in json.load(resp))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, duration = (3, 2) if args.quick else (5, 5)
    work = Path(tempfile.mkdtemp(prefix="nimbus-metrics-"))
    nodes = {}
    try:
        for name, flags in [("metrics on", []), ("metrics off", ["--no-metrics"])]:
            d = work / name.replace(" ", "-")
            d.mkdir()
            node = Node(d / "data", flags)
            node.data_dir.mkdir()
            node.start()
            node.deploy(hello_manifest())
            wait_until_serving(node.port, "/hello")
            wrk(node.port, 16, 1)  # warm-up
            nodes[name] = node
        rps = {name: [] for name in nodes}
        for r in range(rounds):
            for name, node in nodes.items():
                result = wrk(node.port, 16, duration)
                rps[name].append(result["rps"])
                print(f"round {r + 1}: {name:<12} {result['rps']:>9.0f} req/s", flush=True)
        # The off node really counted nothing; the on node counted all.
        off_count = counted(nodes["metrics off"])
        on_count = counted(nodes["metrics on"])
    finally:
        for node in nodes.values():
            node.stop()
    on, off = statistics.median(rps["metrics on"]), statistics.median(rps["metrics off"])
    results = {
        "machine": suite.machine(), "rounds": rounds, "duration_s": duration, "concurrency": 16,
        "rps": rps, "median_on": on, "median_off": off, "ratio": on / off,
        "counted": {"metrics on": on_count, "metrics off": off_count},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# What recording metrics costs",
        "",
        f"{results['machine']}",
        "",
        f"examples/hello, wrk -t2 -c16, {rounds} alternating rounds of {duration} s per node.",
        "",
        "| node | median req/s | rounds |",
        "|---|---:|---|",
        f"| metrics on (default) | {on:,.0f} | {', '.join(f'{v:,.0f}' for v in rps['metrics on'])} |",
        f"| `--no-metrics` | {off:,.0f} | {', '.join(f'{v:,.0f}' for v in rps['metrics off'])} |",
        "",
        f"On / off: {on / off:.3f} (target ≥ 0.97). Invocations counted: "
        f"{on_count:,} with metrics on, {off_count} with them off.",
    ]
    (RESULTS / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
