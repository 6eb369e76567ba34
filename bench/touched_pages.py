#!/usr/bin/env python3
"""How much memory one request touches: a cold start after scale to zero
against the warm request right after it.

Starts a node that scales hello to zero 200 ms after its last request
(as bench/suite.py does for cold start (b)). Before each request it
clears the node's page-referenced bits (`/proc/PID/clear_refs`, which
needs root), and after it reads how much of each of the node's mappings
was referenced since (`Referenced` in `/proc/PID/smaps`): the pages the
request touched, plus whatever the node's idle threads touched in the
same milliseconds (nothing, in 2 ms without a request). The times it
prints include the clear's own cost: it empties the TLB.
docs/performance.md uses it next to bench/idle_touch.py, which times such
touches after an idle wait.

    python3 bench/touched_pages.py [--nimbus target/release/nimbus] [--trials 30]
"""
import argparse
import collections
import os
import re
import statistics
import tempfile
from pathlib import Path

import suite

MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+(.*)$")


def referenced_kib(pid):
    """KiB referenced since the last clear, by mapping: the file's name and
    permissions, or `anon` and the mapping's size."""
    out = collections.Counter()
    name = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = MAPPING.match(line)
            if head:
                start, end, perms, path = head.groups()
                if path.strip():
                    name = f"{perms} {Path(path.strip()).name}"
                else:
                    mib = (int(end, 16) - int(start, 16)) >> 20
                    name = f"{perms} anon ({mib} MiB mapping)"
            elif line.startswith("Referenced:"):
                kib = int(line.split()[1])
                if kib:
                    out[name] += kib
    return out


def clear_referenced(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("1")


def touched_by_request(node):
    pid = node.proc.pid
    clear_referenced(pid)
    status, seconds = suite.get(node.port)
    assert status == 200, status
    return referenced_kib(pid), seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nimbus", help="the nimbus binary (default: target/release/nimbus)")
    ap.add_argument("--trials", type=int, default=30)
    args = ap.parse_args()
    if args.nimbus:
        suite.NIMBUS = Path(args.nimbus).resolve()
    if os.geteuid() != 0:
        raise SystemExit("touched_pages.py writes /proc/PID/clear_refs, which needs root")
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        data.mkdir()
        node = suite.Node(data, ["--scale-to-zero-after", "200ms"])
        node.start()
        try:
            node.deploy(suite.hello_manifest())
            node.wait_optimized()
            suite.get(node.port)
            cold, warm = collections.Counter(), collections.Counter()
            cold_total, warm_total, cold_s, warm_s = [], [], [], []
            for _ in range(args.trials):
                suite.wait_unloaded(node, "hello")
                kib, seconds = touched_by_request(node)
                cold.update(kib)
                cold_total.append(sum(kib.values()))
                cold_s.append(seconds)
                kib, seconds = touched_by_request(node)
                warm.update(kib)
                warm_total.append(sum(kib.values()))
                warm_s.append(seconds)
        finally:
            node.stop()
    c, w = statistics.median(cold_total), statistics.median(warm_total)
    print(f"{args.trials} trials, medians: the cold start touched {c:.0f} KiB ({c / 4:.0f} pages) "
          f"in {statistics.median(cold_s) * 1e6:.0f} µs; the warm request right after it "
          f"{w:.0f} KiB ({w / 4:.0f} pages) in {statistics.median(warm_s) * 1e6:.0f} µs")
    print(f"\nmean KiB per request, by mapping\n{'cold':>8} {'warm':>8}")
    for name, kib in cold.most_common():
        if kib / args.trials >= 8 or warm[name] / args.trials >= 8:
            print(f"{kib / args.trials:8.0f} {warm[name] / args.trials:8.0f}  {name}")


if __name__ == "__main__":
    main()
