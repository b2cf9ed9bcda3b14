"""The `fora-fx` command."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # libgomp reads this once, when torch loads it, which importing fora_fx already did:
        # start again with it set. Its default, spinning, lets two threads wait out each
        # other's time slices when another process shares the cores: on the 2-core machine
        # under load the tiny bench model's eager loop took 1.45 s instead of 0.035 s.
        # PASSIVE changes scheduling only, never results.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "fora_fx.cli", *sys.argv[1:]], env)
    parser = argparse.ArgumentParser(prog="fora-fx", description="FORA as a torch.compile pass")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time FORA against eager, torch.compile and peers")
    from .bench.setup import MODELS

    bench.add_argument("--model", default=None, choices=list(MODELS),
                       help="a diffusers config with random weights (default dit-xl-2)")
    bench.add_argument("--batch", type=int, default=1,
                       help="images per call; CFG doubles it (1: B=2, one image with CFG)")
    bench.add_argument("--steps", type=int, default=50)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--intervals", default="2,3,4,6", help="FORA intervals, comma-separated")
    bench.add_argument("--device", default=None, choices=["cuda", "cpu"])
    bench.add_argument("--json", default=None, metavar="PATH", help="also write rows as JSON")
    bench.add_argument("--no-ablation", action="store_true",
                       help="skip the fora_fx N=3 row without the batch pass / fusion limit")
    bench.add_argument("--no-forecast", action="store_true",
                       help="skip the fora_fx rows with forecast='taylor' (order 2)")
    bench.add_argument("--no-compiled-peers", action="store_true",
                       help="skip cache-dit under torch.compile")
    bench.add_argument("--no-peers", action="store_true",
                       help="skip every peer row (hook FORA, diffusers hooks, cache-dit): "
                            "eager, compiled and fora_fx only, for a run on a time budget")
    bench.add_argument("--profile", action="store_true",
                       help="kernel-level profile of one refresh and one reuse step (N=3)")
    bench.add_argument("--quick", action="store_true",
                       help="tiny model, 6 steps, 3 repeats, intervals 2,3: a CI smoke run")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument("--context-parallel", type=int, default=None, metavar="N",
                       help="shard a Wan model over N ranks (diffusers' Ulysses), under "
                       "torchrun --nproc-per-node N (docs/parallel.md)")
    ev = sub.add_parser("eval", help="FORA's sample quality on the digits DiT vs its peers")
    ev.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    ev.add_argument("--out", default="fora_eval", help="folder for quality.md and the PNGs")
    ev.add_argument("--samples", type=int, default=None,
                    help="samples per seed (>= 200/class; default 2000, --quick 200)")
    ev.add_argument("--seeds", default="0,1,2")
    ev.add_argument("--batch", type=int, default=None,
                    help="samples per model call (CFG doubles; default 100, --quick 50)")
    ev.add_argument("--methods", default=None,
                    help="comma-separated subset of fora,taylor1,taylor2,fora-cal,"
                         "taylor2-cal,taylorseer,pab,cache-dit,cache-dit+taylorseer (default: "
                         "all; the baseline always runs; *-cal: full steps calibrated, as many "
                         "as the interval rule makes)")
    ev.add_argument("--intervals", default="2,3,4,5,6,7",
                    help="intervals of fora_fx's rows (fora, taylor*, *-cal)")
    ev.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="no sampling: write quality.md and the plot from saved --json files "
                         "(several: rows merged, one baseline)")
    ev.add_argument("--no-compile", action="store_true", help="eager models (no Inductor)")
    ev.add_argument("--quick", action="store_true",
                    help="200 samples, 1 seed, N=3 and 6, 10 DDIM steps: a CI smoke run "
                         "(--samples / --batch still apply)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "eval":
        return _eval(args)

    from .bench import Setup, markdown, run, write_json

    intervals = tuple(int(v) for v in args.intervals.split(","))
    if any(n < 1 for n in intervals):
        parser.error(f"--intervals must be positive integers, got {args.intervals!r}")
    setup = Setup(model=args.model or ("tiny" if args.quick else "dit-xl-2"),
                  batch=args.batch, steps=6 if args.quick else args.steps,
                  # 3 rounds: the fewest that measure the timing noise (bench.timing)
                  repeats=3 if args.quick else args.repeats,
                  intervals=(2, 3) if args.quick else intervals)
    if args.device:
        setup.device = args.device
    setup.ablation = not args.no_ablation
    setup.forecast = not args.no_forecast
    setup.compiled_peers = not args.no_compiled_peers
    setup.peers = not args.no_peers
    setup.profile = args.profile

    if args.context_parallel is not None:
        from .bench.parallel import check_launch, run_cp

        if args.model is None:  # the default DiT has no context-parallel plan
            setup.model = "tiny-wan" if args.quick else "wan-1.3b"
        why = check_launch(args.context_parallel, setup.model)
        if why is not None:
            parser.error(why)
        table = run_cp(setup, args.context_parallel)
        if os.environ.get("RANK", "0") == "0":
            print(table)
        return 0

    def checkpoint(rows: list) -> None:
        if args.json:  # after every row: a run cut off by a time limit keeps what it measured
            write_json(rows, setup, args.json)

    rows = run(setup, log=_log, checkpoint=checkpoint, quiet=args.quiet)
    print(markdown(rows, setup))
    if args.json:
        write_json(rows, setup, args.json)
    return 0


def _log(line: str) -> None:
    """A log line on stderr that a progress bar there does not garble."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def _eval(args: argparse.Namespace) -> int:
    from .quality.evaluate import (
        METHODS,
        EvalSetup,
        evaluate,
        markdown,
        merge,
        render,
        write_outputs,
    )

    if args.render:
        report = merge(args.render)
        render(report, args.out)
        print(markdown(report))
        return 0

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    seeds = tuple(int(s) for s in args.seeds.split(","))
    intervals = tuple(int(n) for n in args.intervals.split(","))
    try:  # EvalSetup refuses unknown method names, listing the valid ones
        if args.quick:
            # batch 50: 4 timing rounds, enough to measure the noise (bench.timing)
            setup = EvalSetup(samples=args.samples or 200, seeds=(0,), intervals=(3, 6),
                              samplers=(("ddim", 10),), batch=args.batch or 50, eager_batches=3,
                              methods=methods, compile=not args.no_compile)
        else:
            setup = EvalSetup(samples=args.samples or 2000, seeds=seeds, intervals=intervals,
                              batch=args.batch or 100, methods=methods,
                              compile=not args.no_compile)
    except ValueError as e:
        raise SystemExit(f"--methods: {e}") from None
    if setup.samples % setup.batch and setup.samples > setup.batch:
        raise SystemExit(f"--samples must be a multiple of {setup.batch} (or smaller)")
    setup.batch = min(setup.batch, setup.samples)
    report = evaluate(setup, log=_log, quiet=args.quiet)
    write_outputs(report, args.json, args.out)
    print(markdown(report))
    print(f"wrote {args.out}/quality.md, quality_vs_speedup.png, samples.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
