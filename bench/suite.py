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
JSON_FN = ROOT / "bench/guests/target/wasm32-wasip2/release/json.wasm"
JS_FN = ROOT / "bench/guests/target/wasm32-wasip2/release/js.wasm"
TESTBED = ROOT / "tests/fixtures/target/wasm32-wasip2/release/testbed.wasm"
NATIVE = ROOT / "bench/target/release/native-hello"
REPORT = ROOT / "bench/report.lua"
RESULTS = ROOT / "bench/results"
# The idle wait before each request of the scale-to-zero trials: longer
# than the node's `--scale-to-zero-after 200ms`, and about as long as a
# wait for that unload took in earlier runs (p50 310 ms).
IDLE_WAIT = 0.3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_all(sock):
    """Everything the peer sends until it closes."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def get(port, path="/hello"):
    """One GET over a fresh connection; returns (status, seconds)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = read_all(s)
    elapsed = time.perf_counter() - start
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, elapsed


def wait_until_serving(port, path, timeout=60, ok=(200,)):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status, _ = get(port, path)
            if status in ok:
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

    def wait_optimized(self, timeout=300):
        """Until every compiled component's optimising compile is done (a
        new component serves from baseline code until then)."""
        deadline = time.time() + timeout
        while True:
            e = self.status()["engine"]
            if e["optimized"] >= e["compiled"]:
                return
            assert time.time() < deadline, "optimising compiles did not finish"
            time.sleep(0.1)

    def status(self):
        out = subprocess.run([str(NIMBUS), "--data-dir", str(self.data_dir), "status", "-o", "json"],
                             check=True, capture_output=True).stdout
        return json.loads(out)


APP = '[app]\nname = "bench"\n'


def function_entry(name, component, route, extra=""):
    """One function of a bench manifest; `extra` adds settings."""
    return (f'\n[functions.{name}]\ncomponent = "{component}"\nroutes = ["{route}"]\n{extra}'
            f'limits = {{ max_concurrency = 1000 }}\n')


def hello_manifest(component=HELLO, trial=None):
    env = f'env = {{ TRIAL = "{trial}" }}\n' if trial is not None else ""
    return APP + function_entry("hello", component, "/hello", env)


def scenarios_manifest():
    """Every warm scenario on one node: hello (fresh and reused instances),
    the JSON function and the large JavaScript one."""
    fns = [("hello", HELLO, "/hello", ""), ("reuse", HELLO, "/reuse/hello", "reuse = 10000\n"),
           ("json", JSON_FN, "/json", ""), ("js", JS_FN, "/js", ""),
           ("jsreuse", JS_FN, "/reuse/js", "reuse = 10000\n")]
    return APP + "".join(function_entry(*f) for f in fns)


def orders_body(target=10_000):
    """A JSON batch of orders of about `target` bytes."""
    orders, i = [], 0
    while True:
        orders.append({"id": i, "customer": f"customer-{i % 17}", "tags": ["web", "priority"] if i % 3 == 0 else ["web"],
                       "items": [{"sku": f"sku-{i}-{k}", "qty": 1 + (i + k) % 4, "price": round(3.5 + (i * 7 + k) % 90, 2)}
                                 for k in range(3)]})
        text = json.dumps({"orders": orders})
        if len(text) >= target:
            return text
        i += 1


def post_script(work, body):
    """A wrk script posting `body`, reporting as report.lua does."""
    path = work / "post.lua"
    path.write_text(f"wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
                    f"wrk.body = {json.dumps(body)}\n" + REPORT.read_text())
    return path


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_unloaded(node, function, timeout=30):
    """Until the node reports `function`'s code unloaded (scaled to zero),
    polling its admin API every 50 ms."""
    deadline = time.time() + timeout
    while admin_get(node, f"/v1/functions/{function}")["loaded"]:
        assert time.time() < deadline, f"{function} never scaled to zero"
        time.sleep(0.05)


def admin_get(node, path):
    """GET on the node's admin API with its token."""
    import urllib.request
    info = json.loads((node.data_dir / "node.json").read_text())
    token = (node.data_dir / "admin-token").read_text().strip()
    req = urllib.request.Request(info["admin_url"] + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wrk(port, connections, duration, path="/hello", script=REPORT):
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "-s", str(script),
         f"http://127.0.0.1:{port}{path}"],
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
    ap.add_argument("--nimbus", help="the nimbus binary to measure (default: target/release/nimbus)")
    ap.add_argument("--native", help="the native peer's binary (default: bench/target/release/native-hello)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration", type=int)
    ap.add_argument("--trials", type=int)
    args = ap.parse_args()
    global NIMBUS, NATIVE
    NIMBUS = Path(args.nimbus) if args.nimbus else NIMBUS
    NATIVE = Path(args.native) if args.native else NATIVE
    duration = args.duration or (2 if args.quick else 5)
    trials = args.trials or (20 if args.quick else 100)
    concurrency = [1, 16, 64]
    results = {"machine": machine(), "duration_s": duration, "trials": trials,
               "wasmtime": subprocess.run([args.wasmtime, "--version"], capture_output=True, text=True).stdout.strip(),
               "throughput": {}, "scenarios": {}, "cold_start": {}, "deploy": {}, "density": {},
               "component_bytes": {"hello": HELLO.stat().st_size, "json": JSON_FN.stat().st_size,
                                   "js": JS_FN.stat().st_size},
               "binaries": {name: str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
                            for name, path in [("nimbus", NIMBUS), ("native", NATIVE)]}}

    work = Path(tempfile.mkdtemp(prefix="nimbus-bench-"))
    node = Node(work / "data")
    node.data_dir.mkdir(parents=True)
    procs = []
    try:
        # Peers and Nimbus side by side: a native server (the ceiling) and
        # one `wasmtime serve` per component.
        native_port = free_port()
        procs.append(subprocess.Popen([str(NATIVE), f"127.0.0.1:{native_port}"], stderr=subprocess.DEVNULL))
        wt = {}
        for name, comp in [("hello", HELLO), ("json", JSON_FN), ("js", JS_FN)]:
            wt[name] = free_port()
            procs.append(subprocess.Popen([args.wasmtime, "serve", "-Scli", "--addr", f"127.0.0.1:{wt[name]}", str(comp)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        node.start()
        node.deploy(scenarios_manifest())
        node.wait_optimized()
        # The JSON function answers a GET (no body) with 400: serving.
        for port in [native_port, node.port, *wt.values()]:
            wait_until_serving(port, "/hello", ok=(200, 400))
        wait_until_serving(node.port, "/json", ok=(400,))
        wait_until_serving(node.port, "/js")
        body = orders_body()
        post = post_script(work, body)

        def point(label, port, c, path="/hello", script=REPORT):
            wrk(port, c, 1, path, script)  # warm-up
            r = wrk(port, c, duration, path, script)
            print(f"c={c:<3} {label:<22} {r['rps']:>10.0f} req/s  p50 {r['p50_us']} µs  p99 {r['p99_us']} µs"
                  f"  p99.9 {r['p999_us']} µs  errors {r['socket_errors'] + r['non_2xx']}", flush=True)
            return r

        # 1. Warm throughput and latency of hello.
        hello_servers = {"native hyper": (native_port, "/hello"), "wasmtime serve": (wt["hello"], "/hello"),
                         "nimbus": (node.port, "/hello"), "nimbus, reuse": (node.port, "/reuse/hello")}
        for c in concurrency:
            for name, (port, path) in hello_servers.items():
                results["throughput"].setdefault(name, {})[str(c)] = point(name, port, c, path)

        # 2. Real work (JSON, 10 KB bodies) and a large interpreter-based
        # component, at concurrency 1 and 16.
        other = {
            "json": {"native hyper": (native_port, "/json"), "wasmtime serve": (wt["json"], "/json"),
                     "nimbus": (node.port, "/json")},
            "js": {"wasmtime serve": (wt["js"], "/js"), "nimbus": (node.port, "/js"),
                   "nimbus, reuse": (node.port, "/reuse/js")},
        }
        for scenario, servers in other.items():
            for c in [1, 16]:
                for name, (port, path) in servers.items():
                    script = post if scenario == "json" else REPORT
                    r = point(f"{scenario}: {name}", port, c, path, script)
                    results["scenarios"].setdefault(scenario, {}).setdefault(name, {})[str(c)] = r
        results["json_body_bytes"] = len(body)

        # 3. Cold starts, each next to a warm request in the same trial.
        # The warm request right after a cold one follows it back to back.
        # A cold request after scale to zero follows an idle wait, and on
        # this machine the first request after the CPUs idled is slower
        # whatever serves it, so that kind is also set against requests
        # after the same waits (below). The pauses before the other kinds
        # (a deploy, a restart) keep the CPUs busy, so their back-to-back
        # reference is the fair one.
        def trial_pairs(prepare, path="/hello"):
            cold, warm, pauses = [], [], []
            for i in range(trials):
                paused = time.perf_counter()
                prepare(i)
                pauses.append(time.perf_counter() - paused)
                s1, t1 = get(node.port, path)
                s2, t2 = get(node.port, path)
                assert s1 == 200 and s2 == 200, (s1, s2)
                cold.append(t1)
                warm.append(t2)
            return cold, warm, pauses

        def summarize(kind, cold, warm, pauses):
            entry = {"cold_p50_us": percentile(cold, 50) * 1e6, "cold_p99_us": percentile(cold, 99) * 1e6,
                     "warm_p50_us": percentile(warm, 50) * 1e6, "warm_p99_us": percentile(warm, 99) * 1e6,
                     "pause_p50_ms": percentile(pauses, 50) * 1e3}
            entry["ratio_p50"] = entry["cold_p50_us"] / entry["warm_p50_us"]
            results["cold_start"][kind] = entry
            print(f"cold start {kind:<22} p50 {entry['cold_p50_us']:.0f} µs  p99 {entry['cold_p99_us']:.0f} µs"
                  f"  (warm p50 {entry['warm_p50_us']:.0f} µs, ratio {entry['ratio_p50']:.2f})", flush=True)
            return entry

        # The wasmtime servers are done; the native one stays for the
        # control after idle waits.
        native_proc = procs[0]
        for p in procs[1:]:
            p.terminate()
            p.wait()
        del procs[1:]
        native_back = [get(native_port)[1] for _ in range(trials)]

        node.deploy(hello_manifest())
        summarize("after deploy", *trial_pairs(lambda i: node.deploy(hello_manifest(trial=i))))

        # (b) Scaled to zero: the node unloads a function 200 ms after its
        # last request. Each trial makes three requests, each after the
        # same idle wait (IDLE_WAIT, spent polling the admin API every
        # 50 ms as a wait for scale to zero is): to hello, scaled to zero
        # (then once more, back to back); to a copy of it on the same node
        # kept warm with `prewarm = 1` (its own digest, so its code is
        # loaded apart); and to the native server, the control. The three
        # kinds are interleaved so that a drift of the shared host between
        # blocks of trials cannot fall on one side of a ratio.
        node.stop()
        node.flags = ["--scale-to-zero-after", "200ms"]
        node.start()
        warm_copy = work / "hello-warm.wasm"
        warm_copy.write_bytes(with_custom_section(HELLO.read_bytes(), "kept warm"))
        node.deploy(hello_manifest() + function_entry("warm", warm_copy, "/warm", "prewarm = 1\n"))
        node.wait_optimized()

        def after_idle_wait(port, path="/hello", ready=lambda state: True):
            """A request after IDLE_WAIT (longer if the last poll of hello's
            state is not `ready`); returns the wait and the latency."""
            began = time.perf_counter()
            end = began + IDLE_WAIT
            while True:
                state = admin_get(node, "/v1/functions/hello")
                left = end - time.perf_counter()
                if left <= 0 and ready(state):
                    break
                time.sleep(min(0.05, left) if left > 0 else 0.05)
            waited = time.perf_counter() - began
            status, t = get(port, path)
            assert status == 200, (path, status)
            return waited, t

        get(node.port)
        get(node.port, "/warm")
        cold, warm, pauses, kept_warm, native_paused = [], [], [], [], []
        for _ in range(trials):
            waited, t = after_idle_wait(node.port, ready=lambda state: not state["loaded"])
            pauses.append(waited)
            cold.append(t)
            status, t = get(node.port)
            assert status == 200, status
            warm.append(t)
            kept_warm.append(after_idle_wait(node.port, "/warm")[1])
            native_paused.append(after_idle_wait(native_port)[1])
        entry = summarize("after scale to zero", cold, warm, pauses)
        entry["warm_after_pause_p50_us"] = percentile(kept_warm, 50) * 1e6
        entry["ratio_after_pause_p50"] = entry["cold_p50_us"] / entry["warm_after_pause_p50_us"]
        print(f"cold start {'after scale to zero':<22} warm (prewarm = 1) after the same idle waits p50 "
              f"{entry['warm_after_pause_p50_us']:.0f} µs, ratio {entry['ratio_after_pause_p50']:.2f}", flush=True)
        results["cold_start_control"] = {
            "native_back_to_back_p50_us": percentile(native_back, 50) * 1e6,
            "native_after_same_pauses_p50_us": percentile(native_paused, 50) * 1e6,
        }
        ctl = results["cold_start_control"]
        print(f"control: native hyper p50 {ctl['native_back_to_back_p50_us']:.0f} µs back to back, "
              f"{ctl['native_after_same_pauses_p50_us']:.0f} µs after the same idle waits", flush=True)
        native_proc.terminate()
        native_proc.wait()
        procs.clear()

        node.deploy(hello_manifest())
        node.stop()
        node.flags = []
        node.start()

        def restart(_i):
            node.stop()
            node.start()

        summarize("after node restart", *trial_pairs(restart))
        stats = node.status()["engine"]
        results["cold_start"]["after node restart"]["compiled_after_restart"] = stats["compiled"]

        # 4. Deploy to first response of a never-seen component, next to
        # `wasmtime compile` of the same bytes: hello and the large one.
        for label, source in [("hello", HELLO), ("js", JS_FN)]:
            base = source.read_bytes()
            deploy_times, compile_times = [], []
            for i in range(min(trials, 10 if label == "hello" else 3)):
                comp = work / f"unique-{label}-{i}.wasm"
                comp.write_bytes(with_custom_section(base, f"{time.time_ns()}-{i}"))
                start = time.perf_counter()
                node.deploy(hello_manifest(component=comp))
                wait_until_serving(node.port, "/hello")
                deploy_times.append(time.perf_counter() - start)
                # The node's background compile must not share the CPU
                # with the peer's.
                node.wait_optimized()
                start = time.perf_counter()
                subprocess.run([args.wasmtime, "compile", str(comp), "-o", str(work / "out.cwasm")], check=True)
                compile_times.append(time.perf_counter() - start)
            d = statistics.median(deploy_times)
            c = statistics.median(compile_times)
            results["deploy"][label] = {"deploy_to_first_response_ms": d * 1e3, "wasmtime_compile_ms": c * 1e3,
                                        "ratio": d / c, "component_bytes": len(base)}
            print(f"deploy→first response ({label}) {d * 1e3:.0f} ms, wasmtime compile {c * 1e3:.0f} ms "
                  f"(ratio {d / c:.2f})", flush=True)
        node.stop()

        # 5. Density.
        results["density"] = density(work, args.quick)
    finally:
        for p in procs:
            p.terminate()
        node.stop()

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(render(results, concurrency))
    print(f"\nwrote {RESULTS / 'latest.md'}")


def density(work, quick):
    """Node RSS with 1 to 10,000 deployed idle functions, routing latency
    with 10,000 next to 1, and RSS per executing instance."""
    out = {"idle_rss_kib": {}}
    node = Node(work / "density" / "data", flags=["--scale-to-zero-after", "1s"])
    node.data_dir.mkdir(parents=True)
    node.start()
    try:
        def manifest(n, component=HELLO, extra=""):
            text = '[app]\nname = "density"\n'
            for i in range(n):
                text += f'\n[functions.f{i}]\ncomponent = "{component}"\nroutes = ["/f{i}/*"]\n{extra}'
            return text

        def idle_rss(n):
            deadline = time.time() + 120
            while any(f["loaded"] for f in admin_get(node, "/v1/functions")):
                assert time.time() < deadline, "functions never went idle"
                time.sleep(0.5)
            time.sleep(1)
            return rss_kib(node.proc.pid)

        out["idle_rss_kib"]["0"] = rss_kib(node.proc.pid)
        for n in [1, 100, 1000, 10000]:
            start = time.perf_counter()
            node.deploy(manifest(n))
            took = time.perf_counter() - start
            node.wait_optimized()
            wait_until_serving(node.port, f"/f{n - 1}/hello")
            out["idle_rss_kib"][str(n)] = idle_rss(n)
            print(f"density: {n:>5} idle functions, RSS {out['idle_rss_kib'][str(n)] / 1024:.1f} MiB "
                  f"(deployed in {took:.1f} s)", flush=True)

        # Routing: a node with 1 function beside this one with 10,000, the
        # last function's route on each, one connection, in alternating
        # rounds so both see the same machine.
        single = Node(work / "single" / "data")
        single.data_dir.mkdir(parents=True)
        single.start()
        try:
            single.deploy(manifest(1))
            single.wait_optimized()
            targets = {"1": (single.port, "/f0/hello"), "10000": (node.port, "/f9999/hello")}
            rounds = {k: [] for k in targets}
            for port, path in targets.values():
                wrk(port, 1, 1, path)
            for _ in range(3 if quick else 5):
                for k, (port, path) in targets.items():
                    rounds[k].append(wrk(port, 1, 2, path))
        finally:
            single.stop()
        med = {k: statistics.median(r["p50_us"] for r in v) for k, v in rounds.items()}
        out["routing"] = {k: {"p50_us": med[k], "rounds_p50_us": [r["p50_us"] for r in v]} for k, v in rounds.items()}
        out["routing"]["ratio_p50"] = med["10000"] / med["1"]
        print(f"routing p50 with 10,000 functions {med['10000']} µs, with 1 {med['1']} µs "
              f"(ratio {out['routing']['ratio_p50']:.2f}, medians of alternating rounds)", flush=True)

        # 1,000 requests in flight over 100 functions, each instance
        # sleeping 3 s inside the guest, on a node of their own (memory the
        # allocator kept from the phases above would hide what instances
        # add).
        node.stop()
        node = Node(work / "inflight" / "data")
        node.data_dir.mkdir(parents=True)
        node.start()
        node.deploy(manifest(100, TESTBED, "limits = { max_concurrency = 10, timeout = \"30s\" }\n"))
        node.wait_optimized()
        for i in range(100):
            wait_until_serving(node.port, f"/f{i}/ok")
        base = rss_kib(node.proc.pid)
        socks = []
        for k in range(1000):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
            s.sendall(f"GET /f{k % 100}/sleep?ms=3000 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            socks.append(s)
        peak = base
        deadline = time.time() + 2.5
        while time.time() < deadline:
            peak = max(peak, rss_kib(node.proc.pid))
            time.sleep(0.05)
        ok = 0
        for s in socks:
            ok += read_all(s).startswith(b"HTTP/1.1 200")
            s.close()
        out["in_flight"] = {"requests": 1000, "ok": ok, "rss_before_kib": base, "rss_peak_kib": peak,
                            "per_instance_kib": (peak - base) / 1000}
        print(f"1,000 in flight over 100 functions: {ok} answered 200, RSS {base / 1024:.1f} → {peak / 1024:.1f} MiB, "
              f"{(peak - base) / 1000:.0f} KiB per instance", flush=True)
    finally:
        node.stop()
    return out


def points_of(servers, name, c):
    return servers[name][c]["rps"]


def render(r, concurrency):
    m = r["machine"]
    sizes = r["component_bytes"]
    lines = [f"# Benchmark results\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {m['rustc']}; {r['wasmtime']}. "
             f"wrk -t2 (-t1 at c=1), {r['duration_s']} s per point, all servers on this machine in one run.\n",
             *([f"Binaries measured: `{r['binaries']['nimbus']}` and `{r['binaries']['native']}`.\n"]
               if "binaries" in r else []),
             f"## Warm requests: examples/hello ({sizes['hello']:,} bytes)\n",
             "`nimbus` gives every request a fresh instance; `nimbus, reuse` is the same component with "
             "`reuse = 10000` (one instance serves requests one after another).\n",
             "| concurrency | server | req/s | p50 µs | p99 µs | p99.9 µs | nimbus / this | nimbus, reuse / this |",
             "|---|---|---|---|---|---|---|---|"]
    for c in concurrency:
        n = r["throughput"]["nimbus"][str(c)]["rps"]
        nr = r["throughput"]["nimbus, reuse"][str(c)]["rps"]
        for name, points in r["throughput"].items():
            p = points[str(c)]
            ratio = "" if name.startswith("nimbus") else f"{n / p['rps']:.2f}×"
            ratio_r = "" if name.startswith("nimbus") else f"{nr / p['rps']:.2f}×"
            lines.append(f"| {c} | {name} | {p['rps']:.0f} | {p['p50_us']} | {p['p99_us']} | {p['p999_us']} | {ratio} | {ratio_r} |")
    titles = {"json": f"## Real work: JSON parse and transform of a {r.get('json_body_bytes', 0):,} byte body "
                      f"(bench/guests/json, {sizes['json']:,} bytes)\n",
              "js": f"## A large interpreter-based component: JavaScript on the Boa engine "
                    f"(bench/guests/js, {sizes['js']:,} bytes)\n\nThe component exports `wizer-initialize`: "
                    f"`nimbus` runs it once when it builds the optimised code, so each fresh instance starts with "
                    f"the interpreter loaded; `wasmtime serve` starts it on every request. `nimbus, reuse` keeps "
                    f"the instance for its next request (`reuse = 10000`).\n"}
    for scenario, servers in r["scenarios"].items():
        lines += ["", titles[scenario], "| concurrency | server | req/s | p50 µs | p99 µs | nimbus / this |", "|---|---|---|---|---|---|"]
        for c in ["1", "16"]:
            n = servers["nimbus"][c]["rps"]
            for name, points in servers.items():
                p = points[c]
                ratio = "" if name.startswith("nimbus") else f"{n / p['rps']:.2f}×"
                if name == "nimbus, reuse":
                    ratio = f"({p['rps'] / points_of(servers, 'wasmtime serve', c):.2f}× wasmtime serve)"
                lines.append(f"| {c} | {name} | {p['rps']:.0f} | {p['p50_us']} | {p['p99_us']} | {ratio} |")
    lines += ["", f"## Cold starts ({r['trials']} trials each, measured at the client over a fresh connection)\n",
              "Each cold request comes after a pause (the deploy, the idle wait, the restart); the first warm "
              "column is the request right after it, back to back. After scale to zero the pause is an idle wait "
              f"({IDLE_WAIT * 1e3:.0f} ms, polling the admin API every 50 ms), so that kind is also set against a "
              "warm request after the same wait: to a copy of hello on the same node kept warm with `prewarm = 1`, "
              "interleaved with the cold trials.\n",
              "| first request | p50 µs | p99 µs | pause p50 ms | warm p50 µs, back to back | cold / warm | "
              "warm p50 µs, after the same idle waits | cold / warm after the same idle waits |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, e in r["cold_start"].items():
        lines.append(f"| {kind} | {e['cold_p50_us']:.0f} | {e['cold_p99_us']:.0f} | {e.get('pause_p50_ms', 0):.0f} | "
                     f"{e['warm_p50_us']:.0f} | {e['ratio_p50']:.2f} | "
                     + (f"{e['warm_after_pause_p50_us']:.0f} | {e['ratio_after_pause_p50']:.2f} |"
                        if "warm_after_pause_p50_us" in e else "| |"))
    ctl = r.get("cold_start_control")
    if ctl:
        lines += ["", f"Control: the native hyper server answers in {ctl['native_back_to_back_p50_us']:.0f} µs (p50) "
                  f"back to back and in {ctl['native_after_same_pauses_p50_us']:.0f} µs after the same idle waits, "
                  f"interleaved with the cold trials "
                  f"({ctl['native_after_same_pauses_p50_us'] / ctl['native_back_to_back_p50_us']:.2f}×): an idle "
                  "wait alone costs that much, with no function to load."]
    lines += ["", "## Deploy to first response\n",
              "A never-seen component: `nimbus deploy` until the first 200, next to `wasmtime compile` of the same bytes (medians).\n",
              "| component | bytes | deploy → first response ms | wasmtime compile ms | ratio |", "|---|---|---|---|---|"]
    for label, d in r["deploy"].items():
        lines.append(f"| {label} | {d['component_bytes']:,} | {d['deploy_to_first_response_ms']:.0f} | "
                     f"{d['wasmtime_compile_ms']:.0f} | {d['ratio']:.2f} |")
    dn = r.get("density")
    if dn:
        lines += ["", "## Density\n",
                  "Idle functions (each its own route, config, counters and registry row; all built from "
                  "examples/hello), node RSS once every function has scaled to zero:\n",
                  "| deployed functions | node RSS MiB |", "|---|---|"]
        for n, kib in dn["idle_rss_kib"].items():
            lines.append(f"| {int(n):,} | {kib / 1024:.1f} |")
        rt = dn["routing"]
        f = dn["in_flight"]
        lines += ["",
                  f"Routing (wrk, one connection, the last function's route, a node with 10,000 functions and one "
                  f"with 1 in alternating rounds, median p50): {rt['10000']['p50_us']} µs with 10,000 functions, "
                  f"{rt['1']['p50_us']} µs with 1 (ratio {rt['ratio_p50']:.2f}).", "",
                  f"{f['requests']:,} requests in flight over 100 functions (tests/fixtures/testbed sleeping 3 s in "
                  f"the guest): {f['ok']:,} answered 200; node RSS {f['rss_before_kib'] / 1024:.1f} → "
                  f"{f['rss_peak_kib'] / 1024:.1f} MiB, {f['per_instance_kib']:.0f} KiB per executing instance.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
