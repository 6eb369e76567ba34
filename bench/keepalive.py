#!/usr/bin/env python3
"""Adaptive keep-alive against a fixed idle time: the same call traces,
replayed at once against two nodes, one with `--keep-alive adaptive` and
one with `--keep-alive fixed`, both with the same `--scale-to-zero-after`.
Time is compressed: bins of 100 ms stand for the default's minutes, and a
fixed idle time of 1 s for its 10 minutes. Counts cold starts, the calls'
latency at the client, and the share of the time each function's code was
in memory (the admin API polled every 50 ms). Run through bench/run-keepalive.
Results: bench/results/keepalive.{md,json}.
"""
import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from suite import HELLO, RESULTS, Node, get, machine

RESOLUTION = "100ms"
FIXED = "1s"


def admin(node, path):
    info = json.loads((node.data_dir / "node.json").read_text())
    token = (node.data_dir / "admin-token").read_text().strip()
    req = urllib.request.Request(f"{info['admin_url']}{path}",
                                 headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def cold_starts(node, function):
    prefix = f'faas_coldstarts_total{{function="{function}",'
    for line in admin(node, "/metrics").splitlines():
        if line.startswith(prefix):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def traces(calls, period, seed):
    """Arrival times (s from the start) of each trace's calls."""
    rng = random.Random(seed)
    out = {}
    t, periodic = 0.0, []
    for _ in range(calls):
        t += period * rng.uniform(0.95, 1.05)
        periodic.append(t)
    out["periodic"] = periodic
    t, poisson = 0.0, []
    for _ in range(calls):
        t += rng.expovariate(1 / period)
        poisson.append(t)
    out["poisson"] = poisson
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--period", type=float, default=1.5, help="mean seconds between calls")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    plan = traces(args.calls, args.period, args.seed)
    work = Path(tempfile.mkdtemp(prefix="nimbus-keepalive-"))
    policies = {
        "adaptive": ["--keep-alive", "adaptive", "--keep-alive-resolution", RESOLUTION],
        "fixed": ["--keep-alive", "fixed"],
    }
    nodes = {}
    manifest = '[app]\nname = "keepalive"\n' + "".join(
        f'\n[functions.{name}]\ncomponent = "{HELLO}"\nroutes = ["/{name}"]\n' for name in plan)
    try:
        for policy, flags in policies.items():
            node = Node(work / policy / "data", ["--scale-to-zero-after", FIXED, *flags])
            node.data_dir.mkdir(parents=True)
            node.start()
            node.deploy(manifest)
            node.wait_optimized()
            nodes[policy] = node
        loaded = {(p, f): 0 for p in nodes for f in plan}
        samples = [0]
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                for p, node in nodes.items():
                    for f in json.loads(admin(node, "/v1/functions")):
                        if f["name"] in plan and f["loaded"]:
                            loaded[(p, f["name"])] += 1
                samples[0] += 1
                stop.wait(0.05)

        events = sorted((t, f) for f, times in plan.items() for t in times)
        latency = {(p, f): [] for p in nodes for f in plan}
        # Each trace's first call loads the code on both nodes; the clock
        # and the counts start after it.
        for f in plan:
            for node in nodes.values():
                get(node.port, f"/{f}")
        before = {(p, f): cold_starts(n, f) for p, n in nodes.items() for f in plan}
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        start = time.monotonic()
        for i, (t, f) in enumerate(events):
            time.sleep(max(0.0, start + t - time.monotonic()))
            # Alternate which node is called first.
            order = list(nodes.items()) if i % 2 == 0 else list(reversed(nodes.items()))
            for p, node in order:
                status, seconds = get(node.port, f"/{f}")
                assert status == 200, (p, f, status)
                latency[(p, f)].append(seconds * 1e6)
        stop.set()
        thread.join()
        results = {"machine": machine(), "calls": args.calls, "period_s": args.period,
                   "resolution": RESOLUTION, "scale_to_zero_after": FIXED, "seed": args.seed, "rows": []}
        for f in plan:
            for p, node in nodes.items():
                lat = latency[(p, f)]
                row = {"trace": f, "policy": p, "calls": len(lat),
                       "cold_starts": cold_starts(node, f) - before[(p, f)],
                       "p50_us": round(statistics.median(lat)),
                       "mean_us": round(statistics.fmean(lat)),
                       "loaded_share": round(loaded[(p, f)] / max(samples[0], 1), 3)}
                results["rows"].append(row)
                print(f"{f:<9} {p:<9} calls {row['calls']:>3}  cold {row['cold_starts']:>3}  "
                      f"p50 {row['p50_us']:>6} µs  mean {row['mean_us']:>6} µs  "
                      f"loaded {100 * row['loaded_share']:.0f}% of the time", flush=True)
            for p, node in nodes.items():
                window = json.loads(admin(node, f"/v1/functions/{f}")).get("keep_alive")
                if window:
                    print(f"{f:<9} {p:<9} learnt window {window}")
    finally:
        for node in nodes.values():
            node.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "keepalive.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Calls per trace: {args.calls}, mean period {args.period} s, bins {RESOLUTION}, "
             f"`--scale-to-zero-after {FIXED}`, {results['machine']['cpu']}.", "",
             "| trace | keep-alive | calls | cold starts | p50 µs | mean µs | code in memory |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['trace']} | {r['policy']} | {r['calls']} | {r['cold_starts']} | {r['p50_us']} | "
                     f"{r['mean_us']} | {100 * r['loaded_share']:.0f}% |")
    (RESULTS / "keepalive.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
