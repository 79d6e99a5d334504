"""The ``genrec`` command: data statistics, training, evaluation, recommendation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from genrec import config as config_lib
from genrec.data.errors import DataError


def _print_metrics(title: str, metrics: dict) -> None:
    print(title)
    for key, value in metrics.items():
        print(f"  {key:>22}  {value:.4f}" if isinstance(value, float) else f"  {key:>22}  {value}")


def cmd_data_stats(args) -> int:
    from genrec.data.preprocess import PrepConfig, prepare

    seq = prepare(args.dataset, args.data_dir, PrepConfig(args.label_threshold, args.request_window_s),
                  allow_download=not args.no_download)
    stats = seq.stats()
    print(f"{args.dataset}")
    for key in ("users", "items", "events", "requests"):
        print(f"  {key:>9}: {stats[key]:,}")
    print(f"  label rate: {stats['label_rate']:.4f} (rating > {args.label_threshold})")
    print(f"  sequence length: mean {stats['mean_sequence_length']:.1f}, max {stats['max_sequence_length']}")
    for key in ("duplicate_events_dropped", "short_users_dropped", "users_without_events", "items_without_metadata"):
        print(f"  {key}: {stats[key]}")
    return 0


def cmd_data_synth(args) -> int:
    from genrec.data.synth import SynthConfig, generate, signal_names

    try:
        cfg = SynthConfig(users=args.users, events=args.events, items=args.items, signals=signal_names(args.signals),
                          seed=args.seed)
        generate(cfg, args.out)
    except ValueError as err:
        raise DataError("genrec data synth", str(err)) from None
    return 0


def _event_log_spec(args):
    """The event log of ``--log`` (an event-log mapping, or a run config with ``data.event_log``) or of
    the public log ``--public``."""
    import yaml

    from genrec.data.eventlog import EventLogSpec
    from genrec.data.public_logs import read_log

    if args.public:
        return read_log(args.public, args.data_dir, allow_download=not args.no_download)
    values = yaml.safe_load(Path(args.log).read_text()) or {}
    if "data" in values:
        values = (values.get("data") or {}).get("event_log") or {}
    try:
        return EventLogSpec.from_dict(values, f"{args.log}")
    except (TypeError, ValueError) as err:
        raise DataError(args.log, str(err)) from None


def cmd_data_prepare(args) -> int:
    from genrec.data.store import StoreConfig, build, load

    spec = _event_log_spec(args)
    cfg = StoreConfig(request_window_s=args.request_window_s, min_user_events=args.min_user_events,
                      duplicates=args.duplicates, time_order=args.time_order)
    seq = load(build(spec, args.out, cfg))
    stats = seq.stats()
    print(f"{spec.name} -> {args.out}")
    for key in ("users", "items", "events", "requests"):
        print(f"  {key:>9}: {stats[key]:,}")
    rates = seq.signal_labels.mean(axis=0) if len(seq.items) else []
    print("  signal rates: " + ", ".join(f"{n} {r:.4f}" for n, r in zip(seq.signal_names, rates, strict=True)))
    print(f"  sequence length: mean {stats['mean_sequence_length']:.1f}, max {stats['max_sequence_length']}")
    return 0


def cmd_train(args) -> int:
    from genrec.distributed import launch

    if args.nproc is not None and not launch.under_torchrun():
        return launch.torchrun(args.nproc, _without_nproc(sys.argv[1:] if args.argv is None else args.argv))
    overrides = list(args.set or [])
    if args.out_dir:
        overrides.append(f"train.out_dir={args.out_dir}")
    cfg = config_lib.load(args.config, overrides)
    from genrec.distributed.run import train

    result = train(cfg, resume=not args.no_resume)
    if result is not None:
        _print_metrics(f"test metrics ({cfg.model}, {cfg.data.dataset}, {cfg.data.protocol}):", result["test"])
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line the launched ranks run: this one without ``--nproc K``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _load_run(path: str, overrides: list[str]):
    """A trainer for the run folder (or a checkpoint inside it) with its best weights loaded."""
    from genrec.distributed.checkpoint import is_distributed_checkpoint, load_model_single_process
    from genrec.train import checkpoint
    from genrec.train.trainer import Trainer

    ckpt = Path(path)
    run_dir = ckpt if (ckpt / "config.yaml").is_file() else ckpt.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"{ckpt}: no config.yaml in the run folder; pass a run folder or a checkpoint in it")
    cfg = config_lib.load(run_dir / "config.yaml", overrides)
    trainer = Trainer(cfg)
    weights = ckpt / "best" if (ckpt / "best" / "model.safetensors").is_file() else ckpt
    if is_distributed_checkpoint(weights):  # written by torchrun ranks; read here by one process
        load_model_single_process(weights, trainer.model)
    elif (weights / "model.safetensors").is_file():
        checkpoint.load_weights(trainer.model, weights)
    else:
        raise SystemExit(f"{weights}: no model.safetensors")
    trainer.model.to(trainer.device)
    return trainer, weights


def cmd_eval(args) -> int:
    import torch

    trainer, weights = _load_run(args.checkpoint, args.set or [])
    with torch.no_grad():
        metrics = trainer.evaluate(args.split)
    _print_metrics(f"{args.split} metrics ({weights}):", metrics)
    if args.json:
        print(json.dumps(metrics))
    return 0


def cmd_recommend(args) -> int:
    from genrec.serve.recommend import recommend, user_index

    trainer, weights = _load_run(args.checkpoint, args.set or [])
    try:
        user = user_index(trainer.seq, args.user)
        recs = recommend(trainer.model, trainer.seq, user, args.k, trainer.cfg.data.max_len, trainer.device,
                         include_seen=args.include_seen)
    except ValueError as err:
        raise SystemExit(f"genrec recommend: {err}") from None
    n = int(trainer.seq.user_offsets[user + 1] - trainer.seq.user_offsets[user])
    print(f"top {len(recs)} for user {args.user} ({n} rated items{'' if args.include_seen else ', left out'}; "
          f"{weights})")
    print(f"{'rank':>4}  {'item':>8}  {'score':>8}  {'P(like)':>7}  title")
    for rank, r in enumerate(recs, start=1):
        p = "" if r.p_like is None else f"{r.p_like:.3f}"
        print(f"{rank:>4}  {r.item:>8}  {r.score:>8.3f}  {p:>7}  {r.title} [{'|'.join(r.genres)}]")
    if args.json:
        print(json.dumps([r.__dict__ for r in recs]))
    return 0


def _byte_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1000"`` -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 2G, 1000000)") from None


def cmd_serve(args) -> int:
    import os

    try:
        import uvicorn

        from genrec.serve.app import Limits, build_app
    except ImportError as err:
        raise SystemExit(f"genrec serve: {err.name} is not installed; pip install 'genrec[serve]'") from None
    from genrec.serve.engine import build_engine

    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"train.device={args.device}")
    trainer, weights = _load_run(args.checkpoint, overrides)
    d = trainer.cfg.data
    try:
        engine = build_engine(trainer.model, trainer.seq, d.label_threshold, d.request_window_s, d.max_len,
                              trainer.device, args.cache_bytes, trainer.cfg.model,
                              (args.max_batch, args.max_candidates) if args.cuda_graphs else None)
    except ValueError as err:
        raise SystemExit(f"genrec serve: {err}") from None
    token = args.token or os.environ.get("GENREC_SERVE_TOKEN") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"genrec serve: warning: listening on {args.host} without a token; anyone who can reach it can "
              "query it (set --token or GENREC_SERVE_TOKEN)", file=sys.stderr)
    limits = Limits(args.max_body_bytes, args.max_candidates, d.max_len)
    app = build_app(engine, limits, token, args.max_batch, args.max_wait_us,
                    Path(args.state_file) if args.state_file else None)
    print(f"genrec serve: {trainer.cfg.model} from {weights} on {trainer.device}; http://{args.host}:{args.port} "
          f"(docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def cmd_export(args) -> int:
    import time

    from genrec.serve.export import ExportShapes, export, triton_config

    out = Path(args.out)
    if out.suffix != ".pt2":
        raise SystemExit(f"genrec export: --out {out}: the package name must end in .pt2")
    overrides = list(args.set or []) + ([f"train.device={args.device}"] if args.device else [])
    trainer, weights = _load_run(args.checkpoint, overrides)
    shapes = ExportShapes(max_batch=args.max_batch, max_history=trainer.cfg.data.max_len,
                          max_candidates=args.max_candidates)
    start = time.perf_counter()
    try:
        package = export(trainer.model, out, trainer.seq.num_items, shapes, trainer.device)
    except ValueError as err:
        raise SystemExit(f"genrec export: {err}") from None
    # Triton's model repository: <name>/config.pbtxt beside the version folders <name>/1/model.pt2
    config = (out.parent.parent if out.parent.name.isdigit() else out.parent) / "config.pbtxt"
    config.write_text(triton_config(args.name or trainer.cfg.model, trainer.device))
    print(f"genrec export: {trainer.cfg.model} from {weights} -> {package} and {config} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    stats = data.add_parser("stats", help="users, items, events, requests and label rate of a dataset")
    stats.add_argument("dataset")
    stats.add_argument("--data-dir", default=None, help="dataset root (default $GENREC_DATA)")
    stats.add_argument("--label-threshold", type=float, default=3.0)
    stats.add_argument("--request-window-s", type=int, default=0)
    stats.add_argument("--no-download", action="store_true")
    stats.set_defaults(func=cmd_data_stats)

    synth = data.add_parser("synth", help="write a SYNTHETIC multi-signal event log with a known latent model")
    synth.add_argument("--users", type=int, required=True)
    synth.add_argument("--events", type=int, required=True)
    synth.add_argument("--items", type=int, default=None, help="default: events // 100 (at least 100)")
    synth.add_argument("--signals", default="3", help="a count (click, like, follow, ...) or comma-separated names")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output folder")
    synth.set_defaults(func=cmd_data_synth)

    prep = data.add_parser("prepare", help="preprocess an event log into memory-mapped sequences")
    source = prep.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", help="YAML: an event-log mapping, or a run config with data.event_log")
    source.add_argument("--public", help="a public log: kuairand-pure, kuairand-1k, kuairand-27k, kuaisar, "
                        "recflow, taobao, amazon-books-2014, amazon-books-2018")
    prep.add_argument("--out", required=True, help="output folder of the store")
    prep.add_argument("--data-dir", default=None, help="dataset root for --public (default $GENREC_DATA)")
    prep.add_argument("--no-download", action="store_true")
    prep.add_argument("--request-window-s", type=int, default=0)
    prep.add_argument("--min-user-events", type=int, default=3)
    prep.add_argument("--duplicates", default="drop", choices=["drop", "error", "keep"])
    prep.add_argument("--time-order", default="sort", choices=["sort", "error"])
    prep.set_defaults(func=cmd_data_prepare)

    train = sub.add_parser("train", help="train and evaluate a model")
    train.add_argument("--config", default=None, help="YAML run config")
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.lr=3e-4")
    train.add_argument("--out-dir", default=None)
    train.add_argument("--no-resume", action="store_true", help="ignore checkpoints in out_dir")
    train.add_argument("--nproc", type=int, default=None, metavar="K",
                       help="train on K local processes through torchrun (train.strategy: ddp or fsdp2)")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained run or checkpoint")
    ev.add_argument("--checkpoint", required=True, help="run folder (uses best/) or a checkpoint folder")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    rec = sub.add_parser("recommend", help="top-K items for a user from a trained retrieval model")
    rec.add_argument("--checkpoint", required=True, help="run folder (uses best/) or a checkpoint folder")
    rec.add_argument("--user", required=True, help="raw user id as in the dataset")
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--include-seen", action="store_true", help="also recommend items the user has rated")
    rec.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(func=cmd_recommend)

    srv = sub.add_parser("serve", help="HTTP ranking service over a trained model (/rank, /events, /recommend)")
    srv.add_argument("--checkpoint", required=True, help="run folder (uses best/) or a checkpoint folder")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--device", default=None, help="cpu, cuda, auto (default: the run's train.device)")
    srv.add_argument("--token", default=None, help="bearer token required on every route but /healthz "
                     "(default $GENREC_SERVE_TOKEN; none: no auth)")
    srv.add_argument("--cache-bytes", type=_byte_size, default=_byte_size("1G"),
                     help="budget for per-user KV caches, e.g. 512M (LRU eviction; histories stay on the host)")
    srv.add_argument("--state-file", default=None, help="Parquet snapshot of user histories: read on start, "
                     "written on shutdown")
    srv.add_argument("--max-batch", type=int, default=32, help="requests per scoring call")
    srv.add_argument("--max-wait-us", type=int, default=500, help="longest wait for a batch to fill, microseconds")
    srv.add_argument("--max-candidates", type=int, default=1024)
    srv.add_argument("--cuda-graphs", action="store_true", help="replay cold scoring as CUDA graphs recorded per "
                     "power-of-two bucket of batch, history and candidates (HSTU, DFGR on CUDA)")
    srv.add_argument("--max-body-bytes", type=_byte_size, default=_byte_size("1M"))
    srv.add_argument("--log-level", default="warning")
    srv.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    srv.set_defaults(func=cmd_serve)

    exp = sub.add_parser("export", help="candidate scoring as an AOTInductor package (.pt2) + Triton config.pbtxt")
    exp.add_argument("--checkpoint", required=True, help="run folder (uses best/) or a checkpoint folder")
    exp.add_argument("--out", required=True, help="package path, e.g. models/dfgr/1/model.pt2 (config.pbtxt goes "
                     "to models/dfgr/, Triton's layout; beside the package otherwise)")
    exp.add_argument("--device", default=None, help="cpu or cuda: where the package runs (default: the run's)")
    exp.add_argument("--name", default=None, help="model name in config.pbtxt (default: the model's)")
    exp.add_argument("--max-batch", type=int, default=256, help="largest batch the package accepts")
    exp.add_argument("--max-candidates", type=int, default=1024, help="most candidates per request")
    exp.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    exp.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except DataError as err:
        print(f"genrec: data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
