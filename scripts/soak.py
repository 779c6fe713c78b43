#!/usr/bin/env python3
"""Soak test of `streamdest run` (not run in CI).

Posts events over HTTP at a fixed rate for DURATION seconds to a fresh `streamdest run` whose
destination is a local endpoint (in this script) that answers 500 to a fraction FAIL of the
requests (500 is in the default retryOn, so those are retried; an export that fails every
attempt is dead-lettered). Every SAMPLE seconds it prints a CSV row: the service's resident
memory (VmRSS), the data directory's size (du -sb), and counters from GET /metrics. At the end
it waits for the backlog to drain and checks that nothing was lost: every qualifying event
that got a 202 reached the endpoint with a 200, or is listed in
GET /v1/destinations/d1/dead-letters.

Every event creates a new profile (so each qualifying event makes exactly one export) unless
PROFILES=N, which cycles over N profiles (bounded state; the loss check then works per
profile).

Environment (defaults):
  DURATION=600  RATE=5000 (events/s)  BATCH=100 (events a request)  CONNECTIONS=8
  QUALIFY=0.2 (fraction of events in the mapped audience)  FAIL=0.1 (endpoint 500 rate)
  SAMPLE=10 (s)  DRAIN_WAIT=180 (s without progress before giving up on the backlog)
  PROFILES=0 (0: a new profile per event)  WORKERS (service default)  SEED=1
  STREAMDEST_BIN (default: $CARGO_TARGET_DIR or ./target, then release/streamdest)
  CSV=FILE (also write the samples there)  KEEP=1 (keep the data directory)

Exit status: 0 when nothing was lost, 1 otherwise.

  cargo build --release && DURATION=60 python3 scripts/soak.py
"""

import http.client
import http.server
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time


def env(name, default, kind=int):
    value = os.environ.get(name)
    return kind(value) if value not in (None, "") else default


DURATION = env("DURATION", 600, float)
RATE = env("RATE", 5000, float)
BATCH = env("BATCH", 100)
CONNECTIONS = env("CONNECTIONS", 8)
QUALIFY = env("QUALIFY", 0.2, float)
FAIL = env("FAIL", 0.1, float)
SAMPLE = env("SAMPLE", 10, float)
DRAIN_WAIT = env("DRAIN_WAIT", 180, float)
PROFILES = env("PROFILES", 0)
WORKERS = os.environ.get("WORKERS")
SEED = env("SEED", 1)
CSV = os.environ.get("CSV")
KEEP = os.environ.get("KEEP") == "1"


def binary():
    if os.environ.get("STREAMDEST_BIN"):
        return os.environ["STREAMDEST_BIN"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(root, "target")
    return os.path.join(target, "release", "streamdest")


# ---------------------------------------------------------------- the endpoint


class Endpoint:
    def __init__(self, fail, seed):
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.fail = fail
        self.requests = 0
        self.failed = 0
        self.ok = {}  # profile id -> times answered 200

    def handle(self, body):
        try:
            profile = json.loads(body)["identityMap"]["email"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            profile = None
        with self.lock:
            self.requests += 1
            if self.rng.random() < self.fail:
                self.failed += 1
                return 500
            if profile is not None:
                self.ok[profile] = self.ok.get(profile, 0) + 1
            return 200


def serve_endpoint(endpoint):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status = endpoint.handle(body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------- the service


def start_service(data_dir, endpoint_url):
    config = {
        "mergePolicies": [{"id": "p", "attributeMerge": "timestampOrdered",
                           "identityStitching": "privateGraph"}],
        "audiences": [{"id": "johns", "mergePolicy": "p",
                       "rule": "person.name.firstName = \"John\""}],
        "destinations": [{"id": "d1", "name": "d1", "endpoint": endpoint_url,
                          "audiences": [{"id": "johns"}],
                          "attributes": ["person.name.firstName"],
                          "delivery": {"retryOn": [500, 502, 503, 504]}}],
    }
    config_path = os.path.join(os.path.dirname(data_dir), "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    args = [binary(), "run", "--config", config_path, "--listen", "127.0.0.1:0",
            "--data-dir", data_dir]
    if WORKERS:
        args += ["--workers", WORKERS]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    addr = None
    deadline = time.time() + 30
    while time.time() < deadline:
        line = child.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on http://(\S+)", line)
        if m:
            addr = m.group(1)
            break
        sys.stderr.write("  [streamdest] " + line)
    if addr is None:
        child.kill()
        sys.exit("streamdest did not start listening")

    def drain():
        for line in child.stderr:
            sys.stderr.write("  [streamdest] " + line)

    threading.Thread(target=drain, daemon=True).start()
    host, port = addr.rsplit(":", 1)
    return child, host, int(port)


def get(host, port, path):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def metrics(host, port):
    """Sums of each metric over its labels."""
    status, body = get(host, port, "/metrics")
    out = {}
    if status != 200:
        return out
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) != 2:
            continue
        name = parts[0].split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(parts[1])
        except ValueError:
            pass
    return out


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def disk_mib(path):
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout
    return int(out.split()[0]) / (1 << 20) if out else float("nan")


# ---------------------------------------------------------------- the load


class Load:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.accepted = 0
        self.refused = 0
        self.errors = 0
        self.expected = set()  # qualifying profiles in 202'd requests
        self.max_lag = 0.0
        self.every = max(1, round(1 / QUALIFY)) if QUALIFY > 0 else None

    def body(self, k):
        lines, qualifying = [], []
        for i in range(k * BATCH, (k + 1) * BATCH):
            profile = f"s{i % PROFILES}" if PROFILES else f"s{i}"
            john = self.every is not None and i % self.every == 0
            if john:
                qualifying.append(f"{profile}@x")
            lines.append(json.dumps({
                "type": "fragment", "dataset": "crm", "id": profile,
                "identityMap": {"email": [{"id": f"{profile}@x"}]},
                "attributes": {"person": {"name": {"firstName": "John" if john else "Jane"}}},
            }, separators=(",", ":")))
        return ("\n".join(lines) + "\n").encode(), qualifying

    def run(self, c, start):
        interval = BATCH / RATE
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        k = c
        while not self.stop.is_set():
            due = start + k * interval
            now = time.time()
            if due > now:
                time.sleep(due - now)
            else:
                with self.lock:
                    self.max_lag = max(self.max_lag, now - due)
            body, qualifying = self.body(k)
            try:
                conn.request("POST", "/v1/events", body,
                             {"Content-Type": "application/x-ndjson"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = None
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            with self.lock:
                if status == 202:
                    self.accepted += BATCH
                    self.expected.update(qualifying)
                elif status is None:
                    self.errors += 1
                else:
                    self.refused += 1
            k += CONNECTIONS
        conn.close()

    def start(self):
        start = time.time() + 0.1
        self.threads = [threading.Thread(target=self.run, args=(c, start), daemon=True)
                        for c in range(CONNECTIONS)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()


# ---------------------------------------------------------------- main


def main():
    work = tempfile.mkdtemp(prefix="streamdest-soak-")
    data_dir = os.path.join(work, "data")
    endpoint = Endpoint(FAIL, SEED)
    server = serve_endpoint(endpoint)
    url = f"http://127.0.0.1:{server.server_address[1]}/d1"
    child, host, port = start_service(data_dir, url)
    print(f"# soak: {binary()} pid {child.pid}, {DURATION:.0f} s at {RATE:.0f} events/s "
          f"({BATCH} a request, {CONNECTIONS} connections), {QUALIFY:.0%} qualify, endpoint "
          f"fails {FAIL:.0%}, data {data_dir}", flush=True)
    columns = ["t_s", "rss_mib", "disk_mib", "wal_mib", "accepted", "accepted_per_s",
               "exports", "delivered", "dead_letters", "retries", "backlog",
               "endpoint_200", "endpoint_500", "client_lag_s"]
    csv = open(CSV, "w") if CSV else None

    def emit(row):
        line = ",".join(row)
        print(line, flush=True)
        if csv:
            csv.write(line + "\n")
            csv.flush()

    emit(columns)
    last = {"t": 0.0, "accepted": 0.0}

    def sample(t):
        m = metrics(host, port)
        accepted = m.get("streamdest_events_accepted_total", 0.0)
        rate = (accepted - last["accepted"]) / max(t - last["t"], 1e-9)
        last.update(t=t, accepted=accepted)
        with endpoint.lock:
            ok, failed = sum(endpoint.ok.values()), endpoint.failed
        emit([f"{t:.0f}", f"{rss_mib(child.pid):.1f}", f"{disk_mib(data_dir):.1f}",
              f"{m.get('streamdest_wal_bytes', 0) / (1 << 20):.1f}", f"{accepted:.0f}",
              f"{rate:.0f}", f"{m.get('streamdest_exports_total', 0):.0f}",
              f"{m.get('streamdest_deliveries_total', 0):.0f}",
              f"{m.get('streamdest_dead_letters_total', 0):.0f}",
              f"{m.get('streamdest_retries_total', 0):.0f}",
              f"{m.get('streamdest_backlog_exports', 0):.0f}", str(ok), str(failed),
              f"{load.max_lag:.2f}"])
        return m

    load = Load(host, port)
    began = time.time()
    load.start()
    next_sample = began + SAMPLE
    while time.time() - began < DURATION:
        time.sleep(max(0.0, min(next_sample, began + DURATION) - time.time()))
        if time.time() >= next_sample:
            sample(time.time() - began)
            next_sample += SAMPLE
    load.finish()
    sent_for = time.time() - began
    expected = set(load.expected)
    print(f"# load stopped after {sent_for:.1f} s: {load.accepted} events accepted "
          f"({load.accepted / sent_for:.0f}/s), {load.refused} requests refused, "
          f"{load.errors} failed without a status; {len(expected)} qualifying profiles",
          flush=True)

    # Drain: until every expected export finished (delivered or dead-lettered), or no
    # progress for DRAIN_WAIT.
    progress, progress_at = None, time.time()
    while True:
        m = sample(time.time() - began)
        finished = (m.get("streamdest_deliveries_total", 0)
                    + m.get("streamdest_dead_letters_total", 0))
        wanted = max(m.get("streamdest_exports_total", 0), 0 if PROFILES else len(expected))
        if m.get("streamdest_backlog_exports", 0) == 0 and finished >= wanted:
            break
        if finished != progress:
            progress, progress_at = finished, time.time()
        elif time.time() - progress_at > DRAIN_WAIT:
            print(f"# no progress for {DRAIN_WAIT:.0f} s; checking what arrived", flush=True)
            break
        time.sleep(min(SAMPLE, 2.0))
    drained_after = time.time() - began - sent_for

    status, body = get(host, port, "/v1/destinations/d1/dead-letters")
    letters = json.loads(body) if status == 200 else []
    dead = set()
    for entry in letters:
        payload = entry.get("payload")
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except ValueError:
                payload = None
        try:
            dead.add(payload["identityMap"]["email"][0]["id"])
        except (TypeError, KeyError, IndexError):
            pass
    with endpoint.lock:
        ok = dict(endpoint.ok)
        requests, failed = endpoint.requests, endpoint.failed
    lost = sorted(p for p in expected if p not in ok and p not in dead)
    unexpected = sorted(p for p in set(ok) | dead if p not in expected)
    duplicated = sum(1 for n in ok.values() if n > 1)
    both = len(dead & set(ok))

    child.send_signal(signal.SIGTERM)
    try:
        code = child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        code = "killed after 15 s"
    print(f"# drained {drained_after:.1f} s after the load stopped; endpoint saw {requests} "
          f"requests ({failed} answered 500); {len(ok)} profiles delivered, {len(letters)} "
          f"dead letters ({status}); SIGTERM exit {code}")
    print(f"# check: {len(expected)} qualifying profiles accepted; lost {len(lost)} "
          f"{lost[:10]}; unexpected {len(unexpected)} {unexpected[:10]}; delivered more than "
          f"once {duplicated}; both delivered and dead-lettered {both}"
          + (" (both expected with PROFILES: a profile is exported many times)" if PROFILES
             else ""))
    if csv:
        csv.close()
    server.shutdown()
    if KEEP:
        print(f"# kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if lost or unexpected or (PROFILES == 0 and requests == 0):
        print("# FAILED")
        return 1
    print("# OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
