"""How many epochs of an ipsd-train comparison fit a time budget, from a short timing run.

Reads the timing run's metrics.json (e.g. ``EPOCHS=2 make gpu-compare``) and
prints, per method, the seconds of a steady-state training epoch (the mean
after the first, which also pays for warm-up) and of one evaluation (train
and test sets), then the largest epoch count E with

    build + startup + sum over methods (E * epoch_s + evals * eval_s) <= budget

where ``startup`` is what the timing run spent outside epochs and
evaluations (loading data, building models) and ``evals`` the evaluations a
run of E epochs makes with ``--eval-every E // 5`` (at most 6).

    python3 scripts/epochs_for_budget.py runs/gpu-compare/metrics.json --build-s 75 --budget-s 480
"""

import argparse
import json
import statistics


def main(argv=None):
    """Print the per-method timings and the epoch count that fits the budget."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="metrics.json of the timing run")
    p.add_argument("--build-s", type=float, default=0.0, help="seconds the call spent building the extension")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds available for the whole call")
    p.add_argument("--evals", type=int, default=6, help="evaluations per method in the full run")
    args = p.parse_args(argv)
    with open(args.metrics) as f:
        metrics = json.load(f)
    per_epoch = per_eval = inside = 0.0
    for run in metrics["runs"]:
        times = [e["epoch_s"] for e in run["epochs"]]
        evals = [e["eval_s"] for e in run["epochs"] if "eval_s" in e]
        epoch_s = statistics.fmean(times[1:] if len(times) > 1 else times)
        eval_s = statistics.fmean(evals) if evals else 0.0
        inside += sum(times) + sum(evals)
        per_epoch += epoch_s
        per_eval += eval_s
        print(f"{run['method']:<5} {epoch_s:7.2f} s/epoch  {eval_s:6.2f} s/evaluation  ({len(times)} epochs timed)")
    startup = max(metrics["wall_s"] - inside, 0.0)
    fixed = args.build_s + startup + args.evals * per_eval
    epochs = int((args.budget_s - fixed) // per_epoch) if per_epoch > 0 else 0
    print(f"fixed: build {args.build_s:.0f} s + startup {startup:.0f} s + {args.evals} evaluations "
          f"{args.evals * per_eval:.0f} s; all methods {per_epoch:.1f} s/epoch")
    print(f"epochs that fit {args.budget_s:.0f} s: {max(epochs, 0)}")


if __name__ == "__main__":
    main()
