#!/usr/bin/env python3
"""Restart time of `streamdest run`: after the initial load of PROFILES profiles, and again
after FACTOR times as many updates (issue #7: restart is bounded by the state held, not by the
history, so the two should be within 1.5x of each other).

    scripts/bench_restart.py [--profiles 100000] [--factor 10] [--workers 2]
                             [--bin target/release/streamdest] [--connections 4] [--work DIR]

The workload is scripts/gen_history.py's (two fragments a person joined by email, 20 rule
audiences, one destination mapping them all); the endpoint is `streamdest bench --serve-only`.
Events are posted as NDJSON, 5,000 a request. After each phase the script waits until the
service is idle (no new epoch, nothing pending and no snapshot being written for 2 s), stops
it with SIGTERM, starts it again and times the start until the `state rebuilt` line (snapshot
loaded and the log after it replayed through the dataflow). Prints one table row per phase.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def read_until(proc, pattern, timeout):
    """Reads proc's stderr lines until one matches; returns the match."""
    deadline = time.time() + timeout
    rx = re.compile(pattern)
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise SystemExit(f"process exited ({proc.returncode}) before {pattern!r}")
            continue
        m = rx.search(line)
        if m:
            return m
    raise SystemExit(f"timed out waiting for {pattern!r}")


def drain(proc):
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()


def metrics(host, port):
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{")[0]
        out[key] = out.get(key, 0.0) + float(value)
    return out


def wait_idle(host, port, quiet=2.0):
    last, since = None, time.time()
    while True:
        m = metrics(host, port)
        state = (m.get("streamdest_epochs_total"), m.get("streamdest_backlog_exports"),
                 m.get("streamdest_snapshot_writing"))
        if state != last:
            last, since = state, time.time()
        elif (time.time() - since >= quiet and (m.get("streamdest_backlog_exports") or 0) == 0
              and not m.get("streamdest_snapshot_writing")):
            return m
        time.sleep(0.2)


def post_lines(host, port, lines, connections, chunk=5000):
    """Posts an iterator of NDJSON lines, `chunk` a request, on `connections` connections;
    returns (seconds, lines posted). The lines are read as they are sent, not held."""
    import queue
    work = queue.Queue(maxsize=connections * 2)
    errors = []
    count = [0]

    def worker():
        c = http.client.HTTPConnection(host, port, timeout=300)
        while True:
            body = work.get()
            if body is None:
                break
            c.request("POST", "/v1/events", body=body,
                      headers={"Content-Type": "application/x-ndjson"})
            r = c.getresponse()
            r.read()
            if r.status != 202:
                errors.append(r.status)
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    t0 = time.time()
    for t in threads:
        t.start()
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) == chunk:
            work.put(("\n".join(batch) + "\n").encode())
            count[0] += len(batch)
            batch = []
    if batch:
        work.put(("\n".join(batch) + "\n").encode())
        count[0] += len(batch)
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"ingest errors: {errors[:5]}")
    return time.time() - t0, count[0]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def start(args, config, data):
    proc = subprocess.Popen(
        [args.bin, "run", "--config", config, "--data-dir", data, "--listen", "127.0.0.1:0",
         "--workers", str(args.workers)],
        stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    m = read_until(proc, r"listening on http://([\d.]+):(\d+)", 600)
    host, port = m.group(1), int(m.group(2))
    return proc, host, port, t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--profiles", type=int, default=100_000)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "streamdest"))
    p.add_argument("--work", help="a directory to keep the generated history in and reuse it "
                   "from (same --profiles and --factor); default: a new temporary directory")
    args = p.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="sd-restart-")
    load_events = 2 * args.profiles
    updates = args.factor * load_events
    events_file = os.path.join(work, "events.ndjson")
    if not os.path.exists(events_file):
        subprocess.run([sys.executable, os.path.join(HERE, "gen_history.py"), work,
                        str(args.profiles), str(updates)], check=True)
    shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)

    def lines(start, stop):
        import itertools
        with open(events_file) as f:
            for line in itertools.islice(f, start, stop):
                yield line.rstrip("\n")
    receiver = subprocess.Popen([args.bin, "bench", "--serve-only", "100000"],
                                stdout=subprocess.PIPE, text=True)
    url = re.search(r"listening on (\S+)", receiver.stdout.readline()).group(1)
    with open(os.path.join(work, "config.json")) as f:
        config = json.load(f)
    for d in config["destinations"]:
        d["endpoint"] = url
    cfg = os.path.join(work, "service.json")
    with open(cfg, "w") as f:
        json.dump(config, f)
    data = os.path.join(work, "data")

    rows = []
    proc, host, port, _ = start(args, cfg, data)
    drain(proc)
    phases = [("initial load", lines(0, load_events)),
              (f"+{args.factor}x updates", lines(load_events, None))]
    fed = 0
    for name, batch in phases:
        secs, n = post_lines(host, port, batch, args.connections)
        fed += n
        wait_idle(host, port)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        size = du(data)
        proc, host, port, t0 = start(args, cfg, data)
        m = read_until(proc, r"state rebuilt ([\d.]+)s after the start", 1200)
        restart = float(m.group(1))
        rss = rss_kib(proc.pid)
        drain(proc)
        rows.append((name, n, n / secs, fed, size, restart, rss))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    receiver.kill()

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"profiles {args.profiles}, workers {args.workers}, load average {load}")
    print(f"{'phase':<16} {'events':>9} {'ingest ev/s':>12} {'history':>9} "
          f"{'data dir MiB':>12} {'restart s':>9} {'RSS MiB':>8}")
    for name, n, rate, fed, size, restart, rss in rows:
        print(f"{name:<16} {n:>9} {rate:>12.0f} {fed:>9} {size / 2**20:>12.1f} "
              f"{restart:>9.2f} {rss / 1024:>8.0f}")


if __name__ == "__main__":
    main()
