"""The ``genrec`` command: data statistics, training, evaluation, recommendation, config reference.

Subcommands are registered with :func:`command` (a path such as ``"data stats"``, a help line, a
function adding its arguments); adding one is a decorated function in this file. Every command runs
through one error path (:func:`run_command`): a user error (a bad config value, bad data, a damaged
checkpoint, a run folder holding another run: any ``ValueError``) prints one line
``genrec: error: <file/field/value and what is expected>`` and exits with code 2; ``--debug`` shows
the traceback instead. Command-line mistakes caught by argparse also exit 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import genrec
from genrec import strict_json

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("data", "stats") for `genrec data stats`
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[tuple[str, ...], Command] = {}
GROUPS = {"data": "dataset tools", "config": "configuration reference"}  # help of commands with subcommands


def command(path: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register the decorated ``fn(args) -> exit code`` as ``genrec <path>``."""

    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[tuple(path.split())] = Command(tuple(path.split()), help, fn, arguments)
        return fn

    return register


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (expected 1 or more)")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (expected 0 or more)")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def run_command(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace, debug: bool = False) -> int:
    """Run ``fn(args)``; a user error becomes one line on stderr and exit code 2 (a traceback with ``debug``)."""
    try:
        return fn(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        # ValueError covers genrec's UserError family (DataError, ConfigError, CheckpointError, ...)
        if debug:
            raise
        if isinstance(err, OSError):
            message = f"{err.filename}: {err.strerror}" if err.filename else str(err)
        else:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"genrec: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("genrec: interrupted", file=sys.stderr)
        return 130


# -- shared arguments -------------------------------------------------------------------------------

def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=3e-4 data.split.protocol=temporal")
    p.add_argument("--data-dir", default=None, help="dataset root (default: data.data_dir, then $GENREC_DATA)")


def config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return overrides


def add_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (its best weights), a checkpoint folder or a model.safetensors file")


def load_run(path: str, overrides: list[str]):
    """A trainer for the run that ``path`` (run folder, checkpoint folder or weights file) belongs to,
    with those weights loaded, and the weights' path."""
    from genrec import config as config_lib
    from genrec.train import checkpoint
    from genrec.train.trainer import Trainer

    run_dir, weights = checkpoint.resolve(path)
    if run_dir is None:
        raise checkpoint.CheckpointError(f"{path}: not inside a run folder (no config.yaml beside or above it), "
                                         "so the model and data it was trained on are unknown")
    cfg = config_lib.load(run_dir / "config.yaml", overrides)
    trainer = Trainer(cfg)
    weights = checkpoint.load_weights(trainer.model, weights)  # a DCP checkpoint's too, in this one process
    trainer.model.to(trainer.device)
    return trainer, weights


def _print_metrics(title: str, metrics: dict) -> None:
    print(title)
    for key, value in metrics.items():
        print(f"  {key:>22}  {value:.4f}" if isinstance(value, float) else f"  {key:>22}  {value}")


# -- commands ---------------------------------------------------------------------------------------

def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset")
    p.add_argument("--data-dir", default=None, help="dataset root (default $GENREC_DATA)")
    p.add_argument("--label-threshold", type=float, default=3.0)
    p.add_argument("--request-window-s", type=int, default=0)
    p.add_argument("--no-download", action="store_true")


@command("data stats", "users, items, events, requests and label rate of a dataset", _stats_arguments)
def cmd_data_stats(args) -> int:
    from genrec import settings
    from genrec.data.preprocess import PrepConfig, prepare

    prep = settings.build_dataclass(PrepConfig, {"label_threshold": args.label_threshold,
                                                 "request_window_s": args.request_window_s}, "genrec data stats")
    seq = prepare(args.dataset, args.data_dir, prep, allow_download=not args.no_download)
    stats = seq.stats()
    print(f"{args.dataset}")
    for key in ("users", "items", "events", "requests"):
        print(f"  {key:>9}: {stats[key]:,}")
    print(f"  label rate: {stats['label_rate']:.4f} (rating > {args.label_threshold})")
    print(f"  sequence length: mean {stats['mean_sequence_length']:.1f}, max {stats['max_sequence_length']}")
    for key in ("duplicate_events_dropped", "short_users_dropped", "users_without_events", "items_without_metadata"):
        print(f"  {key}: {stats[key]}")
    return 0


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--items", type=int, default=None, help="default: events // 100 (at least 100)")
    p.add_argument("--signals", default="3", help="a count (click, like, follow, ...) or comma-separated names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")


@command("data synth", "write a SYNTHETIC multi-signal event log with a known latent model", _synth_arguments)
def cmd_data_synth(args) -> int:
    from genrec.data.errors import DataError
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

    from genrec.data.errors import DataError
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


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", help="YAML: an event-log mapping, or a run config with data.event_log")
    source.add_argument("--public", help="a public log: kuairand-pure, kuairand-1k, kuairand-27k, kuaisar, "
                        "recflow, taobao, amazon-books-2014, amazon-books-2018")
    p.add_argument("--out", required=True, help="output folder of the store: new, empty or an earlier "
                   "store (replaced)")
    p.add_argument("--data-dir", default=None, help="dataset root for --public (default $GENREC_DATA)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--request-window-s", type=int, default=0)
    p.add_argument("--min-user-events", type=int, default=3)
    p.add_argument("--duplicates", default="drop", choices=["drop", "error", "keep"])
    p.add_argument("--time-order", default="sort", choices=["sort", "error"])


@command("data prepare", "preprocess an event log into memory-mapped sequences", _prepare_arguments)
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


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults)")
    add_config_arguments(p)
    p.add_argument("--out-dir", default=None, help="run folder (default: a new runs/<model>-<time>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out-dir from its last checkpoint, even with changed train.* settings")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in --out-dir")
    p.add_argument("--nproc", type=int, default=None, metavar="K",
                   help="train on K local processes through torchrun (train.strategy: ddp, fsdp2 or torchrec)")


@command("train", "train and evaluate a model", _train_arguments)
def cmd_train(args) -> int:
    from genrec import config as config_lib
    from genrec.distributed import launch

    overrides = config_overrides(args) + ([f"train.out_dir={args.out_dir}"] if args.out_dir else [])
    cfg = config_lib.load(args.config, overrides)  # checked here, before any process is launched
    if args.nproc is not None and not launch.under_torchrun():
        return launch.torchrun(args.nproc, _without_nproc(sys.argv[1:] if args.argv is None else args.argv))
    from genrec.distributed.run import train

    result = train(cfg, mode="resume" if args.resume else "overwrite" if args.overwrite else "auto")
    if result is not None:
        _print_metrics(f"test metrics ({cfg.model}, {cfg.data.dataset}, {cfg.data.split.protocol}):",
                       result["test"])
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


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")


@command("eval", "evaluate a trained run or checkpoint", _eval_arguments)
def cmd_eval(args) -> int:
    import torch

    trainer, weights = load_run(args.checkpoint, config_overrides(args))
    with torch.no_grad():
        metrics = trainer.evaluate(args.split)
    _print_metrics(f"{args.split} metrics ({weights}):", metrics)
    if args.json:
        print(strict_json.dumps(metrics))
    return 0


def _recommend_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--user", required=True, help="raw user id as in the dataset")
    p.add_argument("--k", type=positive_int, default=10, help="how many items (1 or more)")
    p.add_argument("--include-seen", action="store_true", help="also recommend items the user has rated")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="also print the list as one JSON line")


@command("recommend", "top-K items for a user from a trained retrieval model", _recommend_arguments)
def cmd_recommend(args) -> int:
    from genrec.serve.recommend import recommend, user_index

    trainer, weights = load_run(args.checkpoint, config_overrides(args))
    user = user_index(trainer.seq, args.user)
    recs = recommend(trainer.model, trainer.seq, user, args.k, trainer.cfg.data.max_len, trainer.device,
                     include_seen=args.include_seen)
    n = int(trainer.seq.user_offsets[user + 1] - trainer.seq.user_offsets[user])
    print(f"top {len(recs)} for user {args.user} ({n} rated items{'' if args.include_seen else ', left out'}; "
          f"{weights})")
    print(f"{'rank':>4}  {'item':>8}  {'score':>8}  {'P(like)':>7}  title")
    for rank, r in enumerate(recs, start=1):
        p = "" if r.p_like is None else f"{r.p_like:.3f}"
        print(f"{rank:>4}  {r.item:>8}  {r.score:>8.3f}  {p:>7}  {r.title} [{'|'.join(r.genres)}]")
    if args.json:
        print(strict_json.dumps([r.__dict__ for r in recs]))
    return 0


def _byte_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1000"`` -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 2G, 1000000)") from None


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu, cuda, auto (default: the run's train.device)")
    p.add_argument("--token", default=None, help="bearer token required on every route but /healthz "
                   "(default $GENREC_SERVE_TOKEN; none: no auth)")
    p.add_argument("--cache-bytes", type=_byte_size, default=_byte_size("1G"),
                   help="budget for per-user KV caches, e.g. 512M (LRU eviction; histories stay on the host)")
    p.add_argument("--state-file", default=None, help="Parquet snapshot of user histories plus journals of "
                   "/events appends (<file>.journal.<generation>, fsync'd before each reply): read and compacted "
                   "on start, written on shutdown and after every --snapshot-every appends")
    p.add_argument("--snapshot-every", type=_non_negative_int, default=100_000,
                   help="appends between snapshots of --state-file, each starting a new journal and written in "
                   "the background (0: only at start and shutdown)")
    p.add_argument("--max-batch", type=int, default=32, help="requests per scoring call")
    p.add_argument("--max-wait-us", type=int, default=500, help="longest wait for a batch to fill, microseconds")
    p.add_argument("--max-candidates", type=int, default=1024)
    p.add_argument("--cuda-graphs", action="store_true", help="replay cold scoring as CUDA graphs recorded per "
                   "power-of-two bucket of batch, history and candidates (HSTU, DFGR on CUDA)")
    p.add_argument("--max-body-bytes", type=_byte_size, default=_byte_size("1M"))
    p.add_argument("--log-level", default="warning")
    add_config_arguments(p)


@command("serve", "HTTP ranking service over a trained model (/rank, /events, /recommend)", _serve_arguments)
def cmd_serve(args) -> int:
    import os

    from genrec.errors import UserError

    try:
        import uvicorn

        from genrec.serve.app import Limits, build_app
    except ImportError as err:
        raise UserError(f"{err.name} is not installed; pip install 'genrec[serve]'") from None
    from genrec.serve.engine import build_engine

    overrides = config_overrides(args) + ([f"train.device={args.device}"] if args.device else [])
    trainer, weights = load_run(args.checkpoint, overrides)
    d = trainer.cfg.data
    engine = build_engine(trainer.model, trainer.seq, d.prep.label_threshold, d.prep.request_window_s, d.max_len,
                          trainer.device, args.cache_bytes, trainer.cfg.model,
                          (args.max_batch, args.max_candidates) if args.cuda_graphs else None)
    token = args.token or os.environ.get("GENREC_SERVE_TOKEN") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"genrec serve: warning: listening on {args.host} without a token; anyone who can reach it can "
              "query it (set --token or GENREC_SERVE_TOKEN)", file=sys.stderr)
    limits = Limits(args.max_body_bytes, args.max_candidates, d.max_len)
    app = build_app(engine, limits, token, args.max_batch, args.max_wait_us,
                    Path(args.state_file) if args.state_file else None, args.snapshot_every)
    print(f"genrec serve: {trainer.cfg.model} from {weights} on {trainer.device}; http://{args.host}:{args.port} "
          f"(docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--out", required=True, help="package path, e.g. models/dfgr/1/model.pt2 (config.pbtxt goes "
                   "to models/dfgr/, Triton's layout; beside the package otherwise)")
    p.add_argument("--device", default=None, help="cpu or cuda: where the package runs (default: the run's)")
    p.add_argument("--name", default=None, help="model name in config.pbtxt (default: the model's)")
    p.add_argument("--max-batch", type=positive_int, default=256, help="largest batch the package accepts")
    p.add_argument("--max-candidates", type=positive_int, default=1024, help="most candidates per request")
    add_config_arguments(p)


@command("export", "candidate scoring as an AOTInductor package (.pt2) + Triton config.pbtxt", _export_arguments)
def cmd_export(args) -> int:
    import time

    from genrec.errors import UserError
    from genrec.serve.export import ExportShapes, PackageError, export, triton_config

    out = Path(args.out)
    if out.suffix != ".pt2":
        raise UserError(f"--out {out}: the package name must end in .pt2")
    overrides = config_overrides(args) + ([f"train.device={args.device}"] if args.device else [])
    trainer, weights = load_run(args.checkpoint, overrides)
    shapes = ExportShapes(max_batch=args.max_batch, max_history=trainer.cfg.data.max_len,
                          max_candidates=args.max_candidates)
    start = time.perf_counter()
    try:
        package = export(trainer.model, out, trainer.seq.num_items, shapes, trainer.device)
    except PackageError as err:  # written, but it does not load or score as the model does
        print(f"genrec export: error: {err}", file=sys.stderr)
        return 1
    # Triton's model repository: <name>/config.pbtxt beside the version folders <name>/1/model.pt2
    config = (out.parent.parent if out.parent.name.isdigit() else out.parent) / "config.pbtxt"
    config.write_text(triton_config(args.name or trainer.cfg.model, trainer.device))
    print(f"genrec export: {trainer.cfg.model} from {weights} -> {package} and {config} "
          f"({time.perf_counter() - start:.0f} s; checked: a fresh process loads it and matches the model's scores)")
    return 0


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="a model name; without one, the list of models")


@command("config show", "every config field of a run and of MODEL, with its default and meaning", _show_arguments)
def cmd_config_show(args) -> int:
    from genrec import settings
    from genrec.config import SHARED_MODEL_FIELDS, DataConfig, TrainConfig
    from genrec.errors import ConfigError
    from genrec.models import MODELS

    if args.model is None:
        print("models: " + ", ".join(sorted(MODELS)) + "\n(genrec config show MODEL lists its fields)")
        return 0
    if args.model not in MODELS:
        raise ConfigError(f"model {args.model!r} is unknown; expected one of {', '.join(sorted(MODELS))}")
    sections = [("model_args", MODELS[args.model][1]), ("data", DataConfig), ("train", TrainConfig)]
    print(f"# genrec config for model: {args.model} (YAML sections; override with --set section.key=value)")
    for name, cls in sections:
        print(f"\n{name}:")
        for f in settings.describe(cls, fallback=SHARED_MODEL_FIELDS if name == "model_args" else None):
            default = strict_json.dumps(list(f.default) if isinstance(f.default, tuple) else f.default)
            print(f"  {f.name}: {default}  # {f.type}" + (f"; {f.doc}" if f.doc else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="genrec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"genrec {genrec.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    subparsers = {(): parser.add_subparsers(dest="command", required=True, metavar="COMMAND")}
    for path, cmd in sorted(COMMANDS.items()):
        for depth in range(1, len(path)):  # groups such as `data` get their own subcommand list
            group = path[:depth]
            if group not in subparsers:
                p = subparsers[group[:-1]].add_parser(group[-1], help=GROUPS.get(group[-1], ""))
                subparsers[group] = p.add_subparsers(dest="_".join(group) + "_command", required=True,
                                                     metavar="COMMAND")
        p = subparsers[path[:-1]].add_parser(path[-1], help=cmd.help, description=cmd.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        cmd.arguments(p)
        p.set_defaults(func=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # what torchrun ranks re-run (genrec train --nproc K)
    return run_command(args.func, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
