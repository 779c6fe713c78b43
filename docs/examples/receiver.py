#!/usr/bin/env python3
"""A minimal endpoint for streamdest exports (Python 3 standard library only).

It accepts every POST whose body is a JSON object, prints the profile it carries,
deduplicates by the Idempotency-Key header (in memory) and answers 200.

    python3 docs/examples/receiver.py                     # listen on 127.0.0.1:8000
    python3 docs/examples/receiver.py --token local-dev-token
                                                          # also require this bearer token
    python3 docs/examples/receiver.py --fail-status 503   # answer 503 to everything
                                                          # (to watch retries and dead letters)

See docs/endpoint.md. A real endpoint keeps the keys it has processed in durable storage,
for longer than streamdest may re-send (retries, redrives, replays).
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Idempotency-Keys already processed, and the lock that guards them (requests for different
# profiles arrive concurrently, on separate connections).
SEEN = set()
SEEN_LOCK = threading.Lock()


def describe(profile):
    """One line per export: identities, audience statuses, mapped attributes."""
    identities = ", ".join(
        f"{namespace}:{entry['id']}"
        for namespace, entries in profile.get("identityMap", {}).items()
        for entry in entries
    )
    ups = profile.get("segmentMembership", {}).get("ups", {})
    statuses = ", ".join(
        f"{audience_id}={membership['status']} (since {membership['lastQualificationTime']})"
        for audience_id, membership in ups.items()
    )
    # Everything besides the two fixed fields is a mapped attribute, nested as in XDM.
    attributes = {k: v for k, v in profile.items() if k not in ("segmentMembership", "identityMap")}
    return (
        f"  identities: {identities}\n"
        f"  audiences:  {statuses or '(none)'}\n"
        f"  attributes: {json.dumps(attributes, sort_keys=True)}"
    )


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open between exports; every answer sets Content-Length.
    protocol_version = "HTTP/1.1"
    token = None
    fail_status = None

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.answer(411, b'{"error":"Content-Length required"}')
            return
        body = self.rfile.read(int(length))

        if self.fail_status is not None:
            self.answer(self.fail_status, b'{"error":"failing on purpose"}')
            return
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            # Not retried by default (401 is not in retryOn): the export is dead-lettered.
            self.answer(401, b'{"error":"bad or missing bearer token"}')
            return

        key = self.headers.get("Idempotency-Key")
        if not key:
            self.answer(400, b'{"error":"Idempotency-Key required"}')
            return
        try:
            profile = json.loads(body)
            if not isinstance(profile, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            # A 400 is not retried: the export goes straight to the dead-letter store.
            self.answer(400, json.dumps({"error": f"bad JSON: {e}"}).encode())
            return

        with SEEN_LOCK:
            if key in SEEN:
                # Already processed: a retry, a redrive or a replay of the same input.
                print(f"duplicate {key} (already processed, answered 200)", flush=True)
            else:
                # "Processing" is printing here. Record the key only after processing, so
                # that a failure before this point lets the re-send through.
                print(f"export {key} {self.path}\n{describe(profile)}", flush=True)
                SEEN.add(key)
        self.answer(200)

    def log_message(self, format, *args):
        pass  # quiet: do_POST prints what matters


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (else 401)")
    parser.add_argument("--fail-status", type=int, metavar="CODE",
                        help="answer every request with this status (e.g. 503)")
    args = parser.parse_args()
    Handler.token = args.token
    Handler.fail_status = args.fail_status
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
