#!/usr/bin/env python3
"""The training run of a profile-guided build (bench/pgo): drives
instrumented builds of Nimbus and of the native peer through the paths the
benchmark measures, so the optimised build lays out and inlines for them.

Nimbus: warm requests to hello (fresh and reused instances), the JSON
function and the JavaScript one; cold starts after scale to zero and after
a restart. The native peer: /hello and /json. Each process is stopped with
SIGTERM, so it exits through `main` and writes its profile.
"""

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import suite

SECONDS = 3


def train_native(native, work):
    port = suite.free_port()
    proc = subprocess.Popen([str(native), f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    try:
        suite.wait_until_serving(port, "/hello")
        post = suite.post_script(work, suite.orders_body())
        for c in [1, 16]:
            suite.wrk(port, c, SECONDS, "/hello")
            suite.wrk(port, c, SECONDS, "/json", post)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def train_nimbus(work):
    node = suite.Node(work / "warm" / "data")
    node.data_dir.mkdir(parents=True)
    node.start()
    try:
        node.deploy(suite.scenarios_manifest())
        node.wait_optimized()
        suite.wait_until_serving(node.port, "/hello")
        suite.wait_until_serving(node.port, "/json", ok=(400,))
        suite.wait_until_serving(node.port, "/js")
        post = suite.post_script(work, suite.orders_body())
        for c in [1, 16]:
            suite.wrk(node.port, c, SECONDS, "/hello")
            suite.wrk(node.port, c, SECONDS, "/reuse/hello")
            suite.wrk(node.port, c, SECONDS, "/json", post)
        suite.wrk(node.port, 4, SECONDS, "/js")
        suite.wrk(node.port, 4, SECONDS, "/reuse/js")
    finally:
        node.stop()

    # Cold starts: after scale to zero, then after a restart.
    node = suite.Node(work / "cold" / "data", flags=["--scale-to-zero-after", "200ms"])
    node.data_dir.mkdir(parents=True)
    node.start()
    try:
        node.deploy(suite.hello_manifest())
        node.wait_optimized()
        for _ in range(20):
            suite.wait_unloaded(node, "hello")
            suite.get(node.port)
        for _ in range(2):
            node.stop()
            node.start()
            suite.wait_until_serving(node.port, "/hello")
    finally:
        node.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nimbus", required=True, help="the instrumented nimbus binary")
    ap.add_argument("--native", required=True, help="the instrumented native-hello binary")
    args = ap.parse_args()
    suite.NIMBUS = Path(args.nimbus)
    started = time.time()
    # The nodes' data (compiled artifacts included) goes with the run.
    with tempfile.TemporaryDirectory(prefix="nimbus-pgo-") as work:
        train_native(args.native, Path(work))
        train_nimbus(Path(work))
    print(f"training done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
