#!/usr/bin/env python3
"""Asynchronous invocation benchmark: sustained accepted/s and completed/s
with durability on, enqueue-to-start latency at a paced 1,000/s, the cost of
one poison event among 10,000, and node memory as the queue grows to a
million events. Beside them, the floor of what durability costs: the same
events through a plain SQLite insert/update loop (WAL, synchronous = FULL).
Run through bench/run-async, which builds what it needs.
"""
import argparse
import http.client
import json
import os
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import suite
from suite import NIMBUS, ROOT, Node, percentile

TESTBED = ROOT / "tests/fixtures/target/wasm32-wasip2/release/testbed.wasm"
POST_LUA = ROOT / "bench/async-post.lua"
RESULTS = ROOT / "bench/results"


def sqlite_floor(events, batch):
    """Events/s through insert + update, committing every `batch` events."""
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "floor.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, state TEXT, body BLOB, created INTEGER)")
        body = b"x" * 32
        start = time.perf_counter()
        for first in range(0, events, batch):
            ids = range(first, min(first + batch, events))
            db.execute("BEGIN")
            db.executemany("INSERT INTO q VALUES (?, 'queued', ?, 0)", [(i, body) for i in ids])
            db.execute("COMMIT")
            db.execute("BEGIN")
            db.executemany("UPDATE q SET state = 'done' WHERE id = ?", [(i,) for i in ids])
            db.execute("COMMIT")
        return events / (time.perf_counter() - start)


class AsyncNode(Node):
    def admin(self):
        info = json.loads((self.data_dir / "node.json").read_text())
        token = (self.data_dir / "admin-token").read_text().strip()
        host = info["admin_url"].removeprefix("http://")
        return host, token

    def api(self, path):
        host, token = self.admin()
        conn = http.client.HTTPConnection(host, timeout=60)
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return json.loads(data)

    def wait_drained(self, timeout=600, left=0):
        """Waits until at most `left` invocations are queued or running."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.api("/v1/status")
            if s["async_queued"] + s["async_running"] <= left:
                return time.perf_counter()
            time.sleep(0.01)
        raise RuntimeError("the queue did not drain")

    def rss_kib(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def manifest(extra=""):
    return (f'[app]\nname = "bench"\n\n[functions.hello]\ncomponent = "{suite.HELLO}"\n'
            f'routes = ["/hello"]\nlimits = {{ max_concurrency = 1000 }}\n\n'
            f'[functions.testbed]\ncomponent = "{TESTBED}"\nroutes = ["/t/*"]\n'
            f'retry = {{ initial_backoff = "100ms" }}\n{extra}')


def wrk_post(port, path, connections, duration, body="event"):
    env = {**os.environ, "NIMBUS_REPORT": str(suite.REPORT), "NIMBUS_BODY": body}
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "-s", str(POST_LUA),
         f"http://127.0.0.1:{port}{path}"],
        check=True, capture_output=True, text=True, env=env).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def post_many(port, path, count, threads=8, bodies=None, rate=None):
    """Submits `count` async invocations over keep-alive connections; with
    `rate`, paced at that many per second in all."""
    errors = []

    def worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = range(k, count, threads)
        start = time.perf_counter()
        for n, i in enumerate(mine):
            if rate:
                due = start + n * threads / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            body = bodies(i) if bodies else b"event"
            conn.request("POST", path, body=body, headers={"Nimbus-Invocation-Type": "async"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 202:
                errors.append(resp.status)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} submissions refused: {errors[:5]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--queued", type=int, default=1_000_000, help="queue depth for the memory run")
    args = p.parse_args()
    duration = 2 if args.quick else 5
    queued = 100_000 if args.quick else args.queued
    results = {"machine": suite.machine(), "nimbus": subprocess.run(
        [str(NIMBUS), "--version"], capture_output=True, text=True).stdout.strip()}

    print("floor: plain SQLite insert + update loop")
    results["floor_per_event"] = sqlite_floor(2000, 1)
    results["floor_batched"] = sqlite_floor(50_000, 256)

    with tempfile.TemporaryDirectory() as tmp:
        node = AsyncNode(Path(tmp) / "data")
        (Path(tmp) / "data").mkdir()
        node.start()
        node.deploy(manifest())
        print("sustained: wrk, 16 connections")
        start = time.perf_counter()
        w = wrk_post(node.port, "/hello", 16, duration)
        done = node.wait_drained()
        results["accepted_per_s"] = w["rps"]
        results["accept_p50_ms"] = w["p50_us"] / 1000
        results["accept_p99_ms"] = w["p99_us"] / 1000
        results["completed_per_s"] = w["requests"] / (done - start)
        results["non_202"] = w["non_2xx"]

        print("latency: 1,000/s for", duration, "s")
        count = 1000 * duration
        post_many(node.port, "/hello", count, threads=4, rate=1000)
        node.wait_drained()
        records = node.api("/v1/functions/hello/invocations?limit=1000")
        waits = [r["attempts"][0]["started_at"] - r["created_at"] for r in records if r["attempts"]]
        results["enqueue_to_start_p50_ms"] = percentile(waits, 50)
        results["enqueue_to_start_p99_ms"] = percentile(waits, 99)

        print("poison: 10,000 events with and without one that traps every time")
        runs = {}
        for label, poison in (("clean", False), ("poison", True)):
            start = time.perf_counter()
            if poison:
                # First, so it competes for the function's slots all along.
                post_many(node.port, "/t/trap", 1, threads=1)
            post_many(node.port, "/t/ok", 10_000, threads=8)
            # The normal events are done when at most the poison is left.
            done = node.wait_drained(left=1 if poison else 0)
            runs[label] = 10_000 / (done - start)
            node.wait_drained()
        results["poison_clean_per_s"] = runs["clean"]
        results["poison_per_s"] = runs["poison"]
        dlq = node.api("/v1/functions/testbed/dlq")
        results["poison_dead_lettered"] = len(dlq)
        node.stop()

    with tempfile.TemporaryDirectory() as tmp:
        print(f"memory: {queued:,} queued events")
        node = AsyncNode(Path(tmp) / "data")
        (Path(tmp) / "data").mkdir()
        node.start()
        # One slot, one second per event: the queue only grows.
        node.deploy(manifest("limits = { async_concurrency = 1 }\n"))
        samples = [(0, node.rss_kib())]
        for target in (queued // 4, queued // 2, 3 * queued // 4, queued):
            while node.api("/v1/status")["async_queued"] < target:
                wrk_post(node.port, "/t/sleep?ms=1000", 16, 10)
            samples.append((node.api("/v1/status")["async_queued"], node.rss_kib()))
        results["memory"] = samples
        results["queue_db_mib"] = sum(
            f.stat().st_size for f in (Path(tmp) / "data").glob("queue.db*")) / 2**20
        node.stop()

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "async.json").write_text(json.dumps(results, indent=2) + "\n")
    md = render(results)
    (RESULTS / "async.md").write_text(md)
    print(md)


def render(r):
    m = r["machine"]
    lines = [
        "# Asynchronous invocations",
        "",
        f"{r['nimbus']} on {m['cpu']} ({m['cores']} cores), Linux {m['kernel']}. "
        "Durability on: every accepted event is fsync'd before its 202.",
        "",
        "| measure | value | beside |",
        "|---|---|---|",
        f"| accepted/s (wrk, 16 connections, hello) | {r['accepted_per_s']:,.0f} | p50 {r['accept_p50_ms']:.2f} ms, p99 {r['accept_p99_ms']:.2f} ms per 202 |",
        f"| completed/s (accept to last completion) | {r['completed_per_s']:,.0f} | {r['completed_per_s'] / r['floor_batched']:.2f}x the batched SQLite floor |",
        f"| plain SQLite insert+update, commit per event | {r['floor_per_event']:,.0f}/s | the naive durable loop |",
        f"| plain SQLite insert+update, commit per 256 | {r['floor_batched']:,.0f}/s | the floor of what durability costs |",
        f"| enqueue-to-start at 1,000/s | p50 {r['enqueue_to_start_p50_ms']:.0f} ms, p99 {r['enqueue_to_start_p99_ms']:.0f} ms | server clock, ms resolution |",
        f"| 10,000 events, clean | {r['poison_clean_per_s']:,.0f}/s | |",
        f"| 10,000 events + 1 poison | {r['poison_per_s']:,.0f}/s | {r['poison_per_s'] / r['poison_clean_per_s']:.2f}x clean; {r['poison_dead_lettered']} dead-lettered |",
        "",
        "Node memory while the queue grows (one slow consumer):",
        "",
        "| queued | RSS |",
        "|---|---|",
    ]
    for q, rss in r["memory"]:
        lines.append(f"| {q:,} | {rss / 1024:.0f} MiB |")
    lines += ["", f"queue.db on disk at the end: {r['queue_db_mib']:.0f} MiB", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
