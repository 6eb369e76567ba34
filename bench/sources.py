#!/usr/bin/env python3
"""Event-source benchmark: for each broker, messages/s from a pre-filled
queue into a hello function, beside a plain consumer draining the same
broker with the same client code (read, acknowledge each, nothing else);
and publish-to-function latency at a paced 1,000 messages/s.

Brokers: the machine's Redis (6379), NATS JetStream (4222), RabbitMQ
(5672) and PostgreSQL (5432, change data capture: one row per
transaction), and a Mosquitto this script starts (with no cap on what it
queues for a session). `--brokers` runs some of them. Run through bench/run-sources, which builds what it needs.
Results: bench/results/sources.md and bench/results/sources.json.
"""
import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import suite
from suite import ROOT, Node, percentile

PEER = ROOT / "bench/target/release/source-peer"
TESTBED = ROOT / "tests/fixtures/target/wasm32-wasip2/release/testbed.wasm"
RESULTS = ROOT / "bench/results"
REDIS = "redis://127.0.0.1:6379"
NATS = "nats://127.0.0.1:4222"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
PG = "postgres://postgres@127.0.0.1:5432/test"
CONCURRENCY = 16
# What Nimbus reads at a time with its defaults at that concurrency (Redis:
# COUNT = batch 16; JetStream: pulls of max(concurrency, batch 128);
# RabbitMQ: prefetch 2 x concurrency); the plain consumer reads the same.
READ_SIZE = {"redis": 16, "jetstream": 128, "amqp": 2 * CONCURRENCY}


def peer(*args):
    out = subprocess.run([str(PEER), *map(str, args)], check=True, capture_output=True, text=True).stdout
    lines = [l for l in out.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


class Mosquitto:
    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        os.chmod(self.dir.name, 0o777)
        self.port = suite.free_port()
        conf = Path(self.dir.name) / "m.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def publish(self, topic, count, rate=0):
        peer("publish", "mqtt", f"mqtt://127.0.0.1:{self.port}", topic, count, rate)

    def subscribe(self, client_id, topic, count=None):
        args = ["mosquitto_sub", "-p", str(self.port), "-q", "1", "-c", "-i", client_id, "-t", topic]
        if count is None:
            args += ["-W", "1"]  # create the session, then leave
        else:
            args += ["-C", str(count)]
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class SourceNode(Node):
    def delivered(self):
        s = self.status()
        return sum(x.get("delivered", 0) + x.get("dead_lettered", 0) for x in s.get("sources", []))

    def wait_delivered(self, count, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.delivered() >= count:
                return time.perf_counter()
            time.sleep(0.02)
        raise RuntimeError(f"only {self.delivered()} of {count} messages were delivered")


def manifest(source, component=None, extra="", function="consume", source_extra=""):
    """One function with one source. Each phase names its function apart,
    so MQTT sessions (named after the function) never carry over."""
    component = component or suite.HELLO
    return (f'[app]\nname = "bench"\n\n[functions.{function}]\ncomponent = "{component}"\n'
            f'limits = {{ max_concurrency = 64 }}\n{extra}\n'
            f'[[functions.{function}.sources]]\n{source}\nconcurrency = {CONCURRENCY}\n{source_extra}')


def source_for(broker, name, mqtt=None):
    """The manifest source reading `name` on `broker`."""
    return {
        "redis": f'type = "redis-stream"\nurl = "{REDIS}"\nstream = "{name}"',
        "jetstream": f'type = "jetstream"\nurl = "{NATS}"\nstream = "{name}"\nstart = "all"',
        "amqp": f'type = "amqp"\nurl = "{AMQP}"\nqueue = "{name}"',
        "mqtt": f'type = "mqtt"\nurl = "mqtt://127.0.0.1:{mqtt.port if mqtt else 0}"\ntopics = ["{name}/#"]',
        "postgres": f'type = "postgres"\nurl = "{PG}"\ntables = ["{name.lower()}"]\nslot = "{name.lower()}"',
    }[broker]


def prefill(broker, name, count, mqtt=None):
    """Creates `name` on `broker` and puts `count` messages in it."""
    if broker == "redis":
        subprocess.run(["redis-cli", "-p", "6379", "XGROUP", "CREATE", name, "nimbus-consume", "0", "MKSTREAM"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["redis-cli", "-p", "6379", "XGROUP", "CREATE", name, "peer", "0"],
                       check=True, stdout=subprocess.DEVNULL)
        peer("publish", "redis", REDIS, name, count, 0)
    elif broker == "jetstream":
        peer("setup", "jetstream", NATS, name, f"{name.lower()}.>")
        peer("publish", "jetstream", NATS, f"{name.lower()}.x", count, 0)
    elif broker == "amqp":
        peer("setup", "amqp", AMQP, name)
        peer("publish", "amqp", AMQP, name, count, 0)
    elif broker == "mqtt":
        mqtt.publish(f"{name}/x", count)
    elif broker == "postgres":
        peer("setup", "postgres", PG, name.lower())
        peer("publish", "postgres", PG, name.lower(), count, 0)


def baseline(broker, name, count, mqtt=None, read_size=READ_SIZE):
    if broker == "redis":
        return peer("drain", "redis", REDIS, name, "peer", count, read_size["redis"])["rate"]
    if broker == "jetstream":
        return peer("drain", "jetstream", NATS, name, "peer", count, read_size["jetstream"])["rate"]
    if broker == "amqp":
        return peer("drain", "amqp", AMQP, name, count, read_size["amqp"])["rate"]
    if broker == "postgres":
        return peer("drain", "postgres", PG, name.lower(), count)["rate"]
    start = time.perf_counter()
    mqtt.subscribe("peer-" + name, f"{name}/#", count)
    return count / (time.perf_counter() - start)


def drop_tables(*names):
    """PostgreSQL runs leave their tables behind otherwise."""
    for n in names:
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                        f'DROP TABLE IF EXISTS "{n.lower()}"'], check=False)


# The opt-in instance reuse of `bench/run` (one instance serves messages one
# after another, recycled after this many).
REUSE = "reuse = 10000\n"
# Messages per invocation in the batched run (a fresh instance per batch).
EVENTS_PER_INVOCATION = 32
# What Nimbus reads at a time then (the source runs CONCURRENCY x
# EVENTS_PER_INVOCATION messages: Redis reads at least one invocation's
# worth; JetStream pulls half its room; RabbitMQ's prefetch is its room),
# and the plain consumer beside it reads the same.
READ_SIZE_BATCHED = {"redis": EVENTS_PER_INVOCATION, "jetstream": CONCURRENCY * EVENTS_PER_INVOCATION,
                     "amqp": 2 * CONCURRENCY * EVENTS_PER_INVOCATION}


def throughput(broker, count, work, mqtt=None):
    """The plain consumer's rate, then Nimbus's: a fresh instance per
    message (the default), with instance reuse, and a fresh instance per
    batch of up to EVENTS_PER_INVOCATION messages; and the plain consumer
    again reading as much at a time as the batched source does."""
    stamp = time.time_ns()

    def plain(tag, read_size):
        base_name = f"BENCH_{tag}_{stamp}"
        if broker == "mqtt":
            mqtt.subscribe("peer-" + base_name, f"{base_name}/#")
        prefill(broker, base_name, count, mqtt)
        try:
            return baseline(broker, base_name, count, mqtt, read_size)
        finally:
            if broker == "postgres":
                drop_tables(base_name)

    base = plain("BASE", READ_SIZE)
    base_batched = plain("BASEB", READ_SIZE_BATCHED) if broker in READ_SIZE_BATCHED else base
    fresh = drain(broker, count, work / f"data-{broker}", f"BENCH_NIMBUS_{stamp}", mqtt)
    reused = drain(broker, count, work / f"reuse-{broker}", f"BENCH_REUSE_{stamp}", mqtt, REUSE)
    batched = drain(broker, count, work / f"batch-{broker}", f"BENCH_BATCH_{stamp}", mqtt,
                    source_extra=f"events_per_invocation = {EVENTS_PER_INVOCATION}\n")
    return base, fresh, reused, batched, base_batched


def drain(broker, count, data_dir, name, mqtt=None, extra="", source_extra=""):
    """Nimbus's rate: `count` messages pre-filled in `name`, drained into
    hello (with `extra` manifest lines, and `source_extra` in its source)."""
    node = SourceNode(data_dir)
    node.start()
    try:
        # The function is compiled, optimised code included, before the
        # clock starts: the drain measures the source, not a first compile
        # (which would also take a core from the drain).
        node.deploy(f'[app]\nname = "bench"\n\n[functions.consume]\ncomponent = "{suite.HELLO}"\n')
        node.wait_optimized()
        if broker == "mqtt":
            # The session must exist before the messages, as for the peer.
            node.deploy(manifest(source_for(broker, name, mqtt), extra=extra, source_extra=source_extra))
            node.stop()
            prefill(broker, name, count, mqtt)
            start = time.perf_counter()
            node.start()
        else:
            prefill(broker, name, count, mqtt)
            start = time.perf_counter()
            node.deploy(manifest(source_for(broker, name, mqtt), extra=extra, source_extra=source_extra))
        end = node.wait_delivered(count)
        # Removing the source releases what it holds in the broker.
        node.deploy(f'[app]\nname = "bench"\n\n[functions.consume]\ncomponent = "{suite.HELLO}"\n')
    finally:
        node.stop()
        if broker == "postgres":
            drop_tables(name)
    return count / (end - start)


class Recorder:
    """The HTTP server the latency function reports to (`source-peer
    record`, in Rust, so a report costs the function little time of its
    own): keeps, per request, the time since the publish time its message
    carries."""

    def __init__(self):
        self.seen = []
        self.proc = subprocess.Popen([str(PEER), "record"], stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().split()
        if first[:1] != ["port"]:
            raise RuntimeError(f"source-peer record did not start: {first}")
        self.port = int(first[1])
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            at, _, target = line.rstrip("\n").partition(" ")
            q = urllib.parse.parse_qs(urllib.parse.urlparse(target).query)
            try:
                body = json.loads(q["body"][0])
                # A Redis entry arrives as its fields: {"body": "..."};
                # a PostgreSQL change as its row: {"new": {"body": "..."}}.
                if "new" in body:
                    body = json.loads(body["new"]["body"])
                elif "t" not in body:
                    body = json.loads(body["body"])
                self.seen.append((int(at) - body["t"]) / 1e6)
            except (KeyError, ValueError, TypeError):
                pass

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def latency(broker, count, rate, work, mqtt=None):
    """Publish-to-function latency: the function reports each message to a
    recorder at its start; the message carries its publish time."""
    server = Recorder()
    seen = server.seen
    url = f"http://127.0.0.1:{server.port}"
    name = f"BENCH_LAT_{time.time_ns()}"
    env = f'env = {{ ACTION = "relay", RECORDER = "{url}" }}\nallowed_outbound_hosts = ["{url}"]\n'
    node = SourceNode(work / f"lat-{broker}")
    node.start()
    try:
        if broker == "redis":
            subprocess.run(["redis-cli", "-p", "6379", "XGROUP", "CREATE", name, "nimbus-latency", "$", "MKSTREAM"],
                           check=True, stdout=subprocess.DEVNULL)
        elif broker == "jetstream":
            peer("setup", "jetstream", NATS, name, f"{name.lower()}.>")
        elif broker == "amqp":
            peer("setup", "amqp", AMQP, name)
        elif broker == "postgres":
            peer("setup", "postgres", PG, name.lower())
        node.deploy(manifest(source_for(broker, name, mqtt), component=TESTBED, extra=env, function="latency"))
        time.sleep(1)
        if broker == "mqtt":
            mqtt.publish(f"{name}/x", count, rate)
        else:
            target = {"jetstream": f"{name.lower()}.x", "postgres": name.lower()}.get(broker, name)
            url_of = {"redis": REDIS, "jetstream": NATS, "amqp": AMQP, "postgres": PG}[broker]
            peer("publish", broker, url_of, target, count, rate)
        deadline = time.time() + 60
        while len(seen) < count and time.time() < deadline:
            time.sleep(0.05)
        node.deploy(f'[app]\nname = "bench"\n\n[functions.consume]\ncomponent = "{suite.HELLO}"\n')
    finally:
        node.stop()
        server.stop()
        if broker == "postgres":
            drop_tables(name)
    if not seen:
        raise RuntimeError(f"no message reached the function through {broker}; see {work}/node.log")
    return {"received": len(seen), "p50_ms": percentile(seen, 50), "p99_ms": percentile(seen, 99)}


ALL_BROKERS = ["redis", "jetstream", "amqp", "mqtt", "postgres"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5,000 messages per run instead of 20,000")
    ap.add_argument("--brokers", default=",".join(ALL_BROKERS),
                    help="comma-separated subset of redis, jetstream, amqp, mqtt")
    args = ap.parse_args()
    count = 5_000 if args.quick else 20_000
    results = {"machine": suite.machine(), "messages": count, "concurrency": CONCURRENCY, "brokers": {}}
    # A run of some brokers keeps the others' latest figures.
    previous = RESULTS / "sources.json"
    if previous.exists() and set(args.brokers.split(",")) != set(ALL_BROKERS):
        results["brokers"] = json.loads(previous.read_text()).get("brokers", {})
    mqtt = Mosquitto()
    try:
        with tempfile.TemporaryDirectory() as d:
            work = Path(d)
            for broker in args.brokers.split(","):
                base, nimbus, reused, batched, base_batched = throughput(broker, count, work, mqtt)
                lat = latency(broker, 5_000 if not args.quick else 2_000, 1_000, work, mqtt)
                results["brokers"][broker] = {
                    "plain_consumer_per_s": round(base),
                    "nimbus_per_s": round(nimbus),
                    "ratio": round(nimbus / base, 2),
                    "nimbus_reuse_per_s": round(reused),
                    "reuse_ratio": round(reused / base, 2),
                    "plain_consumer_batched_reads_per_s": round(base_batched),
                    "nimbus_batched_per_s": round(batched),
                    "batched_ratio": round(batched / base_batched, 2),
                    "latency_at_1000_per_s": lat,
                }
                print(broker, json.dumps(results["brokers"][broker]), flush=True)
    finally:
        mqtt.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sources.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Event sources: messages/s into a hello function",
        "",
        f"{results['machine']}",
        "",
        f"{count} messages pre-filled per run; Nimbus at source concurrency {CONCURRENCY} into "
        "`examples/hello`; the plain consumer drains the same broker with the same client code "
        "(reading as many at a time as Nimbus does with its defaults: Redis COUNT 16, JetStream "
        "pulls of 128, RabbitMQ prefetch 32), acknowledging each message (Redis: each read's "
        "entries with one XACK) and doing nothing else "
        "(`mosquitto_sub` for MQTT). Latency: publish to the function's start (its first "
        "outbound request) at a paced 1,000 messages/s. Nimbus's clock starts at the deploy that "
        "adds the source (for MQTT, at the node's restart with its session's messages waiting), "
        "its function already compiled. `reuse`: the same function with `reuse = 10000` (an "
        "instance serves messages one after another instead of one fresh instance each). "
        f"`batched`: the default function (a fresh instance per invocation) with "
        f"`events_per_invocation = {EVENTS_PER_INVOCATION}` on the source (a CloudEvents batch per invocation), "
        "against the plain consumer reading as many at a time as that source does (Redis COUNT "
        f"{READ_SIZE_BATCHED['redis']}, JetStream pulls of {READ_SIZE_BATCHED['jetstream']}, RabbitMQ prefetch "
        f"{READ_SIZE_BATCHED['amqp']}; the others as before).",
        "",
        "| broker | plain consumer msg/s | Nimbus msg/s | ratio | Nimbus, reuse msg/s | ratio | "
        "plain consumer, batched reads msg/s | Nimbus, batched msg/s | ratio | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, r in results["brokers"].items():
        l = r["latency_at_1000_per_s"]
        reuse = (f"{r['nimbus_reuse_per_s']:,} | {r['reuse_ratio']}" if "nimbus_reuse_per_s" in r else "– | –")
        batched = (f"{r['plain_consumer_batched_reads_per_s']:,} | {r['nimbus_batched_per_s']:,} | "
                   f"{r['batched_ratio']}" if "nimbus_batched_per_s" in r else "– | – | –")
        lines.append(f"| {b} | {r['plain_consumer_per_s']:,} | {r['nimbus_per_s']:,} | {r['ratio']} | {reuse} | "
                     f"{batched} | {l['p50_ms']:.1f} | {l['p99_ms']:.1f} |")
    (RESULTS / "sources.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
