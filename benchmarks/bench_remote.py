"""The Rio case over a laptop's link (issue 12): inspect, index add, identify and a sampled audit of virtual
checkpoints of Rio's shape served by a Hub look-alike (tests/hubserver.py + benchmarks/rio_virtual.py, bytes made on
demand) through a simulated link (default 100 MB/s shared, 20 ms per request), each command run as the CLI in its
own process. Printed per step: wall time, requests and bytes per model (from the server's log), peak memory, and the
floor: the same byte ranges fetched again by a plain parallel reader (16 threads, no checks) over the same link.

    python benchmarks/bench_remote.py [--shape small|full] [--sample 0.002] [--bandwidth 100e6] [--latency 0.02]
        [--steps inspect,index,identify,audit,gguf]

`--sample 0` runs the audits without `--sample`: the plan a user gets by default.

`--shape full` is the 397B shape (60 layers, 512 experts, ~93k tensors in 94 shards); generating its sampled
bytes is the server's work on this machine's 2 cores, so `small` (8 layers, 32 experts, 881 tensors, 131 MB a
model) is the default for the steps that read weights; inspect runs at full shape either way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _serve(shape_name: str, bandwidth: float, latency: float, q) -> None:
    from hubserver import HubServer, Link
    from rio_virtual import RioShape, rio_family

    shape = RioShape.full() if shape_name == "full" else RioShape.small()
    srv = HubServer(rio_family(shape), link=Link(bandwidth, latency))
    q.put(srv.url)
    srv.serve_forever(poll_interval=0.05)


def _stats(url: str) -> dict:
    import httpx2

    return httpx2.get(f"{url}/_stats?clear=1", timeout=60).json()


def _floor(url: str, stats: dict, connections: int = 16) -> float:
    """Seconds a plain parallel reader takes for the same byte ranges over the same link."""
    import httpx2

    ranges = [(p, a, b) for d in stats.values() for p, a, b in d["ranges"]]
    if not ranges:
        return 0.0
    client = httpx2.Client(limits=httpx2.Limits(max_connections=connections), timeout=120)

    def get(r: tuple[str, int, int]) -> int:
        return len(client.get(url + r[0], headers={"Range": f"bytes={r[1]}-{r[2]}"}).content)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(get, ranges))
    dt = time.perf_counter() - t0
    _stats(url)  # forget the replay
    return dt


def _sample_args(sample: float) -> list[str]:
    """`--sample F`, or nothing (the audit's default plan) for F = 0."""
    return ["--sample", str(sample)] if sample > 0 else []


def _run(url: str, cache: str, args: list[str]) -> tuple[float, float, str, str]:
    """(wall s, peak RSS MiB, stdout, stderr) of one CLI command in its own process."""
    env = {**os.environ, "HF_ENDPOINT": url, "MODELTRACE_CACHE": cache, "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(ROOT)}
    code = ("import resource, sys\nfrom modeltrace.cli import main\nsys.argv = ['modeltrace'] + sys.argv[1:]\n"
            "try:\n    main()\nfinally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "    sys.stderr.write('PEAK ' + hwm[0].split()[1] + '\\n')\n")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=3600)
    dt = time.perf_counter() - t0
    peak = [ln for ln in p.stderr.splitlines() if ln.startswith("PEAK ")]
    err = "\n".join(ln for ln in p.stderr.splitlines() if not ln.startswith("PEAK "))
    if p.returncode not in (0, 1):
        print(f"  command failed ({p.returncode}): {err.strip()[-400:]}")
    return dt, (int(peak[0].split()[1]) / 1024 if peak else 0.0), p.stdout, err


def _report(step: str, dt: float, peak: float, stats: dict, floor: float, sizes: dict[str, int]) -> None:
    reqs = sum(d["requests"] for d in stats.values())
    print(f"{step}: {dt:.1f} s wall, {reqs} requests, peak {peak:.0f} MiB; floor (same bytes, plain parallel "
          f"reader) {floor:.1f} s")
    for repo, d in sorted(stats.items()):
        size = sizes.get(repo)
        share = f" = {100 * d['bytes'] / size:.4f}% of its {size / 1e9:.1f} GB" if size else ""
        print(f"    {repo}: {d['requests']} requests, {d['bytes'] / 1e6:.1f} MB{share}")


def _find(doc: object, key: str) -> dict:
    """The first object in a JSON document that has `key`."""
    if isinstance(doc, dict):
        if key in doc:
            return doc
        items = list(doc.values())
    elif isinstance(doc, list):
        items = doc
    else:
        return {}
    for x in items:
        got = _find(x, key)
        if got:
            return got
    return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["small", "full"], default="small")
    ap.add_argument("--sample", type=float, default=0.002, help="0: no --sample (the audit's default plan)")
    ap.add_argument("--bandwidth", type=float, default=100e6)
    ap.add_argument("--latency", type=float, default=0.020)
    ap.add_argument("--steps", default="inspect,index,identify,audit")
    a = ap.parse_args()
    steps = a.steps.split(",")
    from rio_virtual import RioShape, VirtualModel

    ctx = mp.get_context("fork")
    servers = {}
    for shape in {"full" if "inspect" in steps else a.shape, a.shape}:
        q = ctx.Queue()
        proc = ctx.Process(target=_serve, args=(shape, a.bandwidth, a.latency, q), daemon=True)
        proc.start()
        servers[shape] = (q.get(timeout=600), proc)
    shape_obj = RioShape.full() if a.shape == "full" else RioShape.small()
    model_size = sum(s for n, s in VirtualModel(shape_obj, "qwen", "q").sizes().items()
                     if n.endswith(".safetensors"))
    sizes = {f"bench/{k}": model_size for k in ("rio", "nex", "qwen", "sibling", "indep")}
    print(f"link {a.bandwidth / 1e6:.0f} MB/s, {a.latency * 1e3:.0f} ms per request; weights shape {a.shape} "
          f"({len(shape_obj.tensors())} tensors, {model_size / 1e9:.2f} GB a model)")
    url = servers[a.shape][0]
    cache = tempfile.mkdtemp(prefix="mt-bench-remote-")
    ix = str(Path(cache) / "index.sqlite")
    try:
        if "inspect" in steps:
            full_url = servers["full"][0]
            fcache = tempfile.mkdtemp(prefix="mt-bench-inspect-")
            dt, peak, _, _ = _run(full_url, fcache, ["inspect", "hf://bench/rio", "--json"])
            st = _stats(full_url)
            fsize = sum(s for n, s in VirtualModel(RioShape.full(), "qwen", "q").sizes().items()
                        if n.endswith(".safetensors"))
            _report(f"inspect (full 397B shape, {len(RioShape.full().tensors())} tensors, cold cache; target <= 3 s)",
                    dt, peak, st, _floor(full_url, st), {"bench/rio": fsize})
        if "index" in steps:
            for m in ("nex", "qwen", "sibling", "indep"):
                dt, peak, out, _ = _run(url, cache, ["index", "add", f"hf://bench/{m}", "--index", ix])
                st = _stats(url)
                _report(f"index add bench/{m} (target <= 30 s)", dt, peak, st, _floor(url, st), sizes)
        if "identify" in steps:
            dt, peak, out, _ = _run(url, cache, ["identify", "hf://bench/rio", "--index", ix, "--json"])
            st = _stats(url)
            _report("identify bench/rio (target <= 30 s)", dt, peak, st, _floor(url, st), sizes)
            try:
                r = json.loads(out)
                print(f"    -> relation {r.get('relation')}, method {r.get('method')}, recipe "
                      f"{json.dumps(r.get('recipe') or r.get('parents'), default=str)[:300]}")
            except ValueError:
                print("    -> (no JSON answer)")
        if "audit" in steps:
            args = ["audit", "hf://bench/rio", "-c", "hf://bench/nex", "-c", "hf://bench/qwen", "-c",
                    "hf://bench/sibling", *_sample_args(a.sample), "--json"]
            dt, peak, out, err = _run(url, cache, args)
            st = _stats(url)
            plan = " ".join(_sample_args(a.sample)) or "(default plan)"
            _report(f"audit rio vs nex, qwen, sibling {plan} (targets <= 5 min, <= 0.5% of each "
                    "model, <= 20,000 requests, <= 1 GB)", dt, peak, st, _floor(url, st), sizes)
            try:
                v = _find(json.loads(out), "relation")
                print(f"    -> relation {v.get('relation')}, method {v.get('method')}; parents "
                      f"{json.dumps(v.get('parents'), default=str)[:700]}")
            except ValueError:
                print(f"    -> (no JSON answer) {err.strip()[-300:]}")
        if "gguf" in steps:
            from rio_virtual import VirtualGGUF

            for q in ("Q6_K", "IQ4_XS"):
                repo = f"bench/rio-gguf-{q.lower().replace('_', '')}"
                gsize = VirtualGGUF(shape_obj, "rio", q).sizes()
                args = ["audit", f"hf://{repo}", "-c", "hf://bench/nex", "-c", "hf://bench/qwen",
                        *_sample_args(a.sample), "--json"]
                dt, peak, out, err = _run(url, cache, args)
                st = _stats(url)
                plan = " ".join(_sample_args(a.sample)) or "(default plan)"
                _report(f"audit {repo} ({q} GGUF of rio) vs nex, qwen {plan}", dt, peak, st,
                        _floor(url, st), {**sizes, repo: gsize[f"rio-{q}.gguf"]})
                try:
                    v = _find(json.loads(out), "relation")
                    print(f"    -> {v.get('summary')}; relation {v.get('relation')}, method {v.get('method')}; "
                          f"parents {json.dumps(v.get('parents'), default=str)[:500]}")
                except ValueError:
                    print(f"    -> (no JSON answer) {err.strip()[-300:]}")
    finally:
        for _, proc in servers.values():
            proc.terminate()


if __name__ == "__main__":
    main()
