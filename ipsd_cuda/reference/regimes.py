"""The regime study: where, in training-set size, does intra-class patch swap help, and at what cost?

Trains CE, CS-KD, IPS and what users run instead on class-balanced training
subsets (``--sizes`` images per class, one fixed subset draw, the smaller
inside the larger), tests on the full test set, with schedules long enough
for CE to fit its training set, over several seeds. At every size:

- ``ce``, ``cskd``, ``ips`` (package defaults) and ``ips-beta0.5`` (each
  pair's share of cells from Beta(0.5, 0.5), the best IPS setting of the
  0.2.0 study's ablations, chosen there on the test set);
- ``cutmix``: CutMix with a box for every pair (alpha 1, every batch), what
  timm and torchvision users run instead;
- ``swap-only`` (the swap, KD weight 0) against ``swap-across`` (the same
  swap pairing across classes, with soft targets): whether the intra-class
  constraint matters;
- ``ips-box``: IPS with one box of cells instead of scattered cells;
- ``ce-2x`` and ``cutmix-2x``: twice the epochs, as many images through the
  backward pass as IPS (which back-propagates anchors and partners).

With ``--ablations`` the 0.2.0 study's ablations of IPS run at
``--ablation-size`` too (``ips-p0``: distillation between clean intra-class
pairs, no swap; ``ips-t4``: the usual KD temperature; ``ips-beta1``,
``ips-beta2``); ``--full`` runs every cell at every size.

Every finished run is saved to ``OUT/runs/SIZE-CELL-seedS.json`` and skipped
when the command is run again, so an interrupted study resumes where it
stopped. One progress bar covers the whole grid. At the end (or alone, with
``--report``) the runs are summarised into ``OUT/summary.json``,
``OUT/table.md`` (mean ± std over seeds, with each cell's cost: images through
the backward pass and wall time per run), ``OUT/regimes.png`` (test top-1 and
ECE against images per class), ``OUT/cost.png`` (test top-1 against images
through the backward pass, per size) and ``OUT/curves.png`` (CE's and IPS's
per-epoch train top-1 and test NLL at every size).

    python -m ipsd_cuda.reference.regimes                   # the README's study, ~5 h on 2 cores
    python -m ipsd_cuda.reference.regimes --report          # summarise what has finished
"""

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import train
from .plots import pyplot


class Cell:
    """One row of the study: a label, its ipsd-train arguments, its epochs as a multiple of the size's."""

    def __init__(self, label: str, argv: List[str], epoch_factor: int = 1):
        self.label, self.argv, self.epoch_factor = label, argv, epoch_factor

    @property
    def cost(self) -> float:
        """Relative cost of the run, for the progress bar: CE one forward-backward per
        anchor, CS-KD one more forward, CutMix a box swap more, IPS-like cells two
        forward-backward passes; times the epoch factor."""
        per_epoch = {"ce": 1.0, "cskd": 1.4, "cutmix": 1.05}.get(self.argv[1], 2.0)
        return per_epoch * self.epoch_factor


CELLS: Dict[str, Cell] = {
    "ce": Cell("CE", ["--method", "ce"]),
    "cskd": Cell("CS-KD (T = 4)", ["--method", "cskd"]),
    "ips": Cell("IPS, defaults (p = 0.5, T = 1)", ["--method", "ips"]),
    "ips-beta0.5": Cell("IPS, Beta(0.5, 0.5) share", ["--method", "ips", "--alpha", "0.5"]),
    "cutmix": Cell("CutMix, a box per pair", ["--method", "cutmix"]),
    "swap-only": Cell("swap only (KD weight 0)", ["--method", "ips", "--kd-weight", "0"]),
    "swap-across": Cell("swap across classes, soft targets", ["--method", "swap-across"]),
    "ips-box": Cell("IPS, one box of cells", ["--method", "ips", "--region", "box"]),
    "ce-2x": Cell("CE, twice the epochs", ["--method", "ce"], 2),
    "cutmix-2x": Cell("CutMix, twice the epochs", ["--method", "cutmix"], 2),
    "ips-p0": Cell("IPS, p = 0 (no swap)", ["--method", "ips", "--p", "0"]),
    "ips-t4": Cell("IPS, T = 4", ["--method", "ips", "--temperature", "4"]),
    "ips-beta1": Cell("IPS, Beta(1, 1) share", ["--method", "ips", "--alpha", "1"]),
    "ips-beta2": Cell("IPS, Beta(2, 2) share", ["--method", "ips", "--alpha", "2"]),
}
# The cells run at every size; the rest are the ablations.
COMPARISON = ("ce", "cskd", "ips", "ips-beta0.5", "cutmix", "swap-only", "swap-across", "ips-box", "ce-2x",
              "cutmix-2x")
ABLATIONS = tuple(c for c in CELLS if c not in COMPARISON)
# Drawn as full lines in the plot; the rest dotted.
CORE = ("ce", "cskd", "ips", "cutmix")


def parse_epochs(specs: List[str]) -> Dict[int, int]:
    """``["50:150", "100:100"]`` as ``{50: 150, 100: 100}``."""
    out = {}
    for spec in specs:
        size, _, epochs = spec.partition(":")
        try:
            out[int(size)] = int(epochs)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--epochs takes SIZE:EPOCHS pairs, got {spec!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of the regime study."""
    p = argparse.ArgumentParser(prog="python -m ipsd_cuda.reference.regimes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help="as ipsd-train's --data")
    p.add_argument("--data-dir", default=None, help="as ipsd-train's --data-dir")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 500], help="training images per class")
    p.add_argument("--ablations", action="store_true", help="also the ablations of IPS, at --ablation-size")
    p.add_argument("--ablation-size", type=int, default=100, help="the size at which the ablations run")
    p.add_argument("--full", action="store_true", help="every cell at every size")
    p.add_argument("--epochs", nargs="+", default=["50:150", "100:90", "500:30"],
                   help="SIZE:EPOCHS for every size")
    p.add_argument("--evals", type=int, default=5, help="evaluations per run (train and test sets)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (the subset draw stays fixed)")
    p.add_argument("--train-args", default="--model resnet8 --batch-size 64 --pipeline resident --channels-last",
                   help="further ipsd-train arguments of every run")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process each")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (small models on a shared machine lose more to waiting for "
                        "each other's threads than they gain)")
    p.add_argument("--out", default="runs/regimes", help="output folder")
    p.add_argument("--report", action="store_true", help="only summarise the finished runs")
    return p


class Study:
    """The grid of one command line: which runs, in which order, and their files."""

    def __init__(self, args):
        self.args = args
        self.epochs = parse_epochs(args.epochs)
        missing = [s for s in args.sizes if s not in self.epochs]
        if missing:
            raise SystemExit(f"regimes: --epochs gives no epoch count for sizes {missing}")
        if args.ablations and args.ablation_size not in args.sizes:
            raise SystemExit(f"regimes: --ablation-size {args.ablation_size} is not one of --sizes {args.sizes}")
        self.folder = Path(args.out) / "runs"

    def path(self, size: int, cell: str, seed: int) -> Path:
        """Where the run's result is saved."""
        return self.folder / f"{size}-{cell}-seed{seed}.json"

    def planned(self) -> List[tuple]:
        """The runs, seed by seed (an interrupted study then has every cell once before it has any twice):
        the comparison at every size, then the ablations."""
        a = self.args
        if a.full:
            cells = [(s, c) for s in a.sizes for c in CELLS]
        else:
            cells = [(s, c) for s in a.sizes for c in COMPARISON]
            if a.ablations:
                cells += [(a.ablation_size, c) for c in ABLATIONS]
        return [(s, c, seed) for seed in a.seeds for s, c in cells]

    def finished(self, size: int, cell: str, seed: int) -> bool:
        """Whether the run's result is saved; a result saved by another command line is an error."""
        saved = load(self.path(size, cell, seed))
        if saved is None:
            return False
        if saved["argv"] != self.argv(size, cell, seed):
            raise SystemExit(f"regimes: {self.path(size, cell, seed)} was trained with other arguments "
                             f"({' '.join(saved['argv'])}); use another --out")
        return True

    def argv(self, size: int, cell: str, seed: int) -> List[str]:
        """The ipsd-train arguments of one run."""
        a, epochs = self.args, self.epochs[size] * CELLS[cell].epoch_factor
        argv = ["--data", a.data, "--per-class", str(size), "--epochs", str(epochs),
                "--eval-every", str(max(1, epochs // a.evals)), "--seeds", str(seed), "--quiet",
                "--no-swap-examples", "--out", str(Path(a.out)), *a.train_args.split(), *CELLS[cell].argv]
        if a.data_dir:
            argv += ["--data-dir", a.data_dir]
        return argv

    def work(self, size: int, cell: str, num_classes: int) -> float:
        """The run's progress units: its anchor images over all epochs, weighted by the method's cost."""
        return self.epochs[size] * size * num_classes * CELLS[cell].cost


def load(path: Path) -> Optional[dict]:
    """A saved run, or None if it has not finished."""
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


# Per worker process: the data of the last subset asked for, and the channel to the progress bar.
_worker: dict = {}


def _init_worker(threads: int, channel, parent: int) -> None:
    torch.set_num_threads(threads)
    _worker["channel"] = channel
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this worker once the study's process is gone (killed, say), instead of training on for nobody."""
    while os.getppid() == parent:
        time.sleep(5)
    os._exit(1)


def run_one(argv: List[str], path: str, work: float, size: int, cell: str, seed: int) -> str:
    """Train one cell of the grid and save its result to ``path``; returns ``path``."""
    args = train.parse_args(argv)
    key = (args.data, args.data_dir, args.per_class)
    if _worker.get("key") != key:
        _worker.update(key=key, data=train.load_data(args))
    data = _worker["data"]
    channel = _worker.get("channel")
    per_epoch = work / args.epochs

    def on_epoch(record):
        if channel is not None:
            channel.put(per_epoch)

    started = time.perf_counter()
    run = train.train_one(args, args.method, seed, train.initial_weights(args, data, seed), data,
                          train.Distributed(args.device), on_epoch, log=False)
    result = {"size": size, "cell": cell, "seed": seed, "argv": argv, "run": run,
              "wall_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "w") as f:
        json.dump(result, f)
    # Whole or absent: a run killed while writing is redone, not half-read.
    os.replace(partial, target)
    return path


def execute(study: Study, num_classes: int) -> None:
    """Run every unfinished run of the grid, ``--jobs`` at a time, under one progress bar."""
    a = study.args
    todo = [r for r in study.planned() if not study.finished(*r)]
    bar = train.progress(total=sum(study.work(s, c, num_classes) for s, c, _ in todo), unit="img",
                         unit_scale=True, desc="regimes", smoothing=0.05)
    done = 0

    def finished(run) -> None:
        nonlocal done
        done += 1
        bar.set_postfix_str(f"{done}/{len(todo)} runs, last {run[0]}/class {run[1]} seed {run[2]}", refresh=False)

    def task(run):
        s, c, seed = run
        return (study.argv(s, c, seed), str(study.path(s, c, seed)), study.work(s, c, num_classes), s, c, seed)

    if a.jobs == 1:
        torch.set_num_threads(a.threads)
        _worker["channel"] = queue.SimpleQueue()
        for run in todo:
            run_one(*task(run))
            while not _worker["channel"].empty():
                bar.update(_worker["channel"].get())
            finished(run)
    else:
        context = multiprocessing.get_context("spawn")
        channel = context.Queue()
        with cf.ProcessPoolExecutor(a.jobs, mp_context=context, initializer=_init_worker,
                                    initargs=(a.threads, channel, os.getpid())) as pool:
            futures = {pool.submit(run_one, *task(r)): r for r in todo}
            while futures:
                with contextlib.suppress(queue.Empty):
                    bar.update(channel.get(timeout=1.0))
                completed, _ = cf.wait(futures, timeout=0, return_when=cf.FIRST_COMPLETED)
                for future in completed:
                    run = futures.pop(future)
                    future.result()
                    finished(run)
            while not channel.empty():
                bar.update(channel.get())
    bar.close()


def stats(values: List[float]) -> dict:
    """Mean, standard deviation (None for one value) and the values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def _gap(train_records: List[dict], key: str) -> Optional[dict]:
    """Stats of a gap over the runs that had pairs of that kind (None if none had)."""
    values = [t[key] for t in train_records if t.get(key) is not None]
    return stats(values) if values else None


def summarise(study: Study) -> dict:
    """Per size and cell, over the finished seeds: the final test metrics, how well the training set was
    fitted, whether test NLL rose after its best evaluation, and the pair confidence gaps."""
    summary: Dict[str, dict] = {}
    for path in sorted(study.folder.glob("*.json")):
        r = load(path)
        summary.setdefault(str(r["size"]), {}).setdefault(r["cell"], []).append(r)
    out: Dict[str, dict] = {}
    for size, cells in summary.items():
        for cell, results in cells.items():
            runs = [r["run"] for r in results]
            evals = [[e for e in run["epochs"] if "test" in e] for run in runs]
            last = [run["epochs"][-1]["train"] for run in runs]

            out.setdefault(size, {})[cell] = {
                "label": CELLS[cell].label,
                "seeds": [r["seed"] for r in results],
                **{k: stats([run["final"][k] for run in runs]) for k in ("top1", "nll", "ece")},
                "train_top1": stats([e[-1]["train_eval"]["top1"] for e in evals]),
                "train_nll": stats([e[-1]["train_eval"]["nll"] for e in evals]),
                "best_test_nll": stats([min(x["test"]["nll"] for x in e) for e in evals]),
                "gap_swapped": _gap(last, "gap_swapped"),
                "gap_clean": _gap(last, "gap_clean"),
                "wall_s": stats([r["wall_s"] for r in results]),
                # Images whose gradient a run computed: its training cost, whatever the machine.
                "backward_images": stats([sum(e["backward_images"] for e in run["epochs"]) for run in runs]),
            }
    return {"sizes": sorted(out, key=int), "cells": out}


def _cell(entry: Optional[dict], digits: int) -> str:
    if entry is None:
        return "–"
    text = f"{entry['mean']:.{digits}f}"
    return text if entry["std"] is None else f"{text} ± {entry['std']:.{digits}f}"


def markdown(summary: dict) -> str:
    """The summary as a markdown table, one row per size and cell, with each cell's cost."""
    lines = [
        (
            "| images/class | method | test top-1 (%) | test NLL (best → final) | test ECE (%) | train top-1 (%) "
            "| gap, swapped / clean pairs | backward images (k) | wall per run (min) | seeds |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size in summary["sizes"]:
        for cell in CELLS:
            e = summary["cells"][size].get(cell)
            if e is None:
                continue
            nll = f"{e['best_test_nll']['mean']:.3f} → {_cell(e['nll'], 3)}"
            gaps = f"{_cell(e['gap_swapped'], 3)} / {_cell(e['gap_clean'], 3)}"
            gaps = "–" if gaps == "– / –" else gaps
            lines.append(f"| {size} | {e['label']} | {_cell(e['top1'], 2)} | {nll} | {_cell(e['ece'], 2)} "
                         f"| {_cell(e['train_top1'], 1)} | {gaps} | {e['backward_images']['mean'] / 1e3:.0f} "
                         f"| {e['wall_s']['mean'] / 60:.1f} | {len(e['seeds'])} |")
    return "\n".join(lines)


# The questions the comparison answers, as (cell, baseline, question): the
# difference cell - baseline, seed by seed (same seed, same subset).
PAIRED = (
    ("ips", "ce", "IPS - CE"),
    ("ips", "ce-2x", "IPS - CE at equal compute"),
    ("ips", "cutmix", "IPS - CutMix"),
    ("ips", "cutmix-2x", "IPS - CutMix at equal compute"),
    ("ips-beta0.5", "cutmix-2x", "IPS Beta(0.5) - CutMix at equal compute"),
    ("cutmix", "ce", "CutMix - CE"),
    ("swap-only", "swap-across", "swap within classes - across classes"),
    ("ips-box", "ips", "IPS, one box - scattered cells"),
)


def paired(study: Study) -> List[dict]:
    """Per size and question, the differences in test top-1 and ECE between two cells, seed by seed."""
    rows = []
    for size in study.args.sizes:
        for cell, baseline, question in PAIRED:
            seeds = [s for s in study.args.seeds
                     if load(study.path(size, cell, s)) is not None and load(study.path(size, baseline, s)) is not None]
            if not seeds:
                continue
            diffs = {}
            for key in ("top1", "ece"):
                diffs[key] = [load(study.path(size, cell, s))["run"]["final"][key]
                              - load(study.path(size, baseline, s))["run"]["final"][key] for s in seeds]
            rows.append({"size": size, "question": question, "seeds": seeds, **diffs})
    return rows


def paired_markdown(rows: List[dict]) -> str:
    """The paired differences as a markdown table: mean ± std and the seeds in which the cell was ahead."""
    lines = ["| images/class | difference | top-1 (points) | seeds ahead | ECE (points) | seeds lower |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ahead = sum(d > 0 for d in r["top1"])
        lower = sum(d < 0 for d in r["ece"])
        n = len(r["seeds"])
        lines.append(f"| {r['size']} | {r['question']} | {_cell(stats(r['top1']), 2)} | {ahead}/{n} "
                     f"| {_cell(stats(r['ece']), 2)} | {lower}/{n} |")
    return "\n".join(lines)


def _color(i: int):
    """Cell i's color: 20 distinct ones, more than there are cells (the default cycle has 10)."""
    return pyplot().get_cmap("tab20")(i % 20)


def _marker(cell: str) -> str:
    """The comparison's core cells, its other cells, and the ablations (one size each) apart."""
    return "o" if cell in CORE else ("^" if cell in ABLATIONS else "s")


def plot_regimes(summary: dict, path: Path) -> None:
    """Test top-1 and ECE against images per class, one line per cell, error bars ± std over seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for i, cell in enumerate(CELLS):
        points = [(int(s), summary["cells"][s][cell]) for s in summary["sizes"] if cell in summary["cells"][s]]
        if not points:
            continue
        xs = [s for s, _ in points]
        for ax, key in zip(axes, ("top1", "ece")):
            ys = [e[key]["mean"] for _, e in points]
            err = [e[key]["std"] or 0.0 for _, e in points]
            ax.errorbar(xs, ys, yerr=err, marker=_marker(cell), markersize=4, capsize=3,
                        label=CELLS[cell].label, linestyle="-" if cell in CORE else ":", color=_color(i))
    for ax, label in zip(axes, ("test top-1 (%)", "test ECE (%, 15 bins)")):
        ax.set_xscale("log")
        ax.set_xlabel("training images per class")
        ax.set_ylabel(label)
        ax.minorticks_off()
        ax.set_xticks([int(s) for s in summary["sizes"]], [str(s) for s in summary["sizes"]])
        ax.grid(alpha=0.3)
    # Below both panels: inside either it hides points.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(summary: dict, path: Path) -> None:
    """Test top-1 against the images a run back-propagated, one panel per size, one point per cell
    (± std over seeds): what each method's accuracy costs."""
    plt = pyplot()
    sizes = summary["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 4.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, cell in enumerate(CELLS):
            e = summary["cells"][size].get(cell)
            if e is None:
                continue
            ax.errorbar(e["backward_images"]["mean"] / 1e3, e["top1"]["mean"], yerr=e["top1"]["std"] or 0.0,
                        marker=_marker(cell), markersize=5, capsize=3, color=_color(i),
                        label=e["label"])
        ax.set_title(f"{size} images per class", fontsize=10)
        ax.set_xlabel("backward images per run (thousands)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fit(study: Study, path: Path) -> None:
    """CE's and IPS's (defaults) train top-1 and test NLL per evaluation at every size, seed 0 or the first
    finished: whether the schedule fits the training set and where test NLL turns up."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, size in enumerate(study.args.sizes):
        for cell, style in (("ce", "-"), ("ips", "--")):
            saved = (load(study.path(size, cell, s)) for s in study.args.seeds)
            run = next((r for r in saved if r is not None), None)
            if run is None:
                continue
            evals = [e for e in run["run"]["epochs"] if "test" in e]
            epochs = [e["epoch"] for e in evals]
            axes[0].plot(epochs, [e["train_eval"]["top1"] for e in evals], style, color=f"C{i}",
                         label=f"{size}/class, {cell}")
            axes[1].plot(epochs, [e["test"]["nll"] for e in evals], style, color=f"C{i}", label=f"{size}/class, {cell}")
    for ax, label in zip(axes, ("train top-1 (%, clean training set)", "test NLL")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(study: Study) -> str:
    """Write summary.json, table.md, regimes.png, cost.png and curves.png; return the table."""
    summary = summarise(study)
    out = Path(study.args.out)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary) + "\n\nPaired differences, seed by seed:\n\n" + paired_markdown(paired(study))
    (out / "table.md").write_text(text + "\n")
    if summary["sizes"]:
        plot_regimes(summary, out / "regimes.png")
        plot_cost(summary, out / "cost.png")
        plot_fit(study, out / "curves.png")
    return text


def main(argv=None) -> None:
    """Run (or resume) the study, then summarise it."""
    args = build_parser().parse_args(argv)
    study = Study(args)
    started = time.perf_counter()
    if not args.report:
        probe = train.parse_args(["--data", args.data] + (["--data-dir", args.data_dir] if args.data_dir else []))
        data = train.load_data(probe)
        print(f"regimes: {data.name}, sizes {args.sizes} per class, seeds {args.seeds}, {args.jobs} job(s); "
              f"results in {study.folder}", file=sys.stderr)
        execute(study, data.num_classes)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(report(study))
    print(f"wall time {train.duration(time.perf_counter() - started)}; wrote {Path(args.out) / 'table.md'}, "
          f"regimes.png, cost.png, curves.png, summary.json")


if __name__ == "__main__":
    main()
