"""Webhook accept latency of `modeltrace serve` (issue 16 target: 1,000 Hub webhook events in a minute all accepted,
p99 < 100 ms to accept).

Starts the real service (uvicorn, SQLite in WAL mode, `--workers N` busy on the queue meanwhile) against the local Hub
stand-in (tests/hubserver.py), delivers 1,000 webhook payloads for 1,000 distinct commits (each one a new job: the
write path, not the duplicate path) from C concurrent senders, and prints p50 / p99 / max accept latency, the
throughput, and whether every delivery was accepted (202). With --paced the 1,000 events are spread evenly over 60 s
(the issue's "in a minute") instead of sent as fast as possible.

    python benchmarks/bench_service.py [--events 1000] [--concurrency 16] [--workers 1] [--paced] [--db URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hubserver import serve  # noqa: E402

from tests.service.harness import SECRET, Service, webhook  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="worker processes busy on the queue meanwhile")
    ap.add_argument("--paced", action="store_true", help="spread the events over 60 s instead of a burst")
    ap.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mt-bench-service-") as tmpdir:
        tmp = Path(tmpdir)
        repo = tmp / "repo"
        repo.mkdir()
        (repo / "README.md").write_text("# not a model: every job fails quickly and is retried (worker load)\n")
        with serve({"org/bench": repo}) as hub:
            svc = Service(tmp, hub, args.db or f"sqlite:///{tmp / 'service.sqlite'}", tmp / "index.sqlite",
                          ["--workers", str(args.workers), "--attempts", "3"]).start()
            try:
                run(svc, args)
            finally:
                svc.stop()


def run(svc: Service, args: argparse.Namespace) -> None:
    shas = [f"{i:040x}" for i in range(1, args.events + 1)]
    gap = 60.0 / args.events if args.paced else 0.0
    t0 = time.perf_counter()

    def deliver(i: int) -> tuple[int, float]:
        if gap:
            time.sleep(max(0.0, t0 + i * gap - time.perf_counter()))
        start = time.perf_counter()
        status, _ = svc.call("POST", "/webhooks/hub", webhook("org/bench", shas[i]), {"X-Webhook-Secret": SECRET})
        return status, time.perf_counter() - start

    with ThreadPoolExecutor(args.concurrency) as pool:
        got = list(pool.map(deliver, range(args.events)))
    wall = time.perf_counter() - t0
    lat = sorted(1000 * s for _, s in got)
    accepted = sum(1 for status, _ in got if status == 202)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"{args.events} webhook events ({'paced over 60 s' if args.paced else 'burst'}, {args.concurrency} "
          f"concurrent senders, {args.workers} worker(s) busy, {svc.db.split(':')[0]}):")
    print(f"  accepted {accepted}/{args.events} in {wall:.2f} s ({args.events / wall:.0f}/s)")
    print(f"  accept latency p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms "
          f"(target p99 < 100 ms: {'met' if p99 < 100 and accepted == args.events else 'MISSED'})")
    slow = [x for x in lat if x >= 100]
    print(f"  {len(slow)} deliveries took 100 ms or more" + (f" (from {slow[0]:.0f} ms)" if slow else ""))
    counts = svc.call("GET", "/healthz")[1]["queue"]
    print(f"  queue afterwards: {counts}")


if __name__ == "__main__":
    main()
