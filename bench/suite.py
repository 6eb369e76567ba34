#!/usr/bin/env python3
"""Nimbus benchmark suite: warm throughput and latency against `wasmtime
serve` and a native hyper server, cold starts, and deploy-to-first-response
against `wasmtime compile`. Run through bench/run, which installs the tools.
"""
import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NIMBUS = ROOT / "target/release/nimbus"
HELLO = ROOT / "examples/target/wasm32-wasip2/release/hello.wasm"
NATIVE = ROOT / "bench/target/release/native-hello"
REPORT = ROOT / "bench/report.lua"
RESULTS = ROOT / "bench/results"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path="/hello"):
    """One GET over a fresh connection; returns (status, seconds)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    elapsed = time.perf_counter() - start
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, elapsed


def wait_until_serving(port, path, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status, _ = get(port, path)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"nothing answered 200 on port {port}{path}")


class Node:
    """A `nimbus up` process on ephemeral ports."""

    def __init__(self, data_dir, flags=()):
        self.data_dir = Path(data_dir)
        self.flags = list(flags)
        self.proc = None
        self.port = None

    def start(self):
        node_file = self.data_dir / "node.json"
        if node_file.exists():
            node_file.unlink()
        self.port = free_port()
        log = open(self.data_dir.parent / "node.log", "a")
        self.proc = subprocess.Popen(
            [str(NIMBUS), "--data-dir", str(self.data_dir), "up", "--listen", f"127.0.0.1:{self.port}",
             "--admin-listen", "127.0.0.1:0", "--log-format", "json", *self.flags],
            stdout=log, stderr=log, env={**os.environ, "NIMBUS_LOG": "warn"})
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                info = json.loads(node_file.read_text())
                if info["pid"] == self.proc.pid:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        raise RuntimeError("node did not start")

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
            self.proc = None

    def deploy(self, manifest_text):
        path = self.data_dir.parent / "nimbus.toml"
        path.write_text(manifest_text)
        subprocess.run([str(NIMBUS), "--data-dir", str(self.data_dir), "deploy", str(path)],
                       check=True, stdout=subprocess.DEVNULL)

    def status(self):
        out = subprocess.run([str(NIMBUS), "--data-dir", str(self.data_dir), "status", "-o", "json"],
                             check=True, capture_output=True).stdout
        return json.loads(out)


def hello_manifest(component=HELLO, trial=None):
    env = f'env = {{ TRIAL = "{trial}" }}\n' if trial is not None else ""
    return (f'[app]\nname = "bench"\n\n[functions.hello]\ncomponent = "{component}"\n'
            f'routes = ["/hello"]\n{env}limits = {{ max_concurrency = 1000 }}\n')


def wrk(port, connections, duration):
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "-s", str(REPORT),
         f"http://127.0.0.1:{port}/hello"],
        check=True, capture_output=True, text=True).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def percentile(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def with_custom_section(component_bytes, tag):
    """A copy of a component with a unique custom section: a new digest, so
    the node has to compile it."""
    name = b"nimbus-bench"
    payload = bytes([len(name)]) + name + tag.encode()
    size = len(payload)
    leb = bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        leb.append(byte | (0x80 if size else 0))
        if not size:
            break
    return component_bytes + b"\x00" + bytes(leb) + payload


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wasmtime", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration", type=int)
    ap.add_argument("--trials", type=int)
    args = ap.parse_args()
    duration = args.duration or (2 if args.quick else 5)
    trials = args.trials or (20 if args.quick else 100)
    concurrency = [1, 16, 64]
    results = {"machine": machine(), "duration_s": duration, "trials": trials,
               "wasmtime": subprocess.run([args.wasmtime, "--version"], capture_output=True, text=True).stdout.strip(),
               "throughput": {}, "cold_start": {}, "deploy": {}}

    work = Path(tempfile.mkdtemp(prefix="nimbus-bench-"))
    node = Node(work / "data")
    node.data_dir.mkdir(parents=True)
    procs = []
    try:
        # Peers and Nimbus, all serving examples/hello.
        native_port = free_port()
        procs.append(subprocess.Popen([str(NATIVE), f"127.0.0.1:{native_port}"], stderr=subprocess.DEVNULL))
        wt_port = free_port()
        procs.append(subprocess.Popen([args.wasmtime, "serve", "-Scli", "--addr", f"127.0.0.1:{wt_port}", str(HELLO)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        node.start()
        node.deploy(hello_manifest())
        servers = {"native hyper": native_port, "wasmtime serve": wt_port, "nimbus": node.port}
        for port in servers.values():
            wait_until_serving(port, "/hello")

        # 1. Warm throughput and latency, side by side.
        for c in concurrency:
            for name, port in servers.items():
                wrk(port, c, 1)  # warm-up
                r = wrk(port, c, duration)
                results["throughput"].setdefault(name, {})[str(c)] = r
                print(f"c={c:<3} {name:<15} {r['rps']:>10.0f} req/s  p50 {r['p50_us']} µs  p99 {r['p99_us']} µs"
                      f"  p99.9 {r['p999_us']} µs  errors {r['socket_errors'] + r['non_2xx']}", flush=True)
        for p in procs:
            p.terminate()
            p.wait()
        procs.clear()

        # 2. Cold starts, each next to a warm request in the same trial.
        def trial_pairs(prepare):
            cold, warm = [], []
            for i in range(trials):
                prepare(i)
                s1, t1 = get(node.port)
                s2, t2 = get(node.port)
                assert s1 == 200 and s2 == 200, (s1, s2)
                cold.append(t1)
                warm.append(t2)
            return cold, warm

        def summarize(kind, cold, warm):
            entry = {"cold_p50_us": percentile(cold, 50) * 1e6, "cold_p99_us": percentile(cold, 99) * 1e6,
                     "warm_p50_us": percentile(warm, 50) * 1e6, "warm_p99_us": percentile(warm, 99) * 1e6}
            entry["ratio_p50"] = entry["cold_p50_us"] / entry["warm_p50_us"]
            results["cold_start"][kind] = entry
            print(f"cold start {kind:<22} p50 {entry['cold_p50_us']:.0f} µs  p99 {entry['cold_p99_us']:.0f} µs"
                  f"  (warm p50 {entry['warm_p50_us']:.0f} µs, ratio {entry['ratio_p50']:.2f})", flush=True)

        summarize("after deploy", *trial_pairs(lambda i: node.deploy(hello_manifest(trial=i))))

        def restart(_i):
            node.stop()
            node.start()

        summarize("after node restart", *trial_pairs(restart))
        stats = node.status()["engine"]
        results["cold_start"]["after node restart"]["compiled_after_restart"] = stats["compiled"]

        # 3. Deploy to first response of a never-seen component, next to
        # `wasmtime compile` of the same bytes.
        base = HELLO.read_bytes()
        deploy_times, compile_times = [], []
        for i in range(min(trials, 10)):
            comp = work / f"unique-{i}.wasm"
            comp.write_bytes(with_custom_section(base, f"{time.time_ns()}-{i}"))
            start = time.perf_counter()
            node.deploy(hello_manifest(component=comp))
            wait_until_serving(node.port, "/hello")
            deploy_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run([args.wasmtime, "compile", str(comp), "-o", str(work / "out.cwasm")], check=True)
            compile_times.append(time.perf_counter() - start)
        d = statistics.median(deploy_times)
        c = statistics.median(compile_times)
        results["deploy"] = {"deploy_to_first_response_ms": d * 1e3, "wasmtime_compile_ms": c * 1e3, "ratio": d / c,
                             "component_bytes": len(base)}
        print(f"deploy→first response {d * 1e3:.0f} ms, wasmtime compile {c * 1e3:.0f} ms (ratio {d / c:.2f})")
    finally:
        for p in procs:
            p.terminate()
        node.stop()

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(render(results, concurrency))
    print(f"\nwrote {RESULTS / 'latest.md'}")


def render(r, concurrency):
    m = r["machine"]
    lines = [f"# Benchmark results\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {m['rustc']}; {r['wasmtime']}. "
             f"wrk -t2, {r['duration_s']} s per point, all servers on this machine in one run.\n",
             "## Warm requests: examples/hello\n",
             "| concurrency | server | req/s | p50 µs | p99 µs | p99.9 µs | nimbus / this |",
             "|---|---|---|---|---|---|---|"]
    for c in concurrency:
        n = r["throughput"]["nimbus"][str(c)]["rps"]
        for name, points in r["throughput"].items():
            p = points[str(c)]
            ratio = "" if name == "nimbus" else f"{n / p['rps']:.2f}×"
            lines.append(f"| {c} | {name} | {p['rps']:.0f} | {p['p50_us']} | {p['p99_us']} | {p['p999_us']} | {ratio} |")
    lines += ["", f"## Cold starts ({r['trials']} trials each, measured at the client over a fresh connection)\n",
              "| first request | p50 µs | p99 µs | warm p50 µs | cold / warm (p50) |", "|---|---|---|---|---|"]
    for kind, e in r["cold_start"].items():
        lines.append(f"| {kind} | {e['cold_p50_us']:.0f} | {e['cold_p99_us']:.0f} | {e['warm_p50_us']:.0f} | {e['ratio_p50']:.2f} |")
    d = r["deploy"]
    lines += ["", "## Deploy to first response\n",
              f"A never-seen {d['component_bytes']} byte component: `nimbus deploy` until the first 200 takes "
              f"{d['deploy_to_first_response_ms']:.0f} ms (median); `wasmtime compile` of the same bytes "
              f"{d['wasmtime_compile_ms']:.0f} ms: ratio {d['ratio']:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
