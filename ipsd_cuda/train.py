"""Reference training loop: what intra-class patch swap does to accuracy and calibration.

Trains the same model from the same initial weights with plain cross-entropy
(``ce``), class-wise self-distillation (``cskd``, Yun et al. 2020: a same-class
partner's softened prediction, under no grad, teaches the anchor) and
intra-class patch swap self-distillation (``ips``, ours), and reports top-1,
NLL and ECE per epoch and at the end, as a table, ``metrics.json`` and a plot.

    python -m ipsd_cuda.train --data fashion-mnist --method compare --seeds 0 1 2
    torchrun --nproc_per_node=2 -m ipsd_cuda.train --data synthetic --method ips

Batches: ``ce`` draws ``--batch-size`` shuffled samples per step; ``cskd`` and
``ips`` draw ``--batch-size`` anchors plus one same-class partner each
(:class:`IntraClassPairSampler`), as in CS-KD. An epoch is one pass over the
anchors for every method.
"""

import argparse
import copy
import json
import math
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from . import _ops, datasets
from .data import PatchSwapCollate
from .loss import ips_loss
from .metrics import classification_metrics
from .models import MODELS, build_model
from .patch_swap import swap
from .sampler import IntraClassPairSampler

METHODS = ("ce", "cskd", "ips")


class ArrayDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` with labels; optional random crop and flip per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment
        self.pad = max(1, images.shape[-1] // 8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment:
            h, w = x.shape[-2:]
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = F.pad(x, (self.pad,) * 4)[:, dy : dy + h, dx : dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.labels[i]


def class_wise_kd(anchor_logits, partner_logits, temperature):
    """CS-KD's term: ``T^2 KL(softmax(z_partner / T) || softmax(z_anchor / T))``, batch mean."""
    log_student = F.log_softmax(anchor_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(partner_logits.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


class Distributed:
    """Rank, world size and device; a no-op when not launched by torchrun."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local}" if device_arg == "cuda" else device_arg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean of ``values`` over the ranks."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def loaders(args, method, data, dist_ctx, seed):
    """The training DataLoader of ``method``: plain shuffled batches, or anchor+partner batches."""
    train_set = ArrayDataset(data.x_train, data.y_train, augment=args.augment)
    common = dict(num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    if method == "ce":
        sampler = DistributedSampler(
            train_set, num_replicas=dist_ctx.world, rank=dist_ctx.rank, shuffle=True, seed=seed
        )
        return DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, **common), sampler
    sampler = IntraClassPairSampler(
        data.y_train, args.batch_size, drop_last=True, num_replicas=dist_ctx.world, rank=dist_ctx.rank, seed=seed
    )
    if method == "ips" and args.swap_on == "loader":
        common["collate_fn"] = PatchSwapCollate(
            args.patch_size, swap_ratio=args.swap_ratio, alpha=args.alpha, p=args.p, pairing="halves"
        )
    return DataLoader(train_set, batch_sampler=sampler, **common), sampler


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
    model.eval()
    logits = []
    for start in range(0, len(y), batch_size):
        with autocast():
            logits.append(model(normalize(x[start : start + batch_size].to(device))).float().cpu())
    model.train()
    return classification_metrics(torch.cat(logits), y)


def train_one(args, method, seed, initial_state, data, dist_ctx):
    """Train one method from ``initial_state``; returns its per-epoch and final metrics."""
    device = dist_ctx.device
    torch.manual_seed(seed * 1000 + dist_ctx.rank)
    model = build_model(args.model, data.image_shape[0], data.num_classes)
    model.load_state_dict(initial_state)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model) if dist_ctx.world > 1 else model
    if args.compile:
        net = torch.compile(net)
    loader, sampler = loaders(args, method, data, dist_ctx, seed)
    steps = args.epochs * len(loader)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    normalize = Normalize(data.x_train, device, args.channels_last)
    amp_dtype = torch.bfloat16 if args.amp else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_swap(x, y, spans):
        """Swap in place; append the call's seconds, or on CUDA its pair of
        events, read once per epoch so that timing adds no sync per step."""
        kwargs = dict(patch_size=args.patch_size, swap_ratio=args.swap_ratio, alpha=args.alpha,
                      p=args.p, pairing="halves")
        if device.type != "cuda":
            t0 = time.perf_counter()
            plan = swap(x, y, **kwargs)
            spans.append(time.perf_counter() - t0)
            return plan
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
        plan = swap(x, y, **kwargs)
        events[1].record()
        spans.append(events)
        return plan

    epochs = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        # Sums of: loss, ce, kd, pairs, first_teacher, batches.
        totals = torch.zeros(6, dtype=torch.float64, device=device)
        images_seen, swap_spans = 0, []
        start = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"{method} seed {seed} epoch {epoch + 1}/{args.epochs}",
            leave=False,
            disable=not dist_ctx.main or args.quiet,
            dynamic_ncols=True,
        )
        for batch in bar:
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            plan = batch[2] if len(batch) == 3 else None
            clean = None
            if method == "ips" and plan is None:
                show = epoch == 0 and images_seen == 0 and dist_ctx.main
                before = x.clone() if args.ce_on == "clean" or show else None
                plan = timed_swap(x, y, swap_spans)
                if show:
                    plot_swaps(before, x, seed, Path(args.out) / f"swaps-seed{seed}.png")
                if args.ce_on == "clean":
                    clean = before
            with autocast():
                if method == "ce":
                    loss = F.cross_entropy(net(normalize(x)), y)
                    parts = (loss.detach(), 0.0, 0.0, 0.0)
                elif method == "cskd":
                    half = len(y) // 2
                    anchor_logits = net(normalize(x[:half]))
                    with torch.no_grad():
                        partner_logits = net(normalize(x[half:]))
                    ce = F.cross_entropy(anchor_logits, y[:half])
                    kd = class_wise_kd(anchor_logits, partner_logits, args.cskd_temperature)
                    loss = ce + args.kd_weight * kd
                    parts = (ce.detach(), kd.detach(), float(half), 0.0)
                else:
                    if clean is None:
                        logits, clean_logits = net(normalize(x)), None
                    else:
                        # One forward over both, so batch norm sees them together.
                        clean_logits, logits = net(normalize(torch.cat([clean, x]))).chunk(2)
                    loss, p = ips_loss(
                        logits, y, plan.partner.to(device), temperature=args.temperature,
                        kd_weight=args.kd_weight, clean_logits=clean_logits, return_parts=True,
                    )
                    parts = (p.ce, p.kd, p.pairs, p.first_teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            totals += torch.stack(
                [torch.as_tensor(v, dtype=torch.float64, device=device) for v in (loss.detach(), *parts, 1.0)]
            )
            images_seen += len(y)
        synchronize()
        elapsed = time.perf_counter() - start
        swap_s = sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1000 for s in swap_spans)
        totals = dist_ctx.mean(totals).cpu()
        batches = max(float(totals[5]), 1.0)
        record = {
            "epoch": epoch + 1,
            "train": {
                "loss": float(totals[0]) / batches,
                "ce": float(totals[1]) / batches,
                "kd": float(totals[2]) / batches,
                "pairs_per_batch": float(totals[3]) / batches,
                "first_teacher": float(totals[4]) / batches if method == "ips" else None,
            },
            "steps": int(batches),
            "images_per_s": images_seen * dist_ctx.world / elapsed,
            "epoch_s": elapsed,
            "swap_s": swap_s if method == "ips" and args.swap_on == "device" else None,
            "lr": schedule.get_last_lr()[0],
        }
        last = epoch + 1 == args.epochs
        if dist_ctx.main and (last or (epoch + 1) % args.eval_every == 0):
            record["test"] = evaluate(model, data.x_test, data.y_test, normalize, 4 * args.batch_size, device, autocast)
        dist_ctx.barrier()
        epochs.append(record)
        if dist_ctx.main and "test" in record:
            t = record["test"]
            tqdm.write(
                f"{method} seed {seed} epoch {epoch + 1}: loss {record['train']['loss']:.4f} "
                f"top1 {t['top1']:.2f} nll {t['nll']:.4f} ece {t['ece']:.2f} "
                f"({record['images_per_s']:.0f} img/s)"
            )
    return {"method": method, "seed": seed, "epochs": epochs, "final": epochs[-1].get("test")}


def summarise(runs):
    """Mean and standard deviation over seeds of each method's final metrics."""
    summary = {}
    for method in METHODS:
        finals = [r for r in runs if r["method"] == method]
        if not finals:
            continue
        entry = {}
        for key in ("top1", "nll", "ece"):
            values = [r["final"][key] for r in finals]
            entry[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        entry["images_per_s"] = statistics.fmean(
            statistics.fmean(e["images_per_s"] for e in r["epochs"]) for r in finals
        )
        summary[method] = entry
    return summary


def table(summary, seeds):
    lines = [
        f"{'method':<6} {'top-1 (%)':>15} {'NLL':>17} {'ECE (%)':>15} {'img/s':>8}   ({len(seeds)} seed(s))",
    ]
    for method, s in summary.items():
        cells = [f"{s[k]['mean']:.{d}f} ± {s[k]['std']:.{d}f}" for k, d in (("top1", 2), ("nll", 4), ("ece", 2))]
        lines.append(f"{method:<6} {cells[0]:>15} {cells[1]:>17} {cells[2]:>15} {s['images_per_s']:>8.0f}")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on a file-only backend (training machines have no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_swaps(before, after, seed, path, pairs=6):
    """The first pairs of a batch before and after the swap (pairing="halves":
    sample i is paired with i + N/2), as a PNG grid."""
    plt = _pyplot()
    half = len(before) // 2
    rows = [before[:pairs], before[half : half + pairs], after[:pairs], after[half : half + pairs]]
    titles = ["anchor", "partner", "anchor, swapped", "partner, swapped"]
    fig, axes = plt.subplots(4, pairs, figsize=(1.4 * pairs, 6))
    for r, (images, title) in enumerate(zip(rows, titles)):
        for c in range(pairs):
            ax = axes[r, c]
            image = images[c].float().cpu()
            ax.imshow((image[0] if image.shape[0] == 1 else image.permute(1, 2, 0) / 255).numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=8)
    fig.suptitle(f"intra-class patch swap, seed {seed}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(runs, path):
    """Test top-1 and ECE per epoch, one line per method (mean over seeds, band = ± std)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        method_runs = [r for r in runs if r["method"] == method]
        if not method_runs:
            continue
        epochs = [e["epoch"] for e in method_runs[0]["epochs"] if "test" in e]
        for ax, key in zip(axes, ("top1", "ece")):
            series = torch.tensor([[e["test"][key] for e in r["epochs"] if "test" in e] for r in method_runs])
            mean = series.mean(0).numpy()
            std = series.std(0).numpy() if len(method_runs) > 1 else 0 * mean
            ax.plot(epochs, mean, marker="o", label=method)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    for ax, label in zip(axes, ("test top-1 (%)", "test ECE (%, 15 bins)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ipsd-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist | cifar10 | cifar100 | synthetic | PATH.npz")
    p.add_argument("--data-dir", default=None, help="where the data files are (default per dataset)")
    p.add_argument("--train-size", type=int, default=None, help="train on a random subset of this size")
    p.add_argument("--test-size", type=int, default=None, help="test on a random subset of this size")
    p.add_argument("--method", default="compare", choices=(*METHODS, "compare"))
    p.add_argument("--model", default="resnet8", choices=MODELS)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="samples (ce) or anchors (cskd, ips) per step")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop and flip")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--patch-size", type=int, nargs="+", default=[4], help="P or PH PW")
    p.add_argument("--swap-ratio", type=float, default=0.5)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--p", type=float, default=0.5, help="share of pairs that swap")
    p.add_argument("--temperature", type=float, default=1.0, help="ips: distillation temperature")
    p.add_argument("--cskd-temperature", type=float, default=4.0, help="cskd: its temperature (CS-KD uses 4)")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--ce-on", default="swapped", choices=("swapped", "clean"),
                   help="ips: cross-entropy on the swapped images, or on a clean copy (one more forward)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--swap-on", default="device", choices=("device", "loader"))
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    p.add_argument("--out", default=None, help="output folder (default runs/DATA-METHOD)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (per-epoch lines stay)")
    args = p.parse_args(argv)
    if len(args.patch_size) not in (1, 2):
        p.error("--patch-size takes P or PH PW")
    if args.ce_on == "clean" and args.swap_on == "loader":
        p.error("--ce-on clean needs the clean batch: use --swap-on device")
    args.patch_size = args.patch_size[0] if len(args.patch_size) == 1 else tuple(args.patch_size)
    if args.out is None:
        args.out = f"runs/{Path(args.data).stem}-{args.method}"
    return args


def main(argv=None):
    args = parse_args(argv)
    dist_ctx = Distributed(args.device)
    started = time.perf_counter()
    try:
        data = datasets.load(args.data, args.data_dir).subset(args.train_size, args.test_size)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"ipsd-train: {err}")
    methods = METHODS if args.method == "compare" else (args.method,)
    if dist_ctx.main:
        print(
            f"ipsd-train: {data.name} {len(data.y_train)} train / {len(data.y_test)} test images "
            f"{data.image_shape}, {data.num_classes} classes; {args.model} on {dist_ctx.device} "
            f"x{dist_ctx.world}; methods {', '.join(methods)}; seeds {args.seeds}; kernels {_ops.backends()}"
        )
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        initial = copy.deepcopy(build_model(args.model, data.image_shape[0], data.num_classes).state_dict())
        for method in methods:
            runs.append(train_one(args, method, seed, initial, data, dist_ctx))
    if dist_ctx.main:
        summary = summarise(runs)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = dict(vars(args))
        config.update(world_size=dist_ctx.world, device=str(dist_ctx.device), torch=torch.__version__,
                      kernels=_ops.backends())
        wall = time.perf_counter() - started
        with open(out / "metrics.json", "w") as f:
            json.dump({"config": config, "runs": runs, "summary": summary, "wall_s": wall}, f, indent=1)
        plot(runs, out / "curves.png")
        print(table(summary, args.seeds))
        print(f"wall time {wall / 60:.1f} min; wrote {out / 'metrics.json'} and {out / 'curves.png'}")
    dist_ctx.close()


if __name__ == "__main__":
    main()
