"""Open-loop load generator for the serving node (`torchrec-hps loadgen`): Poisson arrivals at a set rate,
heavy-tailed query sizes (lognormal; MLPerf DLRM-v2 queries hold up to 700 samples, ~270 on average), Zipf
ids from one popularity order, every query new. Requests go over the Open Inference Protocol's gRPC API
(raw tensor contents) from asyncio, so arrivals never wait for answers (open loop: a slow server sees its
queue grow, as in production). Reports achieved QPS, p50/p95/p99 and failures by status, and searches
the highest rate whose p99 stays under a target.

Run it in its own process: in the server's process it would share the GIL with the workers."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from torchrec_hps.workload import ZipfKeys


@dataclass
class LoadSpec:
    qps: float
    duration_s: float = 5.0
    size_mean: float = 270.0
    size_sigma: float = 0.6  # of log(size): the tail of the lognormal
    size_max: int = 700
    ids_per_feature: int = 1
    zipf_alpha: float = 1.09
    timeout_ms: float = 1000.0
    seed: int = 0


@dataclass
class LoadResult:
    offered_qps: float
    achieved_qps: float
    samples_per_s: float
    queries: int
    failed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: Dict[str, int] = field(default_factory=dict)


class QueryPool:
    """Pre-built requests (building them while sending would slow the arrivals): each a new Zipf draw."""

    def __init__(self, features: int, id_bounds: Sequence[int], dense: int, spec: LoadSpec, count: int) -> None:
        rng = np.random.default_rng(spec.seed)
        mu = np.log(spec.size_mean) - spec.size_sigma ** 2 / 2
        sizes = np.clip(np.round(rng.lognormal(mu, spec.size_sigma, count)), 1, spec.size_max).astype(np.int64)
        samplers = [ZipfKeys(int(b), spec.zipf_alpha, seed=spec.seed * 1000 + i) for i, b in enumerate(id_bounds)]
        total = int(sizes.sum())
        ids = [s.sample(total * spec.ids_per_feature) for s in samplers]
        dense_all = rng.standard_normal((total, dense), dtype=np.float32)
        self.requests: List[tuple] = []
        at = 0
        for n in sizes.tolist():
            lengths = np.full((features, n), spec.ids_per_feature, dtype=np.int64)
            values = np.concatenate([f[at * spec.ids_per_feature:(at + n) * spec.ids_per_feature] for f in ids])
            self.requests.append((n, dense_all[at:at + n], lengths, values))
            at += n


def _request(pb, model: str, q: tuple, timeout_ms: float):
    n, dense, lengths, values = q
    req = pb.ModelInferRequest(model_name=model)
    for name, arr, dt in (("dense_features", dense, "FP32"), ("sparse_lengths", lengths, "INT64"),
                          ("sparse_values", values, "INT64")):
        req.inputs.add(name=name, datatype=dt, shape=list(arr.shape))
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    req.parameters["timeout_ms"].int64_param = int(timeout_ms)
    return req


class _Tally:
    """One load run's client: sends a query over gRPC and keeps its latency, samples and status."""

    def __init__(self, stub, model: str, spec: LoadSpec) -> None:
        from torchrec_hps.serving.oip import grpc_predict_v2_pb2 as pb

        self.stub, self.model, self.spec, self.pb = stub, model, spec, pb
        self.latencies: List[float] = []
        self.statuses: Dict[str, int] = {}
        self.samples = 0
        self.sent = 0

    async def send(self, q: tuple) -> None:
        import grpc

        self.sent += 1
        req = _request(self.pb, self.model, q, self.spec.timeout_ms)
        t0 = time.perf_counter()
        try:
            await self.stub.ModelInfer(req, timeout=self.spec.timeout_ms / 1e3 * 2)
        except grpc.aio.AioRpcError as e:
            self.statuses[e.code().name] = self.statuses.get(e.code().name, 0) + 1
            return
        self.latencies.append(time.perf_counter() - t0)
        self.samples += q[0]
        self.statuses["OK"] = self.statuses.get("OK", 0) + 1

    def result(self, offered_qps: float, elapsed: float) -> LoadResult:
        lat = np.array(self.latencies) * 1e3 if self.latencies else np.array([float("inf")])
        ok = self.statuses.get("OK", 0)
        return LoadResult(offered_qps=offered_qps, achieved_qps=ok / elapsed, samples_per_s=self.samples / elapsed,
                          queries=self.sent, failed=self.sent - ok, p50_ms=float(np.percentile(lat, 50)),
                          p95_ms=float(np.percentile(lat, 95)), p99_ms=float(np.percentile(lat, 99)),
                          statuses=self.statuses)


def _channel(target: str):
    import grpc

    return grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)])


async def _open_loop(target: str, model: str, requests: List, spec: LoadSpec) -> LoadResult:
    from torchrec_hps.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    rng = np.random.default_rng(spec.seed + 1)
    count = max(1, int(spec.qps * spec.duration_s))
    gaps = rng.exponential(1.0 / spec.qps, count)
    async with _channel(target) as channel:
        tally = _Tally(pb_grpc.GRPCInferenceServiceStub(channel), model, spec)
        tasks = []
        start = time.perf_counter()
        due = start
        for i in range(count):  # arrivals on schedule, never waiting for answers
            due += gaps[i]
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(tally.send(requests[i % len(requests)])))
        sent_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
        elapsed = max(time.perf_counter() - start, sent_for)
    return tally.result(spec.qps, elapsed)


async def _closed_loop(target: str, model: str, requests: List, spec: LoadSpec, concurrency: int) -> LoadResult:
    """`concurrency` clients, each sending its next query when the last is answered: the node's peak
    throughput with no latency bound (always `concurrency` queries in the node, never a runaway queue)."""
    from torchrec_hps.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    async with _channel(target) as channel:
        tally = _Tally(pb_grpc.GRPCInferenceServiceStub(channel), model, spec)
        start = time.perf_counter()
        end = start + spec.duration_s

        async def client() -> None:
            while time.perf_counter() < end:
                await tally.send(requests[tally.sent % len(requests)])

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return tally.result(float("nan"), elapsed)


def model_signature(target: str, model: str):
    """(sparse feature count, dense width) from the server's ModelMetadata."""
    import grpc

    from torchrec_hps.serving.oip import grpc_predict_v2_pb2 as pb
    from torchrec_hps.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=model))
    shapes = {t.name: list(t.shape) for t in meta.inputs}
    return shapes["sparse_lengths"][0], shapes["dense_features"][1]


def run_load(target: str, model: str, spec: LoadSpec, id_bounds: Sequence[int], pool: Optional[QueryPool] = None
             ) -> LoadResult:
    features, dense = model_signature(target, model)
    if len(id_bounds) != features:
        raise ValueError(f"model {model!r} takes {features} sparse features; {len(id_bounds)} id bounds given")
    pool = pool or QueryPool(features, id_bounds, dense, spec, count=max(64, int(spec.qps * spec.duration_s)))
    return asyncio.run(_open_loop(target, model, pool.requests, spec))


def find_max_qps(target: str, model: str, spec: LoadSpec, id_bounds: Sequence[int], p99_target_ms: float,
                 lo: float, hi: float, steps: int = 6, warmup_s: float = 0.0, log=None) -> Dict:
    """The highest offered rate in [lo, hi] whose p99 <= target and with no failed query (bisection on a
    log scale, `steps` probes after checking the ends). `warmup_s`: each probe first runs that long at its
    rate, unmeasured (an online tuner on the server adapts to the load before it is measured)."""
    features, dense = model_signature(target, model)
    pool = QueryPool(features, id_bounds, dense, spec, count=max(256, int(hi * (spec.duration_s + warmup_s))))
    probes = []

    def probe(qps: float) -> bool:
        if warmup_s:
            asyncio.run(_open_loop(target, model, pool.requests, LoadSpec(**{**asdict(spec), "qps": qps,
                                                                              "duration_s": warmup_s})))
        r = asyncio.run(_open_loop(target, model, pool.requests, LoadSpec(**{**asdict(spec), "qps": qps,
                                                                          "seed": spec.seed + 7})))
        ok = r.p99_ms <= p99_target_ms and r.failed == 0
        probes.append({**asdict(r), "ok": ok})
        if log:
            log(f"  qps {qps:8.1f}: achieved {r.achieved_qps:8.1f}, p99 {r.p99_ms:8.2f} ms, failed {r.failed}"
                f" -> {'ok' if ok else 'over'}")
        return ok

    if not probe(lo):
        return {"max_qps": 0.0, "probes": probes}
    if probe(hi):
        return {"max_qps": hi, "probes": probes}
    for _ in range(steps):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    best = max((p for p in probes if p["ok"]), key=lambda p: p["offered_qps"])
    return {"max_qps": best["offered_qps"], "achieved_qps": best["achieved_qps"],
            "samples_per_s": best["samples_per_s"], "p99_ms": best["p99_ms"], "probes": probes}


def sequential_round_trips(grpc_target: str, http_target: Optional[str], model: str, n: int = 400,
                           warmup: int = 50) -> Dict[str, float]:
    """p50/mean of `n` sequential one-sample queries (the server's per-request cost when the model costs
    nothing), over gRPC and, given `http_target`, HTTP/JSON (stdlib client, keep-alive, no Nagle)."""
    import http.client
    import socket

    import grpc

    from torchrec_hps.serving.oip import grpc_predict_v2_pb2 as pb
    from torchrec_hps.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    features, dense = model_signature(grpc_target, model)
    q = (1, np.full((1, dense), 0.5, np.float32), np.ones((features, 1), np.int64), np.zeros(features, np.int64))
    out: Dict[str, float] = {}

    def record(kind: str, call) -> None:
        times = []
        for i in range(n + warmup):
            t0 = time.perf_counter()
            call()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out[f"{kind}_p50_ms"] = float(np.median(times)) * 1e3
        out[f"{kind}_mean_ms"] = float(np.mean(times)) * 1e3

    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = _request(pb, model, q, 1000.0)
        record("grpc", lambda: stub.ModelInfer(req))
    if http_target:
        host, port = http_target.rsplit(":", 1)
        body = json.dumps({"inputs": [
            {"name": "dense_features", "datatype": "FP32", "shape": [1, dense], "data": [0.5] * dense},
            {"name": "sparse_lengths", "datatype": "INT64", "shape": [features, 1], "data": [1] * features},
            {"name": "sparse_values", "datatype": "INT64", "shape": [features], "data": [0] * features}]})
        conn = http.client.HTTPConnection(host, int(port))
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def post() -> None:
            conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")

        def ready() -> None:  # a bare round trip through the same stack: the client's and the loop's share
            conn.request("GET", "/v2/health/ready")
            r = conn.getresponse()
            r.read()

        record("http", post)
        record("http_ready", ready)
        # what an inference adds over a bare HTTP round trip: parsing, checks, the scheduler's queue and
        # worker thread, scoring and the reply
        out["http_infer_minus_ready_ms"] = out["http_p50_ms"] - out["http_ready_p50_ms"]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="torchrec-hps loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:8001", help="the server's gRPC address")
    p.add_argument("--model", required=True)
    p.add_argument("--id-bounds", help="rows per sparse feature, comma-separated (or N,xF)")
    p.add_argument("--qps", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--size-mean", type=float, default=270.0)
    p.add_argument("--size-max", type=int, default=700)
    p.add_argument("--p99-target-ms", type=float, help="search the highest QPS under this p99 (up to --qps)")
    p.add_argument("--warmup", type=float, default=0.0, help="with --p99-target-ms: unmeasured seconds per probe")
    p.add_argument("--concurrency", type=int, help="instead: closed loop, this many queries in flight (peak)")
    p.add_argument("--sequential", type=int, help="instead: N sequential one-sample queries (per-request cost)")
    p.add_argument("--http-target", help="with --sequential: also over HTTP at this address")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if args.sequential:
        result = sequential_round_trips(args.target, args.http_target, args.model, args.sequential)
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    bounds = _bounds(args.id_bounds)
    spec = LoadSpec(qps=args.qps, duration_s=args.duration, size_mean=args.size_mean, size_max=args.size_max)
    if args.concurrency:
        features, dense = model_signature(args.target, args.model)
        pool = QueryPool(features, bounds, dense, spec, count=4096)
        result = asdict(asyncio.run(_closed_loop(args.target, args.model, pool.requests, spec, args.concurrency)))
    elif args.p99_target_ms:
        result = find_max_qps(args.target, args.model, spec, bounds, args.p99_target_ms, lo=max(1.0, args.qps / 64),
                              hi=args.qps, warmup_s=args.warmup, log=print)
    else:
        result = asdict(run_load(args.target, args.model, spec, bounds))
    print(json.dumps({k: v for k, v in result.items() if k != "probes"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _bounds(text: str) -> List[int]:
    if ",x" in text:  # "100000,x26": 26 features of 100000 rows
        rows, times = text.split(",x")
        return [int(rows)] * int(times)
    return [int(x) for x in text.split(",")]


if __name__ == "__main__":
    raise SystemExit(main())
