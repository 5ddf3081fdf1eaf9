"""Cost of one load-balancer pick, per policy and host count, plus the ring/Maglev table build time.

    .venv/bin/python bench/lb_pick.py [-n 200000] [--hosts 3,10,100] [--rounds 3] [--markdown out.md]

For every policy (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV) and host count, two host sets are
measured: equal weights, and weights 1..4 (host i gets weight i % 4 + 1). A pick is
``lb.choose(hosts, key)`` on the same host list each time (as the cluster calls it), with ``key`` cycling
through 1024 precomputed 64-bit hash keys for the consistent-hash policies and ``None`` for the others.
The loop overhead (the same loop calling a no-op) is subtracted. Each cell is the best of ``--rounds``
runs of ``-n`` picks, in ns per pick.

Build: ``lb.refresh(hosts)`` for RING_HASH (default ``minimum_ring_size`` 1024) and MAGLEV (table 65537),
best of ``--rounds``, in ms. It runs once per host-set change (``hosts_changed()``), never per request.

Also printed: ``compute_hash`` for one header policy (the per-request cost a ``hash_policy`` adds).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microenvoy.config.lb import HashPolicy, HeaderHash
from microenvoy.core.headers import Headers
from microenvoy.router.hash_policy import compute_hash
from microenvoy.upstream.host import Host
from microenvoy.upstream.lb import make_lb

POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV")
HASHED = ("RING_HASH", "MAGLEV")


def make_hosts(n: int, weighted: bool) -> list[Host]:
    return [Host((f"10.2.{i // 250}.{i % 250 + 1}", 8080), (i % 4 + 1) if weighted else 1) for i in range(n)]


def best_of(rounds: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(rounds))


def time_loop(call: Callable[[list[Host], int | None], object], hosts: list[Host], keys: list[int | None],
              n: int) -> float:  # fmt: skip
    """Seconds for ``n`` calls (keys cycled in blocks of len(keys))."""
    blocks = max(1, n // len(keys))
    t0 = time.perf_counter()
    for _ in range(blocks):
        for k in keys:
            call(hosts, k)
    return time.perf_counter() - t0


def pick_ns(policy: str, hosts: list[Host], n: int, rounds: int) -> float:
    rng = random.Random(1)
    keys: list[int | None] = [rng.getrandbits(64) for _ in range(1024)] if policy in HASHED else [None] * 1024
    lb = make_lb(policy, rng=random.Random(2))
    lb.choose(hosts, keys[0])  # builds the tables outside the timing

    def noop(hosts: list[Host], key: int | None) -> None:
        return None

    calls = max(1, n // len(keys)) * len(keys)
    overhead = best_of(rounds, lambda: time_loop(noop, hosts, keys, n))
    total = best_of(rounds, lambda: time_loop(lb.choose, hosts, keys, n))
    return max(0.0, total - overhead) / calls * 1e9


def build_ms(policy: str, hosts: list[Host], rounds: int) -> float:
    def once() -> float:
        lb = make_lb(policy, rng=random.Random(3))
        t0 = time.perf_counter()
        lb.refresh(hosts)  # type: ignore[attr-defined]
        return time.perf_counter() - t0

    return best_of(rounds, once) * 1e3


def hash_policy_ns(n: int, rounds: int) -> float:
    policies = (HashPolicy(header=HeaderHash("x-user")),)
    headers = Headers([(b":method", b"GET"), (b":path", b"/api/items?id=7"), (b":authority", b"svc"),
                       (b"user-agent", b"bench"), (b"accept", b"*/*"), (b"x-user", b"alice")])  # fmt: skip

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            compute_hash(policies, headers, "10.0.0.1")
        return time.perf_counter() - t0

    return best_of(rounds, run) / n * 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200_000, help="picks per measurement (default 200000)")
    ap.add_argument("--hosts", default="3,10,100", help="comma-separated host counts (default 3,10,100)")
    ap.add_argument("--rounds", type=int, default=3, help="best of this many runs (default 3)")
    ap.add_argument("--markdown", help="also write the tables to this file")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.hosts.split(",")]

    lines = [f"### ns per pick (best of {args.rounds} x {args.n} picks, loop overhead subtracted)", ""]
    header = "| policy | " + " | ".join(f"{c} hosts | {c} weighted" for c in counts) + " |"
    lines += [header, "|---" * (1 + 2 * len(counts)) + "|"]
    for policy in POLICIES:
        cells = []
        for c in counts:
            for weighted in (False, True):
                cells.append(f"{pick_ns(policy, make_hosts(c, weighted), args.n, args.rounds):.0f}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"### table build, ms (best of {args.rounds})", ""]
    lines += ["| policy | " + " | ".join(f"{c} hosts | {c} weighted" for c in counts) + " |"]
    lines += ["|---" * (1 + 2 * len(counts)) + "|"]
    for policy in HASHED:
        cells = [
            f"{build_ms(policy, make_hosts(c, w), args.rounds):.1f}" for c in counts for w in (False, True)
        ]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"compute_hash, one header policy: {hash_policy_ns(args.n // 4, args.rounds):.0f} ns per request",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
