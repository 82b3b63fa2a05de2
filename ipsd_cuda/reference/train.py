"""Reference training loop: what intra-class patch swap does to accuracy and calibration.

Trains the same model from the same initial weights with plain cross-entropy
(``ce``), class-wise self-distillation (``cskd``, Yun et al. 2020: a same-class
partner's softened prediction, under no grad, teaches the anchor),
intra-class patch swap self-distillation (``ips``, ours), CutMix with a box
for every pair (``cutmix``) and IPS's swap across classes with soft targets
(``swap-across``), and reports top-1, NLL and ECE per evaluation and at the
end, as a table, ``metrics.json`` and a plot.

    python -m ipsd_cuda.reference.train --data fashion-mnist --method compare --seeds 0 1 2
    torchrun --nproc_per_node=2 -m ipsd_cuda.reference.train --data synthetic --method ips

Batches: ``ce`` and ``cutmix`` draw ``--batch-size`` shuffled samples per
step; ``cskd``, ``ips`` and ``swap-across`` draw ``--batch-size`` anchors plus
one same-class partner each (:class:`ipsd_cuda.IntraClassPairSampler`), as in
CS-KD. An epoch is one pass over the anchors for every method. Each method
prepares its batches and takes its step (:mod:`ipsd_cuda.reference.methods`);
the loop around them is shared. ``--pipeline resident`` keeps the whole
training set on the device and augments and swaps the batches there
(:mod:`ipsd_cuda.reference.batches`).
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

import ipsd_cuda

from . import batches, datasets, methods
from .methods import METHODS, LossSettings, SwapSettings
from .metrics import classification_metrics
from .models import MODELS, build_model
from .plots import plot_curves, plot_swaps

DATA_HELP = (
    "fashion-mnist (its four idx .gz files in --data-dir), cifar10 | cifar100 (torchvision's extracted "
    "copy in --data-dir), a PATH.npz with x_train, y_train, x_test, y_test, or synthetic: 512 train and "
    "256 test 16x16 grey images of 4 classes, each class a noisy copy of its own random template (a "
    "seconds-long smoke test)"
)


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr that redraws at most once a minute when stderr is
    not a terminal, so that a log file gets a line a minute, not one per step."""
    if not sys.stderr.isatty():
        # tqdm's monitor thread also redraws a bar idle for maxinterval.
        kwargs.setdefault("mininterval", 60.0)
        kwargs.setdefault("maxinterval", 60.0)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def duration(seconds: float) -> str:
    """``42 s`` up to two minutes, ``3.5 min`` beyond."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Distributed:
    """Rank, world size and device; a no-op when not launched by torchrun."""

    def __init__(self, device_arg: str):
        # Launched by torchrun (which sets TORCHELASTIC_RUN_ID), even as one
        # process: a process group and DDP, so that `torchrun
        # --nproc_per_node=1` runs the path a cluster takes. A WORLD_SIZE that
        # a cluster or container exports alone does not count.
        self.grouped = "TORCHELASTIC_RUN_ID" in os.environ
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local}" if device_arg == "cuda" else device_arg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # Fixed input shapes: let cuDNN pick its fastest convolutions once.
            torch.backends.cudnn.benchmark = True
        if self.grouped:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        """Whether this is the process that evaluates, prints and writes."""
        return self.rank == 0

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean of ``values`` over the ranks."""
        if self.grouped:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def barrier(self):
        """Wait for every rank."""
        if self.grouped:
            dist.barrier()

    def close(self):
        """Leave the process group."""
        if self.grouped:
            dist.destroy_process_group()


class Normalize:
    """uint8 batches to standardised float on the device, in the chosen memory format."""

    def __init__(self, x_train: torch.Tensor, device, channels_last: bool):
        x = x_train.float() / 255
        self.mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1).to(device)
        self.std = x.std(dim=(0, 2, 3)).view(1, -1, 1, 1).to(device)
        self.format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255 - self.mean) / self.std).contiguous(memory_format=self.format)


@torch.no_grad()
def evaluate(model, x, y, normalize, batch_size, device, autocast):
    """Top-1, NLL and ECE of ``model`` on uint8 images ``x`` (no augmentation)."""
    model.eval()
    logits = []
    for start in range(0, len(y), batch_size):
        with autocast():
            logits.append(model(normalize(x[start : start + batch_size].to(device))).float().cpu())
    model.train()
    return classification_metrics(torch.cat(logits), y)


# The sums a step may report, in a fixed order so that the ranks can average one vector.
SUMS = ("loss", "ce", "kd", "pairs", "first_teacher", "gap_swapped_sum", "swapped_pairs", "gap_clean_sum",
        "clean_pairs", "cross_class_pairs", "backward_images", "batches")

# Methods of --method compare, in the order they train.
COMPARED = ("ce", "cskd", "ips", "cutmix")


def epoch_train_stats(totals: torch.Tensor, reported) -> dict:
    """Per-batch means of the loss terms and per-pair means of the confidence gaps;
    None for what the method's step did not report (``reported``: the keys it did)."""
    s = dict(zip(SUMS, totals.tolist()))
    batches_ = max(s["batches"], 1.0)
    pairs = s["swapped_pairs"] + s["clean_pairs"]

    def ratio(num, den):
        return num / den if den > 0 else None

    def per_batch(key):
        return s[key] / batches_ if key in reported else None

    return {
        "loss": s["loss"] / batches_,
        "ce": s["ce"] / batches_,
        "kd": s["kd"] / batches_,
        "pairs_per_batch": s["pairs"] / batches_,
        "first_teacher": per_batch("first_teacher"),
        # pairing="any": the share of pairs whose members' classes differ.
        "cross_class": ratio(s["cross_class_pairs"], s["pairs"]) if "cross_class_pairs" in reported else None,
        # Mean |p_teacher - p_student| on the true class, over all pairs, and
        # over the pairs that did (swapped) and did not (clean) exchange cells.
        "gap": ratio(s["gap_swapped_sum"] + s["gap_clean_sum"], pairs),
        "gap_swapped": ratio(s["gap_swapped_sum"], s["swapped_pairs"]),
        "gap_clean": ratio(s["gap_clean_sum"], s["clean_pairs"]),
        "swapped_share": ratio(s["swapped_pairs"], pairs),
    }


def train_one(args, method: str, seed: int, initial_state: dict, data: datasets.ImageData, dist_ctx: Distributed,
              on_epoch: Optional[Callable[[dict], None]] = None, log: bool = True) -> dict:
    """Train one method from ``initial_state``; returns its per-epoch and final metrics.

    ``on_epoch`` is called with each epoch's record (on the main rank), e.g.
    to advance a progress bar; ``log`` prints a line per evaluation.
    """
    device = dist_ctx.device
    torch.manual_seed(seed * 1000 + dist_ctx.rank)
    model = build_model(args.model, data.image_shape[0], data.num_classes)
    model.load_state_dict(initial_state)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if dist_ctx.grouped else model
    if args.compile:
        net = torch.compile(net)
    swap_settings = SwapSettings(args.patch_size, args.swap_ratio, args.alpha, args.p, args.region)
    trainer = methods.build(method, LossSettings(args.temperature, args.cskd_temperature, args.kd_weight),
                            swap_settings, data.num_classes, args.ce_on, args.swap_on)
    index = batches.IndexBatches(data.y_train, args.batch_size, paired=trainer.paired, world=dist_ctx.world,
                                 rank=dist_ctx.rank, seed=seed)
    collate = trainer.collate() if args.pipeline == "loader" else None
    if args.pipeline == "resident":
        source = batches.ResidentBatches(data.x_train, data.y_train, index, device, args.augment,
                                         seed=seed * 1000 + dist_ctx.rank)
    else:
        source = batches.loader(data.x_train, data.y_train, index, args.augment, args.num_workers, collate)
    timed = trainer.swaps and collate is None
    steps = args.epochs * len(source)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    normalize = Normalize(data.x_train, device, args.channels_last)
    amp_dtype = torch.bfloat16 if args.amp else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    def timed_prepare(x, y, plan, spans):
        """The method's batch preparation (its swap), timed: appends the call's
        seconds, or on CUDA its pair of events, read once per epoch so that
        timing adds no sync per step."""
        if device.type != "cuda":
            t0 = time.perf_counter()
            batch = trainer.prepare(x, y, plan)
            spans.append(time.perf_counter() - t0)
            return batch
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
        batch = trainer.prepare(x, y, plan)
        events[1].record()
        spans.append(events)
        return batch

    show_swaps = dist_ctx.main and args.swap_examples
    eval_batch = 4 * args.batch_size
    reported = set()
    epochs = []
    for epoch in range(args.epochs):
        index.set_epoch(epoch)
        totals = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
        images_seen, swap_spans = 0, []
        start = time.perf_counter()
        bar = progress(source, desc=f"{method} seed {seed} epoch {epoch + 1}/{args.epochs}", leave=False,
                       disable=not dist_ctx.main or args.quiet or not sys.stderr.isatty())
        for loaded in bar:
            x, y = loaded[0].to(device, non_blocking=True), loaded[1].to(device, non_blocking=True)
            plan = loaded[2].to(device) if len(loaded) == 3 else None
            batch = timed_prepare(x, y, plan, swap_spans) if timed else trainer.prepare(x, y, plan)
            if show_swaps and batch.plan is not None:
                path = Path(args.out) / f"swaps-seed{seed}.png"
                show_swaps = not plot_swaps(batch.x, batch.plan, swap_settings.patch, f"{method}, seed {seed}", path)
            with autocast():
                loss, stats = trainer.step(net, batch.normalized(normalize))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            stats.update(loss=loss.detach(), batches=torch.ones((), device=device))
            reported.update(stats)
            totals += torch.stack([stats[k].to(totals) if k in stats else totals.new_zeros(()) for k in SUMS])
            images_seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        swap_s = sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1000 for s in swap_spans)
        totals = dist_ctx.mean(totals).cpu()
        record = {
            "epoch": epoch + 1,
            "train": epoch_train_stats(totals, reported),
            "steps": int(totals[SUMS.index("batches")]),
            # Images whose gradient was computed, over all ranks: the method's cost.
            "backward_images": int(totals[SUMS.index("backward_images")]) * dist_ctx.world,
            "images_per_s": images_seen * dist_ctx.world / elapsed,
            "epoch_s": elapsed,
            "swap_s": swap_s if timed else None,
            "lr": schedule.get_last_lr()[0],
        }
        last = epoch + 1 == args.epochs
        if dist_ctx.main and (last or (epoch + 1) % args.eval_every == 0):
            eval_start = time.perf_counter()
            record["train_eval"] = evaluate(model, data.x_train, data.y_train, normalize, eval_batch, device,
                                            autocast)
            record["test"] = evaluate(model, data.x_test, data.y_test, normalize, eval_batch, device, autocast)
            record["eval_s"] = time.perf_counter() - eval_start
        dist_ctx.barrier()
        epochs.append(record)
        if log and dist_ctx.main and "test" in record:
            t, tr = record["test"], record["train_eval"]
            tqdm.write(
                f"{method} seed {seed} epoch {epoch + 1}: loss {record['train']['loss']:.4f} "
                f"train top1 {tr['top1']:.2f} nll {tr['nll']:.4f} | test top1 {t['top1']:.2f} nll {t['nll']:.4f} "
                f"ece {t['ece']:.2f} ({record['images_per_s']:.0f} img/s, {record['epoch_s']:.1f} s/epoch)",
                file=sys.stdout,
            )
        if on_epoch is not None and dist_ctx.main:
            on_epoch(record)
    return {"method": method, "seed": seed, "epochs": epochs, "final": epochs[-1].get("test")}


def epoch_seconds(run: dict) -> float:
    """A run's seconds per training epoch: the mean after the first epoch, which
    also pays for warm-up (cuDNN autotuning, allocator growth); the first alone
    if there is only one."""
    times = [e["epoch_s"] for e in run["epochs"]]
    return statistics.fmean(times[1:] if len(times) > 1 else times)


def summarise(runs, methods=METHODS):
    """Mean and standard deviation over seeds of each method's final metrics."""
    summary = {}
    for method in methods:
        finals = [r for r in runs if r["method"] == method]
        if not finals:
            continue
        entry = {}
        for key in ("top1", "nll", "ece"):
            values = [r["final"][key] for r in finals]
            entry[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "values": values,
            }
        entry["images_per_s"] = statistics.fmean(
            statistics.fmean(e["images_per_s"] for e in r["epochs"]) for r in finals
        )
        entry["epoch_s"] = statistics.fmean(epoch_seconds(r) for r in finals)
        entry["backward_images"] = statistics.fmean(sum(e["backward_images"] for e in r["epochs"]) for r in finals)
        summary[method] = entry
    return summary


def mean_std(entry: dict, digits: int) -> str:
    """``mean ± std``, or the mean alone when there is one value."""
    text = f"{entry['mean']:.{digits}f}"
    return text if entry["std"] is None else f"{text} ± {entry['std']:.{digits}f}"


def table(summary, seeds):
    """The summary as a fixed-width text table."""
    lines = [
        (
            f"{'method':<11} {'top-1 (%)':>15} {'NLL':>17} {'ECE (%)':>15} {'img/s':>8} {'s/epoch':>8} "
            f"{'backward images':>15}"
            f"   ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
        ),
    ]
    for method, s in summary.items():
        cells = [mean_std(s[k], d) for k, d in (("top1", 2), ("nll", 4), ("ece", 2))]
        lines.append(f"{method:<11} {cells[0]:>15} {cells[1]:>17} {cells[2]:>15} {s['images_per_s']:>8.0f} "
                     f"{s['epoch_s']:>8.2f} {s['backward_images']:>15.0f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``ipsd-train``."""
    p = argparse.ArgumentParser(prog="ipsd-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help=DATA_HELP)
    p.add_argument("--data-dir", default=None,
                   help=f"where the data files are; when not given, {datasets.FASHION_MNIST_DIR} for "
                        "fashion-mnist and ~/.cache/cifar for CIFAR")
    p.add_argument("--train-size", type=int, default=None, help="train on a random subset of this size")
    p.add_argument("--per-class", type=int, default=None,
                   help="train on a class-balanced subset of this many images per class")
    p.add_argument("--subset-seed", type=int, default=0, help="the draw of --train-size / --per-class subsets")
    p.add_argument("--test-size", type=int, default=None, help="test on a random subset of this size")
    p.add_argument("--method", nargs="+", default=["compare"], choices=(*METHODS, "compare"),
                   help=f"one or more methods, trained in turn; compare: {', '.join(COMPARED)}")
    p.add_argument("--model", default="resnet8", choices=MODELS, help="network")
    p.add_argument("--epochs", type=int, default=10, help="passes over the anchors")
    p.add_argument("--batch-size", type=int, default=128,
                   help="samples (ce, cutmix) or anchors (cskd, ips, swap-across) per step")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, Nesterov, cosine)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop (zero padding of an eighth of the side) and horizontal flip")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and method")
    p.add_argument("--patch-size", type=int, nargs="+", default=[4], help="ips, swap-across: cell size, P or PH PW")
    p.add_argument("--swap-ratio", type=float, default=0.5,
                   help="ips, swap-across: share of the cells a pair exchanges")
    p.add_argument("--alpha", type=float, default=None,
                   help="ips, swap-across: draw each pair's share of cells from Beta(alpha, alpha) instead of "
                        "--swap-ratio")
    p.add_argument("--p", type=float, default=0.5, help="ips, swap-across: share of pairs that swap")
    p.add_argument("--region", default="cells", choices=("cells", "box"),
                   help="ips, swap-across: exchange cells drawn anywhere, or one box of cells")
    p.add_argument("--temperature", type=float, default=1.0, help="ips: distillation temperature")
    p.add_argument("--cskd-temperature", type=float, default=4.0, help="cskd: its temperature (CS-KD uses 4)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="cskd, ips: weight of the distillation term")
    p.add_argument("--ce-on", default="swapped", choices=("swapped", "clean"),
                   help="ips: cross-entropy on the swapped images, or on a clean copy (one more forward)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--pipeline", default="loader", choices=("loader", "resident"),
                   help="loader: a DataLoader builds host batches, augmented per sample; resident: the "
                        "training set lives on --device as uint8 and batches are gathered, augmented and "
                        "swapped there")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=int, default=0, help="loader: worker processes")
    p.add_argument("--swap-on", default="device", choices=("device", "loader"),
                   help="ips: swap the batch on the training device, or in the loader's workers (loader only)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    p.add_argument("--swap-examples", action=argparse.BooleanOptionalAction, default=True,
                   help="ips, swap-across: draw swapped pairs of the first batch to OUT/swaps-seedS.png")
    p.add_argument("--out", default=None, help="output folder (None: runs/DATA-METHOD)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (per-evaluation lines stay)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check ``ipsd-train``'s arguments."""
    p = build_parser()
    args = p.parse_args(argv)
    if len(args.patch_size) not in (1, 2):
        p.error("--patch-size takes P or PH PW")
    if args.ce_on == "clean" and args.swap_on == "loader":
        p.error("--ce-on clean needs the clean batch: use --swap-on device")
    if args.pipeline == "resident" and args.swap_on == "loader":
        p.error("--pipeline resident has no loader: use --swap-on device")
    if args.per_class is not None and args.train_size is not None:
        p.error("give --train-size or --per-class, not both")
    args.patch_size = args.patch_size[0] if len(args.patch_size) == 1 else tuple(args.patch_size)
    # One name stays a string (a run's method, as the regime study passes it); several, or
    # compare, become the methods to train in turn.
    names = [m for name in args.method for m in (COMPARED if name == "compare" else (name,))]
    if len(set(names)) != len(names):
        p.error(f"--method names a method twice: {' '.join(args.method)}")
    args.method = names[0] if args.method != ["compare"] and len(names) == 1 else "compare"
    args.methods = tuple(names)
    if args.out is None:
        args.out = f"runs/{Path(args.data).stem}-{args.method}"
    return args


def load_data(args) -> datasets.ImageData:
    """The data of ``args``, subset as asked; a missing or malformed source exits with its reason."""
    try:
        data = datasets.load(args.data, args.data_dir)
        if args.per_class is not None:
            data = data.balanced(args.per_class, args.subset_seed).subset(None, args.test_size, args.subset_seed)
        else:
            data = data.subset(args.train_size, args.test_size, args.subset_seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"ipsd-train: {err}") from err
    return data


def initial_weights(args, data: datasets.ImageData, seed: int) -> dict:
    """The initial state of every method's model for ``seed``."""
    torch.manual_seed(seed)
    return copy.deepcopy(build_model(args.model, data.image_shape[0], data.num_classes).state_dict())


def main(argv=None):
    """The ``ipsd-train`` console script."""
    args = parse_args(argv)
    dist_ctx = Distributed(args.device)
    started = time.perf_counter()
    data = load_data(args)
    names = args.methods
    if dist_ctx.main:
        print(
            f"ipsd-train: {data.name} {len(data.y_train)} train / {len(data.y_test)} test images "
            f"{data.image_shape}, {data.num_classes} classes; {args.model} on {dist_ctx.device} "
            f"x{dist_ctx.world}, {args.pipeline} pipeline; methods {', '.join(names)}; seeds {args.seeds}; "
            f"kernels {ipsd_cuda.backends()}"
        )
    runs = []
    for seed in args.seeds:
        initial = initial_weights(args, data, seed)
        for method in names:
            runs.append(train_one(args, method, seed, initial, data, dist_ctx))
    if dist_ctx.main:
        summary = summarise(runs)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = dict(vars(args))
        config.update(world_size=dist_ctx.world, device=str(dist_ctx.device), torch=torch.__version__,
                      process_group=dist.get_backend() if dist_ctx.grouped else None,
                      kernels=ipsd_cuda.backends())
        wall = time.perf_counter() - started
        with open(out / "metrics.json", "w") as f:
            json.dump({"config": config, "runs": runs, "summary": summary, "wall_s": wall}, f, indent=1)
        plot_curves(runs, names, out / "curves.png")
        print(table(summary, args.seeds))
        print(f"wall time {duration(wall)}; wrote {out / 'metrics.json'} and {out / 'curves.png'}")
    dist_ctx.close()


if __name__ == "__main__":
    main()
