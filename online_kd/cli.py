"""`online-kd validate | plan | run | plot | tune | compare`: the command line over topologies.

Heavy libraries (torch, Ray, MLflow, matplotlib) are imported inside the commands that use them,
so that usage mistakes and a missing file are answered at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import DivergenceError, TopologyError, suggest
from .rundir import RunDir

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _load(args, check: bool = True):
    from .topology import load_topology

    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "engine", None):
        overrides.append(f"engine.name={args.engine}")
    return load_topology(args.topology, overrides, check=check)


# ---------------------------------------------------------------------- commands
def cmd_validate(args) -> int:
    from .topology.plan import build_plan

    topo = _load(args)
    plan = build_plan(topo)
    print(f"ok: {topo.name}: {len(topo.config.peers)} peers, {len(topo.config.ensembles)} ensembles, "
          f"{len(topo.edges)} edges, {len(topo.stages)} stage(s), {topo.total_epochs} epochs; "
          f"{_human_bytes(sum(wire_bytes(topo, plan, st.name) for st in topo.stages))} exchanged between "
          f"ray workers per step over all stages")
    return 0


def cmd_plan(args) -> int:
    from .topology.plan import build_plan

    topo = _load(args)
    plan = build_plan(topo)
    if args.json:
        print(json.dumps({
            "name": topo.name,
            "edges": [{"from": e.source, "to": e.target, "loss": e.loss, "weight": e.weight, "origin": e.origin,
                       **e.params} for e in topo.edges],
            "stages": [{"name": s.name, "train": list(s.train), "epochs": s.epochs,
                        "taps": {p: sorted(t) for p, t in plan.stage_taps[i].items()},
                        "transfers": [{**t.__dict__, "route": route, "wire_bytes": size}
                                      for t, route, size in wire_routes(topo, plan, s.name)],
                        "bytes_per_step": wire_bytes(topo, plan, s.name)} for i, s in enumerate(topo.stages)],
            "placement": placement(topo),
        }, indent=2, default=list))
        return 0
    con = Console(highlight=False)
    con.print(f"[bold]{topo.name}[/]  batch {topo.config.data.batch_size}, engine {topo.config.engine.name}")
    t = Table(title="edges (patterns expanded)")
    for col in ("#", "from", "to", "loss", "weight", "params", "from YAML"):
        t.add_column(col)
    for e in topo.edges:
        sched = "" if e.schedule.name == "constant" else f" {e.schedule.name}"
        t.add_row(str(e.index), e.source, e.target, e.loss, f"{e.weight:g}{sched}",
                  ", ".join(f"{k}={v}" for k, v in e.params.items()), e.origin)
    con.print(t)
    t = Table(title="placement (ray engine: one worker per peer replica)")
    for col in ("worker", "peers", "replica", "strategy", "node labels"):
        t.add_column(col)
    for w in placement(topo):
        t.add_row(str(w["worker"]), ", ".join(w["peers"]), str(w["replica"]), w["strategy"],
                  ", ".join(f"{k}={v}" for k, v in w["node_labels"].items()) or "any node")
    con.print(t)
    for i, s in enumerate(topo.stages):
        t = Table(title=f"stage '{s.name}': trains {', '.join(s.train)} for {s.epochs} epochs")
        for col in ("peer", "taps produced", "shapes (per sample)"):
            t.add_column(col)
        for p, taps in plan.stage_taps[i].items():
            t.add_row(p, ", ".join(sorted(taps)), "; ".join(f"{k} {list(plan.shapes[p][k])}" for k in sorted(taps)))
        con.print(t)
        t = Table(title=f"exchange per step in '{s.name}' (ray engine, replica 0; each replica alike on its shard)")
        for col in ("from", "tap", "to", "worker → worker", "shape", "bytes/step"):
            t.add_column(col)
        routes = wire_routes(topo, plan, s.name)
        for tr, route, size in routes:
            t.add_row(tr.source, tr.tap, tr.target, route, str(list(tr.shape)), _human_bytes(size))
        total = sum(size for _, _, size in routes)
        t.add_row("", "", "", "", "[bold]total[/]", f"[bold]{_human_bytes(total)}[/]")
        con.print(t)
    return 0


def wire_routes(topo, plan, stage: str) -> list[tuple]:
    """(transfer, route, bytes that cross workers) per planned transfer of ``stage`` on the ray engine
    (replica 0), as the exchange routes them."""
    from .engine.exchange import placement as workers, stage_routes

    out = []
    for tr, src, dst, route in stage_routes(plan, workers(topo), stage):
        if route is not None:
            out.append((tr, f"{src} → {dst}", tr.bytes_per_step))
        else:
            out.append((tr, "same worker (no copy)" if src == dst else f"{src} → {dst} (already sent)", 0))
    return out


def wire_bytes(topo, plan, stage: str) -> int:
    """Bytes a step of ``stage`` sends between ray workers (replica 0)."""
    return sum(size for _, _, size in wire_routes(topo, plan, stage))


def placement(topo) -> list[dict]:
    """Workers of the ray engine: colocated groups share one, others get one per replica; each with its
    placement group strategy and the Ray node labels it must run on."""
    from .engine.exchange import label_selectors, placement as workers

    found = workers(topo)
    selectors = label_selectors(topo) or [{} for _ in found]
    strategy = topo.config.engine.placement.upper()
    return [{"worker": w.rank, "peers": list(w.peers), "replica": w.replica, "strategy": strategy,
             "node_labels": sel} for w, sel in zip(found, selectors)]


def _default_out(topo, resume: bool) -> Path:
    base = Path("runs")
    if resume:
        found = sorted((p for p in base.glob(f"{topo.name}-*") if RunDir(p).has_checkpoint()),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise TopologyError("--resume", f"no earlier run of '{topo.name}' under {base.resolve()} (name one with --out)")
        return found[-1]
    return base / f"{topo.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _overrides_tag(args, **more) -> dict[str, str]:
    """The --set overrides (and ``more``) as the run's online_kd.overrides tag, for `compare`."""
    from .topology.load import parse_override
    from .tracking import TAG_OVERRIDES

    overrides = dict(parse_override(s) for s in getattr(args, "set", None) or [])
    if getattr(args, "engine", None):
        overrides["engine.name"] = args.engine
    overrides.update(more)
    return {TAG_OVERRIDES: json.dumps(overrides, sort_keys=True, default=str)} if overrides else {}


VERBOSE_HELP = ("also show Ray's and Ray Train's own output (start-up, worker groups, every process's log "
                "lines); by default only warnings and errors, and online-kd's lines")


def cmd_run(args) -> int:
    if args.seeds is not None:
        return run_seeds(args)
    topo = _load(args)
    from .engine import get_engine
    from .engine.options import RunOptions

    out = Path(args.out) if args.out else _default_out(topo, args.resume)
    if not args.resume and RunDir(out).has_checkpoint():
        raise TopologyError("--out", f"{out} already holds a run: continue it with --resume, or choose another --out")
    opts = RunOptions(out_dir=out, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                      tracking_uri=args.tracking_uri, tracking=not args.no_tracking, quiet=args.quiet,
                      record_steps=args.record_steps, extra_tags=_overrides_tag(args), verbose=args.verbose)
    summary = get_engine(topo.config.engine.name)(topo, opts).run()
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def run_seeds(args) -> int:
    """`run --seeds 0,1,2`: one run per seed in <out>/seed-<s>, grouped under one MLflow run; mean ± std."""
    from .compare import aggregate_seeds
    from .engine import get_engine
    from .engine.options import RunOptions
    from .topology.load import parse_override
    from .tracking import RunTracker, default_tracking_uri
    from .tune import SEED_PATH, parse_seeds

    seeds = parse_seeds(args.seeds)
    if any(parse_override(s)[0] == SEED_PATH for s in args.set):
        raise TopologyError("--seeds", f"also given --set {SEED_PATH}=…; drop one of the two")
    if args.resume and not args.out:
        raise TopologyError("--resume", "with --seeds, name the run directory with --out")
    topo = _load(args)
    c = topo.config
    out = Path(args.out) if args.out else _default_out(topo, False)
    state_file = out / "seeds.json"
    if not args.resume and state_file.is_file():
        raise TopologyError("--out", f"{out} already holds a seed group: continue it with --resume, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    group = None
    if not args.no_tracking and c.tracking.enabled:
        saved = json.loads(state_file.read_text()).get("tracker") if args.resume and state_file.is_file() else None
        if saved:
            group = RunTracker.resume(saved)
        else:
            uri = args.tracking_uri or c.tracking.uri or default_tracking_uri()
            group = RunTracker.open_group(
                uri, c.tracking.experiment or c.name, f"{c.name} seeds {','.join(map(str, seeds))}", kind="seeds",
                params={"topology": c.name, "seeds": ",".join(map(str, seeds)),
                        **{k: v for k, v in map(parse_override, args.set)}},
                tags={"online_kd.topology": c.name, "online_kd.out": str(out.resolve())})
    state_file.write_text(json.dumps({"seeds": seeds, "tracker": group.state() if group else None}))
    summaries: dict[int, dict] = {}
    try:
        for seed in seeds:
            seed_out = out / f"seed-{seed}"
            done = RunDir(seed_out).read_summary()
            if args.resume and done and done.get("finished"):
                summaries[seed] = done
                continue
            resume = args.resume and RunDir(seed_out).has_checkpoint()
            if not resume and RunDir(seed_out).has_checkpoint():
                raise TopologyError("--out", f"{seed_out} already holds a run: continue it with --resume")
            extra = [f"{SEED_PATH}={seed}"] + ([] if c.tracking.run_name else [f"tracking.run_name={c.name}-seed{seed}"])
            seed_topo = _load(argparse.Namespace(topology=args.topology, set=[*args.set, *extra], engine=args.engine))
            opts = RunOptions(out_dir=seed_out, resume=resume, stop_after_epochs=args.stop_after_epochs,
                              tracking_uri=group.uri if group else args.tracking_uri, tracking=group is not None,
                              quiet=args.quiet, verbose=args.verbose, parent_run_id=group.parent_run_id if group else None,
                              extra_tags={"online_kd.seed": str(seed), **_overrides_tag(args, **{SEED_PATH: seed})})
            summaries[seed] = get_engine(seed_topo.config.engine.name)(seed_topo, opts).run()
    except BaseException as err:
        if group is not None and not isinstance(err, KeyboardInterrupt):
            group.finish("FAILED")
        raise
    finished = all(s.get("finished") for s in summaries.values())
    agg = {"name": c.name, "out": str(out), "seeds": seeds, "finished": finished, **aggregate_seeds(summaries),
           "runs": {str(s): summaries[s] for s in seeds}}
    (out / "summary.json").write_text(json.dumps(agg, indent=2))
    _print_seeds(agg)
    if group is not None and finished:
        group.log_summary({RunTracker.PARENT: {f"{n}.{k}_{stat}": e[k][stat] for sec in ("peers", "ensembles")
                                               for n, e in agg[sec].items() for k in ("top1_last", "top1_best")
                                               for stat in ("mean", "std")}})
        group.log_artifact(out / "summary.json")
        group.finish("FINISHED")
    if args.json:
        print(json.dumps(agg, indent=2))
    return 0


def _console(stderr: bool = False) -> Console:
    """A console for tables: the terminal's width, or an unbounded one (no wrapping, no truncated cells) and
    no colour codes when the output goes to a file or pipe."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, highlight=False, force_terminal=tty, no_color=not tty, width=None if tty else 1000)


def _print_seeds(agg: dict) -> None:
    con = _console(stderr=True)
    t = Table(title=f"{agg['name']}: {len(agg['seeds'])} seeds ({', '.join(map(str, agg['seeds']))}), mean ± std"
                    + ("" if agg["finished"] else " — not finished"))
    for col in ("node", "model", "role", "last top-1", "best top-1", "per seed (last / best)"):
        t.add_column(col, justify="right" if "top-1" in col else "left")
    for sec in ("peers", "ensembles"):
        for n, e in agg[sec].items():
            per = ", ".join(f"{e['top1_last']['values'][s]:.1f}/{e['top1_best']['values'][s]:.1f}"
                            for s in e["top1_last"]["values"])
            t.add_row(n, e.get("model", ""), e.get("role", ""),
                      f"{e['top1_last']['mean']:.2f} ± {e['top1_last']['std']:.2f}",
                      f"{e['top1_best']['mean']:.2f} ± {e['top1_best']['std']:.2f}", per)
    con.print(t)


def cmd_tune(args) -> int:
    from .tune import parse_seeds, print_sweep, run_sweep

    sets = list(args.set) + ([f"engine.name={args.engine}"] if args.engine else [])
    summary = run_sweep(args.topology, args.space, sets, seeds=parse_seeds(args.seeds), out=args.out,
                        tracking=not args.no_tracking, tracking_uri=args.tracking_uri, num_cpus=args.num_cpus,
                        num_samples=args.num_samples, quiet=args.quiet, verbose=args.verbose)
    print_sweep(summary, _console(stderr=True))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_compare(args) -> int:
    from .compare import collect, plot, print_table, render
    from .tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    rows = collect(uri, args.experiment, args.runs)
    if not rows:
        raise TopologyError(args.experiment, "no topology runs with peers to compare")
    out = Path(args.out or ".")
    picture = plot(rows, out / "compare.png", title=args.experiment)
    if args.format == "table":
        print_table(rows, f"{args.experiment}: {len({r.run_id for r in rows})} runs", _console())
        print(f"wrote {picture}")
    else:  # stdout is the document (to pipe or redirect); the files are named on stderr
        text = render(rows, args.format)
        ext = {"markdown": "md"}.get(args.format, args.format)
        (out / f"compare.{ext}").write_text(text)
        sys.stdout.write(text)
        print(f"wrote {out / f'compare.{ext}'} and {picture}", file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    from .plot import draw_topology, plot_curves
    from .rundir import RunDir, accuracy_series

    target = Path(args.topology)
    if target.is_dir():
        run = RunDir(target)
        if not run.metrics.is_file():
            raise TopologyError(str(target), "not a run directory (no metrics.jsonl)")
        path = plot_curves(accuracy_series(run.history()), args.output or run.curves_picture, title=target.name)
    else:
        topo = _load(args, check=True)
        nodes, edges = topo.graph_spec()
        path = draw_topology(nodes, edges, args.output or f"{topo.name}.png", title=topo.name)
    print(path)
    return 0


# ---------------------------------------------------------------------- parser
EPOCHS_NOTE = ("train.epochs is per stage: every stage that does not set its own `epochs` trains that many, so "
               "--set train.epochs=3 on a two-stage topology runs 6 epochs. Epochs are numbered from 1 over all "
               "stages, alike on the console, in metrics.jsonl, summary.json, MLflow steps and checkpoint folders.")


def package_version() -> str:
    """The installed distribution's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("online_kd")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="online-kd", description="Knowledge distillation as a graph.")
    ap.add_argument("--version", action="version", version=f"online-kd {package_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, engine=False):
        p.add_argument("topology", help="topology YAML")
        p.add_argument("--set", action="append", metavar="PATH=VALUE", default=[],
                       help="override any field, e.g. --set train.epochs=3 --set edges[0].temperature=2")
        if engine:
            p.add_argument("--engine", help="override engine.name (a registered engine: local, ray)")

    p = sub.add_parser("validate", help="check a topology without training (schema, names, taps, shapes)")
    common(p, engine=True)
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("plan", help="expanded edges, placement, taps exchanged and bytes per step")
    common(p, engine=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("run", help="train a topology", description=f"Train a topology. {EPOCHS_NOTE}")
    common(p, engine=True)
    p.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (default: the latest of this topology)")
    p.add_argument("--json", action="store_true", help="print a JSON summary per peer at the end")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--stop-after-epochs", type=int, metavar="N", help="stop after N epochs (checkpoint kept; --resume continues)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("--record-steps", action="store_true",
                   help="write each step's loss per peer to <out>/steps/*.jsonl as it happens (engine comparisons)")
    p.add_argument("--seeds", metavar="S,S,…", help="repeat with these seeds (train.seed) into <out>/seed-<s>; "
                                                   "reports mean ± std of last- and best-epoch top-1")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("plot", help="draw a topology's graph, or a run directory's accuracy curves, as PNG")
    p.add_argument("topology", help="topology YAML or run directory")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("-o", "--output", help="PNG path")
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser("tune", help="Ray Tune search over topology paths (a space file); each trial a full run")
    common(p, engine=True)
    p.add_argument("--space", required=True, help="space file (see configs/tune/)")
    p.add_argument("--seeds", metavar="S,S,…", help="run every configuration with each of these seeds; mean ± std")
    p.add_argument("--out", help="sweep directory (default runs/<name>-tune-<time>)")
    p.add_argument("--num-samples", type=int, metavar="N", help="override the space's num_samples")
    p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--json", action="store_true", help="print the sweep summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no Tune progress output")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("compare", help="table and curves of the peers of an MLflow experiment's runs")
    p.add_argument("experiment", help="MLflow experiment (a topology's tracking.experiment, e.g. quick)")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="run ids or names (a sweep or seed group: its runs)")
    p.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table")
    p.add_argument("--out", help="directory for compare.png (and compare.csv|json|md); default: here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    p.set_defaults(fn=cmd_compare)
    return ap


def _unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """'unknown command …(did you mean …?)' when the first word is not a command, else None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if word is None or word in commands or argv.index(word) != 0:
        return None
    return suggest(word, commands, "command")


def _missing_file(args) -> TopologyError | None:
    """The topology file (or run directory) a command names but that does not exist: checked before any import."""
    path = getattr(args, "topology", None)
    if path is not None and not Path(path).exists():
        return TopologyError(str(path), "no such topology file" if args.command != "plot" else
                             "no such topology file or run directory")
    return None


def main(argv: list[str] | None = None) -> int:
    """The CLI. From the command line (``argv`` None) the process ends here, without the interpreter's
    teardown; called with ``argv`` (tests, scripts) it returns the exit status."""
    if argv is not None:
        return _main(list(argv))
    try:
        code = _main(sys.argv[1:])
    except SystemExit as done:  # --help, --version, argparse's usage errors
        code = done.code
    _exit_now(code)


def _exit_now(code) -> None:
    """Exit after the atexit handlers (MLflow, Ray, logging) and flushing, skipping the interpreter's
    teardown of torch, Ray and MLflow modules: seconds of silence after the summary on a loaded machine."""
    import atexit

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    wrong = _unknown_command(parser, argv)
    if wrong:
        print(f"error: {wrong}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        missing = _missing_file(args)
        if missing:
            raise missing
        return args.fn(args)
    except TopologyError as err:  # DataError too (a TopologyError)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
