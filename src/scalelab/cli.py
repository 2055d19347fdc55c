"""The ``scalelab`` command line: a thin layer over the Python API.

    scalelab train  [--config FILE.toml] [--set section.key=value ...] [--out DIR] [--resume]
    scalelab report RUN_DIR
    scalelab config [--config FILE.toml] [--set ...] [--keys]

User errors print one line ``scalelab: error: ...`` and exit with the error's code (2 for bad input).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from scalelab.errors import ConfigError, ScalelabError


# (command, module, help): subcommands implemented next to their subsystem.
EXTERNAL_COMMANDS: list[tuple[str, str, str]] = [
    ("project", "scalelab.perf.cli", "predict time-to-train on other hardware"),
    ("sweep", "scalelab.lab.sweep", "steps-to-target against batch size, with an LR search (Shallue et al. 2018)"),
    ("noise", "scalelab.lab.noise", "gradient noise scale and critical batch (McCandlish et al. 2018)"),
    ("sharpness", "scalelab.lab.sharpness", "epsilon-sharpness of trained minima (Keskar et al. 2017)"),
    ("scaling-law", "scalelab.lab.scaling_law", "power-law fits of error against data size (Hestness et al. 2017)"),
]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="config file (e.g. a run's config.toml to replay it)")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config field; repeatable")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scalelab", description="Deep learning at supercomputer scale, executable.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tr = sub.add_parser("train", help="train a model with a large-batch recipe")
    _add_config_args(tr)
    tr.add_argument("--out", metavar="DIR", help="run directory (default runs/<date>-<time>-<name>)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no live progress bar")
    tr.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="data-parallel workers on this machine, started by torch's elastic launcher")
    tr.add_argument("--max-restarts", type=int, default=0, metavar="R",
                    help="with --nproc: restart the workers up to R times when one dies; they resume from "
                         "the latest checkpoint")
    tr.add_argument("--nnodes", default="1", metavar="N|MIN:MAX",
                    help="with --rdzv-endpoint: this machine is one of N nodes (or MIN..MAX, elastic: nodes may "
                         "join and leave; the workers resume on the new world size)")
    tr.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                    help="where the nodes of a multi-node job meet (c10d rendezvous, hosted by the first node)")
    tr.add_argument("--rdzv-id", default="", metavar="ID", help="job id shared by the nodes of one job")
    tr.set_defaults(run=_cmd_train)

    rp = sub.add_parser("report", help="print a run's summary and write its plots")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.set_defaults(run=_cmd_report)

    cf = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    _add_config_args(cf)
    cf.add_argument("--keys", action="store_true", help="list every key with its default and allowed values")
    cf.set_defaults(run=_cmd_config)

    # Commands that live with their subsystem: each module has add_arguments(parser) and run(args) -> int.
    for name, module, help_text in EXTERNAL_COMMANDS:
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=mod.__doc__.split("\n\n")[0] if mod.__doc__ else None)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return ap


def _cmd_train(args) -> int:
    from scalelab.config import load_config
    from scalelab.train import default_out_dir, print_summary, train

    if args.resume and not args.out:
        raise ConfigError("--resume needs --out DIR, the run directory to continue")
    if args.nproc < 1 or args.max_restarts < 0:
        raise ConfigError(f"--nproc {args.nproc} / --max-restarts {args.max_restarts}: need N >= 1 and R >= 0")
    config_path = args.config
    if args.resume and config_path is None and (Path(args.out) / "config.toml").exists():
        config_path = Path(args.out) / "config.toml"
    overrides = list(args.overrides) + (["train.progress=false"] if args.no_progress else [])
    cfg = load_config(config_path, overrides)
    out = Path(args.out) if args.out else default_out_dir(cfg)
    if args.nproc > 1 or args.nnodes != "1" or args.rdzv_endpoint:
        return launch_job(cfg, out, args.nproc, max_restarts=args.max_restarts, nnodes=args.nnodes,
                          rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, out_given=bool(args.out),
                          resume=args.resume)

    # a worker of a torchrun / --nproc job resumes by itself when the agent restarts it
    resume = args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        summary = train(cfg, out, resume=resume)
    except KeyboardInterrupt:
        print(f"\nscalelab: interrupted; continue with: scalelab train --out {out} --resume", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("SCALELAB_LAUNCHER"):
        print_summary(summary)
        print(f"run directory: {out}")
    return 0


def launch_job(cfg, out: Path, nproc: int, *, max_restarts: int = 0, nnodes: str = "1",
               rdzv_endpoint: str = "", rdzv_id: str = "", out_given: bool = True,
               resume: bool = False) -> int:
    """The parent of a --nproc job: validate and prepare everything, then start the workers. The options are
    ``scalelab train``'s; ``out_given``: the run directory was named (every node of a multi-node job must)."""
    import json

    from scalelab.config import save_config
    from scalelab.data import load_dataset
    from scalelab.parallel.launch import WorkerFailure, launch_workers, parse_nnodes
    from scalelab.train import check_names, print_summary, refuse_existing_run, workers_used

    nodes = parse_nnodes(nnodes)
    multinode = nodes != (1, 1)
    if multinode and not (rdzv_endpoint and rdzv_id and out_given):
        raise ConfigError("--nnodes with more than one node needs --rdzv-endpoint HOST:PORT, --rdzv-id ID and "
                          "--out DIR (the same on every node)")
    if rdzv_endpoint:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--rdzv-endpoint {rdzv_endpoint!r}: expected HOST:PORT, e.g. node1:29500")
    check_names(cfg)
    workers_used(cfg, nproc * nodes[0], check_batch=not multinode)
    # the nodes of a multi-node job start at different times: each resumes what is there (or starts it)
    resume = resume or multinode
    if not resume:
        refuse_existing_run(out)
    load_dataset(cfg.data)  # generate or download once, here, not in every worker
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.toml").exists() or not multinode:
        save_config(cfg, out / "config.toml")
    worker_args = ["train", "--config", str(out / "config.toml"), "--out", str(out)]
    if resume:
        worker_args.append("--resume")
    try:
        launch_workers(worker_args, nproc, max_restarts, out, nnodes=nodes,
                       rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    except WorkerFailure as e:
        if getattr(e, "rank", None) is None or e.rank >= _servers(cfg):
            raise
        from scalelab.checkpoint import list_checkpoints

        kept = list_checkpoints(out / "checkpoints")
        raise WorkerFailure(f"parameter server rank {e.rank} {e.how}: parallel.mode={cfg.parallel.mode} cannot go "
                            f"on without its parameters; last checkpoint: "
                            f"{kept[-1][1] if kept else 'none'}; continue with: scalelab train --out {out} "
                            f"--resume --nproc {nproc}") from None
    except KeyboardInterrupt:
        print(f"\nscalelab: interrupted; continue with: scalelab train --out {out} --resume --nproc {nproc}",
              file=sys.stderr)
        return 130
    if (out / "summary.json").exists():  # on other nodes the run directory may be rank 0's alone
        print_summary(json.loads((out / "summary.json").read_text()))
    print(f"run directory: {out}")
    return 0


def _servers(cfg) -> int:
    """Ranks that are parameter servers (0 outside the parameter-server modes)."""
    from scalelab.parallel.modes import PS_MODES

    return cfg.parallel.servers if cfg.parallel.mode in PS_MODES else 0


def _cmd_report(args) -> int:
    from scalelab.lab.report import report_run

    print(report_run(Path(args.run_dir)))
    return 0


def _cmd_config(args) -> int:
    import tomli_w

    from scalelab.config import describe, load_config

    if args.keys:
        print(describe())
    else:
        print(tomli_w.dumps(load_config(args.config, args.overrides).to_dict()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = args.run(args)
    except ScalelabError as e:
        e.report()
        code = e.exit_code
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a worker of a distributed job, done or failed, with everything written and reported
        from scalelab.parallel.runtime import exit_worker

        exit_worker(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
