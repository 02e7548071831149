"""`torchrec-hps` command line: thin entry points over the package."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (argparse prints the usage first), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (hint: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind, lo: float, hi: float, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {what}")
        return value
    return parse


_POSITIVE = _number(int, 1, float("inf"), "a whole number >= 1")
_COUNT = _number(int, 0, float("inf"), "a whole number >= 0")
_RATIO = _number(float, 1e-9, 1.0, "a share of the rows, 0 < ratio <= 1")


class CLIError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def _config(args: argparse.Namespace):
    from torchrec_hps.config_file import load_config

    if not args.config:
        raise CLIError("no --config given", "pass a YAML/JSON config or a HugeCTR ps.json")
    try:
        cfg = load_config(args.config, model=getattr(args, "model", None))
    except ValueError as e:
        raise CLIError(str(e), "see README.md, section Config") from None
    for line in cfg.report:
        print(f"note: {line}", file=sys.stderr)
    return cfg


def _demo(args: argparse.Namespace) -> int:
    import torchrec_hps
    from torchrec_hps.demo import run_demo

    torchrec_hps.check_environment(verbose=True)
    serving = _config(args) if args.config else None
    result = run_demo(batches=args.batches, batch_size=args.batch_size, cache_ratio=args.cache_ratio,
                      train_steps=args.train_steps, serving=serving)
    return 0 if result["ok"] else 1


def _load(args: argparse.Namespace) -> int:
    from torchrec_hps.loader import load_checkpoint
    from torchrec_hps.storage import TierError

    cfg = _config(args)
    try:
        loaded = load_checkpoint(args.checkpoint, cfg.hps, chunk_rows=args.chunk_rows, resume=not args.restart,
                                 progress=not args.quiet)
    except ValueError as e:
        raise CLIError(str(e), "a TorchRec checkpoint holds `...embedding_bags.<table>.weight` entries") from None
    except TierError as e:
        raise CLIError(str(e), "check the tiers in the config are reachable") from None
    for table, rows in loaded.items():
        print(f"{cfg.hps.model}.{table}: {rows:,} rows")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from torchrec_hps.serving.config import ServedModelConfig
    from torchrec_hps.serving.node import run_server

    cfg = _config(args)
    model = cfg.serve
    try:
        given = [(src, path) for src, path in (("torchrec", args.checkpoint), ("module", args.saved_model),
                                               ("torchscript", args.torchscript)) if path]
        if len(given) > 1:
            raise CLIError("give one of --checkpoint, --saved-model, --torchscript")
        if given:
            base = model or ServedModelConfig(name=cfg.hps.model)
            model = replace(base, source=given[0][0], path=given[0][1])
        if model is not None and args.version:
            model = replace(model, version=args.version)
        sched = cfg.server.scheduler
        for name in ("cpu_workers", "gpu_workers", "batch_size", "offload_threshold", "p99_target_ms"):
            if getattr(args, name) is not None:
                setattr(sched, name, getattr(args, name))
        if args.tune:
            sched.tune = True
        sched.__post_init__()
        for name in ("http_port", "grpc_port", "host"):
            if getattr(args, name) is not None:
                setattr(cfg.server, name, getattr(args, name))
        return run_server(cfg, model, bulk_load=not args.no_bulk_load, stop_file=args.stop_file)
    except ValueError as e:
        raise CLIError(str(e), "see README.md, section Serving") from None


def _loadgen(args: argparse.Namespace) -> int:
    from torchrec_hps.serving.loadgen import main as loadgen_main

    return loadgen_main(args.rest)


def _stats(args: argparse.Namespace) -> int:
    from torchrec_hps.metrics import scrape

    try:
        lines = scrape(args.url)
    except (OSError, ValueError) as e:  # ValueError: not a URL at all
        raise CLIError(f"cannot read {args.url}: {e}", "start the node with a metrics port") from None
    print("\n".join(lines) if lines else "no hps_ metrics at that address")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.which == "module":
        from apps import bench_module as mod
    elif args.which == "storage":
        from apps import bench_storage as mod
    elif args.which == "update":
        from apps import bench_update as mod
    else:
        from apps import bench_gpu as mod
    return mod.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="torchrec-hps", description="Hierarchical parameter server for TorchRec.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded demo (no server needed)", formatter_class=fmt,
                          description="Train a small DLRM, serve it through the parameter server (memory + local "
                                      "RocksDB, or the tiers of --config) with a small cache, print hit rates and "
                                      "check equality with the trained model.",
                          epilog="examples:\n  torchrec-hps demo --batches 20 --cache-ratio 0.01\n"
                                 "  torchrec-hps demo --config hps.yaml   # Redis/Kafka from the config")
    demo.add_argument("--batches", type=_POSITIVE, default=40)
    demo.add_argument("--batch-size", type=_POSITIVE, default=512)
    demo.add_argument("--cache-ratio", type=_RATIO, default=0.05, help="share of each table the cache holds")
    demo.add_argument("--train-steps", type=_COUNT, default=200)
    demo.add_argument("--config", help="serve from these tiers; with `kafka`, train with the train bridge on")
    demo.set_defaults(func=_demo)
    load = sub.add_parser("load", help="load a TorchRec checkpoint into the tiers", formatter_class=fmt,
                          description="Write every embedding table of a checkpoint (state dict or saved module) "
                                      "into the tiers that keep full copies, in chunks; resumable.",
                          epilog="examples:\n  torchrec-hps load --config hps.yaml --checkpoint model.pt\n"
                                 "  torchrec-hps load --config ps.json --model dcn --checkpoint dcn.pt --restart")
    load.add_argument("--config", required=True, help="our YAML/JSON config or a HugeCTR ps.json")
    load.add_argument("--model", help="which model of a ps.json")
    load.add_argument("--checkpoint", required=True)
    load.add_argument("--chunk-rows", type=_POSITIVE, default=65536, help="rows per write (bounds memory)")
    load.add_argument("--restart", action="store_true", help="ignore the progress of an earlier, stopped load")
    load.add_argument("--quiet", action="store_true", help="no progress bar")
    load.set_defaults(func=_load)
    serve = sub.add_parser("serve", help="serve ranking requests (Open Inference Protocol, HTTP and gRPC)",
                           formatter_class=fmt,
                           description="Load the config's model onto its tiers and serve it: KServe v2 / Open "
                                       "Inference Protocol over HTTP and gRPC, the DeepRecSys scheduler, one GPU "
                                       "worker per GPU and CPU workers; SIGTERM drains and stops.",
                           epilog="examples:\n  torchrec-hps serve --config hps.yaml\n"
                                  "  torchrec-hps serve --config hps.yaml --checkpoint dlrm.pt --tune --p99-target-ms 20\n"
                                  "  torchrec-hps serve --config hps.yaml --torchscript model.pt --gpu-workers 0")
    serve.add_argument("--config", required=True, help="our YAML/JSON config (tables, tiers, server, serve)")
    serve.add_argument("--model", help="which model of a ps.json")
    serve.add_argument("--checkpoint", help="a TorchRec DLRM checkpoint (the config's `serve` arch sizes)")
    serve.add_argument("--saved-model", help="a whole model saved with torch.save (e.g. after TorchRec's "
                                            "quantize_inference_model); a pickle: trusted paths only")
    serve.add_argument("--torchscript", help="an artifact saved by torchrec_hps.serving.save_served_model")
    serve.add_argument("--version", type=_POSITIVE)
    serve.add_argument("--no-bulk-load", action="store_true", help="the tiers already hold this version's rows")
    serve.add_argument("--host")
    serve.add_argument("--http-port", type=_COUNT)
    serve.add_argument("--grpc-port", type=_COUNT)
    serve.add_argument("--cpu-workers", type=_COUNT)
    serve.add_argument("--gpu-workers", type=_COUNT, help="default: one per visible GPU")
    serve.add_argument("--batch-size", type=_POSITIVE)
    serve.add_argument("--offload-threshold", type=_POSITIVE)
    serve.add_argument("--tune", action="store_true", help="hill-climb batch size and offload threshold online")
    serve.add_argument("--p99-target-ms", type=float)
    serve.add_argument("--stop-file", help="drain and exit once this file exists")
    serve.set_defaults(func=_serve)
    loadgen = sub.add_parser("loadgen", help="open-loop Poisson load against a serving node (gRPC)",
                             formatter_class=fmt, add_help=False,
                             epilog="example:\n  torchrec-hps loadgen -- --model ctr --id-bounds 1000000,x26 "
                                    "--qps 500 --p99-target-ms 20")
    loadgen.add_argument("rest", nargs=argparse.REMAINDER, help="loadgen arguments (after --; -- --help lists them)")
    loadgen.set_defaults(func=_loadgen)
    stats = sub.add_parser("stats", help="print a running node's per-table, per-tier stats", formatter_class=fmt,
                           epilog="example:\n  torchrec-hps stats --url http://node7:9400/metrics")
    stats.add_argument("--url", required=True, help="the node's Prometheus /metrics address")
    stats.set_defaults(func=_stats)
    bench = sub.add_parser("bench", help="run a benchmark (module, storage, update, gpu)", formatter_class=fmt,
                           epilog="examples:\n  torchrec-hps bench module -- --png results/module.png\n"
                                  "  torchrec-hps bench storage -- --rows 200000\n"
                                  "  torchrec-hps bench gpu -- --rows 1000000")
    bench.add_argument("which", choices=["module", "storage", "update", "gpu"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (after --)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rest", None) and args.rest[:1] == ["--"]:
        args.rest = args.rest[1:]
    try:
        return args.func(args)
    except CLIError as e:
        print(f"torchrec-hps {args.command}: error: {e}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
