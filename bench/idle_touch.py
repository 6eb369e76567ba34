#!/usr/bin/env python3
"""What touching memory costs after the CPU idled, on this machine.

Allocates a buffer, touches every page of it (so all of it is resident),
then repeatedly sleeps and reads one byte of each page, timing the reads.
It does so with ordinary 4 KiB pages and with transparent huge pages
(2 MiB, asked for with madvise), so the cost per page shows whether
first touches after idling are slow here, and whether huge pages avoid
that. docs/performance.md uses it to explain where a cold start's time
goes on virtual machines.

    python3 bench/idle_touch.py [--pages 1024] [--trials 15]
"""
import argparse
import ctypes
import mmap
import statistics
import time

PAGE = 4096
HUGE = 2 << 20


def measure(pages, pause_s, trials, huge):
    size = pages * PAGE
    # Room to start the buffer on a 2 MiB boundary.
    buf = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = (-memoryview_address(buf)) % HUGE
    buf.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE, start, size)
    buf[start:start + size] = b"\x01" * size
    offsets = range(start, start + size, PAGE)
    times = []
    for _ in range(trials):
        time.sleep(pause_s)
        began = time.perf_counter()
        total = 0
        for off in offsets:
            total += buf[off]
        times.append(time.perf_counter() - began)
    resident_huge = anon_huge_kib()
    buf.close()
    return statistics.median(times), resident_huge


def memoryview_address(buf):
    view = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(view)
    # The buffer cannot be closed while a view of it exists.
    del view
    return address


def anon_huge_kib():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=15)
    args = ap.parse_args()
    # The loop itself, with nothing slow to touch: subtracted below.
    loop, _ = measure(args.pages, 0, args.trials, huge=True)
    print(f"{args.pages} pages, {args.trials} trials; median of one pass over them, "
          f"less the loop's own {loop * 1e6 / args.pages:.3f} µs per page")
    for pause_ms in (0, 20, 200):
        for huge in (False, True):
            t, huge_kib = measure(args.pages, pause_ms / 1000, args.trials, huge)
            per_page = max(t - loop, 0) * 1e6 / args.pages
            kind = "2 MiB pages" if huge else "4 KiB pages"
            note = "" if not huge or huge_kib else " (no huge pages granted)"
            print(f"after {pause_ms:>3} ms idle, {kind}: {per_page:7.3f} µs per page{note}")


if __name__ == "__main__":
    main()
