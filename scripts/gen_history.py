#!/usr/bin/env python3
"""Writes a replayable history and its configuration, for `scripts/bench_replay.sh`.

The shape of issue #8's workload: PROFILES people, each a CRM fragment and a web fragment
joined by their email under `privateGraph`; then UPDATES updates over random people, half
rewriting the CRM fragment (a mapped name, loyalty points that move audiences), half an
unmapped web attribute; 20 rule audiences (10 points thresholds, 10 first-name rules), one
destination mapping them all. Seeded: the same arguments always write the same files.

    scripts/gen_history.py OUT_DIR [PROFILES=100000] [UPDATES=200000] [SEED=1]
"""
import json
import os
import random
import sys

FIRST = ["Ann", "Bob", "Cara", "Dan", "Eve", "Finn", "Gus", "Hal", "Ida", "Jon"]


def stamp(n):
    # 2024-05-01T00:00:00Z plus n seconds.
    s = 1714521600 + n
    days, rem = divmod(s, 86400)
    import datetime
    t = datetime.datetime(1970, 1, 1) + datetime.timedelta(days=days, seconds=rem)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def crm(p, rng, n):
    return {"type": "fragment", "dataset": "crm", "id": f"c{p}", "timestamp": stamp(n),
            "identityMap": {"email": [{"id": f"p{p}@example.org", "primary": True}],
                            "crmid": [{"id": str(p)}]},
            "attributes": {"person": {"name": {"firstName": rng.choice(FIRST), "lastName": f"N{p}"}},
                           "personalEmail": {"address": f"p{p}@example.org"},
                           "loyalty": {"points": rng.randrange(1000)}}}


def web(p, n):
    return {"type": "fragment", "dataset": "web", "id": f"w{p}", "timestamp": stamp(n),
            "identityMap": {"email": [{"id": f"p{p}@example.org"}], "ecid": [{"id": f"e{p}"}]},
            "attributes": {"web": {"lastPage": f"/page/{n % 101}"}}}


def config():
    audiences = []
    for i in range(20):
        if i % 2 == 0:
            rule = f"loyalty.points >= {100 * (i // 2 + 1)}"
        else:
            rule = f'person.name.firstName = "{FIRST[i // 2]}"'
        audiences.append({"id": f"a{i}", "name": f"Audience {i}", "mergePolicy": "mp", "rule": rule,
                          "createdAt": 1700000000000, "updatedAt": 1700000000000})
    return {
        "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered",
                           "identityStitching": "privateGraph"}],
        "audiences": audiences,
        "destinations": [{"id": "d", "name": "Bench", "endpoint": "http://127.0.0.1:9/",
                          "audiences": [{"id": a["id"], "mappingCreatedAt": 1700000000000,
                                         "mappingUpdatedAt": 1700000000000} for a in audiences],
                          "includeSegmentNames": True, "includeSegmentTimestamps": True,
                          "attributes": ["person.name.firstName", "person.name.lastName",
                                         "personalEmail.address"]}],
    }


def main():
    out = sys.argv[1]
    profiles = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    updates = int(sys.argv[3]) if len(sys.argv) > 3 else 200_000
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config(), f, indent=1)
    with open(os.path.join(out, "events.ndjson"), "w") as f:
        for p in range(profiles):
            f.write(json.dumps(crm(p, rng, 0), separators=(",", ":")) + "\n")
            f.write(json.dumps(web(p, 0), separators=(",", ":")) + "\n")
        for n in range(1, updates + 1):
            p = rng.randrange(profiles)
            e = crm(p, rng, n) if rng.random() < 0.5 else web(p, n)
            f.write(json.dumps(e, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
