"""What each run of one or more ``ipsd-train`` calls cost per training step, beside its accuracy.

    python -m ipsd_cuda.reference.cost runs/gpu-compare/metrics.json runs/gpu-compare/*/metrics.json

One Markdown row per run (method and seed), in the order given: the final
test top-1, NLL and ECE and train top-1; the time of a training step and of
the method's batch preparation in it (the swap or the CutMix: CUDA events on
a GPU, wall time on the CPU), both over the epochs after the first, which
also pays for warm-up (over the only epoch of a one-epoch run); the
preparation's share of the step; the images the
run back-propagated. A run whose settings differ from the defaults of
``ipsd-train`` in what its method reads is named with them (``ips, alpha
0.5``), so that calls with different settings can share one table.
"""

import argparse
import functools
import json
import statistics
from pathlib import Path
from typing import Dict, List

from .train import build_parser

# The settings each method reads, beyond those every method shares.
METHOD_SETTINGS = {
    "ips": ("patch_size", "swap_ratio", "alpha", "p", "region", "temperature", "kd_weight", "ce_on"),
    "swap-across": ("patch_size", "swap_ratio", "alpha", "p", "region"),
    "cskd": ("cskd_temperature", "kd_weight"),
}


@functools.lru_cache(maxsize=1)
def _defaults() -> Dict:
    """ipsd-train's defaults, parsed once."""
    return vars(build_parser().parse_args([]))


def run_label(method: str, config: Dict) -> str:
    """The method, with the settings it reads that differ from ipsd-train's defaults."""
    defaults = _defaults()
    changed = []
    for name in METHOD_SETTINGS.get(method, ()):
        value, default = config.get(name, defaults[name]), defaults[name]
        # patch_size is stored as one int when the patch is square.
        if name == "patch_size" and isinstance(value, int) and default == [value]:
            continue
        if value != default:
            changed.append(f"{name.replace('_', ' ')} {value}")
    return ", ".join([method, *changed])


def run_cost(run: Dict) -> Dict:
    """A run's accuracy at the end and its per-step times over the epochs after the first."""
    epochs = run["epochs"]
    steady = epochs[1:] or epochs
    steps = max(sum(e["steps"] for e in steady), 1)
    step_s = sum(e["epoch_s"] for e in steady) / steps
    swap = [e["swap_s"] for e in steady if e.get("swap_s") is not None]
    prepare_s = sum(swap) / steps if len(swap) == len(steady) else None
    final = epochs[-1]
    return dict(
        top1=final["test"]["top1"],
        nll=final["test"]["nll"],
        ece=final["test"]["ece"],
        train_top1=final["train_eval"]["top1"],
        step_ms=step_s * 1e3,
        prepare_ms=None if prepare_s is None else prepare_s * 1e3,
        prepare_share=None if prepare_s is None else prepare_s / step_s,
        backward_images=sum(e["backward_images"] for e in epochs),
        epochs=len(epochs),
        epoch_s=statistics.fmean(e["epoch_s"] for e in steady),
    )


def table(paths: List[Path]) -> str:
    """The Markdown table of every run in the metrics.json files at ``paths``."""
    lines = [
        "| run | epochs | test top-1 (%) | test NLL | test ECE (%) | train top-1 (%) | s / epoch | ms / step "
        "| preparation ms / step (share) | backward images (M) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in paths:
        metrics = json.loads(Path(path).read_text())
        for run in metrics["runs"]:
            c = run_cost(run)
            prepare = "–" if c["prepare_ms"] is None else f"{c['prepare_ms']:.2f} ({c['prepare_share']:.1%})"
            lines.append(
                f"| {run_label(run['method'], metrics['config'])}, seed {run['seed']} | {c['epochs']} "
                f"| {c['top1']:.2f} | {c['nll']:.3f} | {c['ece']:.2f} | {c['train_top1']:.2f} "
                f"| {c['epoch_s']:.1f} | {c['step_ms']:.1f} | {prepare} | {c['backward_images'] / 1e6:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    """Print the table of the metrics.json files named on the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of ipsd-train calls")
    print(table(p.parse_args(argv).metrics))


if __name__ == "__main__":
    main()
