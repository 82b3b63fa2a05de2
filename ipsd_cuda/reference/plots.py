"""The reference experiments' figures, drawn with matplotlib into PNG files."""

from pathlib import Path
from typing import Sequence, Tuple

import torch

import ipsd_cuda


def pyplot():
    """matplotlib's pyplot on a file-only backend (training machines have no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_swaps(swapped: torch.Tensor, plan: ipsd_cuda.SwapPlan, patch: Tuple[int, int], title: str, path: Path,
               pairs: int = 6) -> int:
    """The first pairs of a batch that exchanged cells, before and after, exchanged cells outlined.

    ``swapped`` is the batch after the swap; the batch before is recovered by
    applying the plan again, since exchanging the same cells twice restores
    both images. Pairs are shown by their lower member. Returns the number of
    pairs drawn (0: no pair swapped, nothing written).
    """
    after = swapped.detach().cpu()
    plan = plan.to("cpu")
    before = after.clone()
    ipsd_cuda.apply_plan(before, plan, patch_size=patch)
    index = torch.arange(len(after))
    leads = (plan.partner > index) & plan.mask.flatten(1).any(1)
    shown = leads.nonzero().squeeze(1)[:pairs].tolist()
    if not shown:
        return 0
    mates = [int(plan.partner[i]) for i in shown]
    plt = pyplot()
    from matplotlib.patches import Rectangle

    ph, pw = min(patch[0], after.shape[-2]), min(patch[1], after.shape[-1])
    rows = [(before, shown, "first"), (before, mates, "second"), (after, shown, "first, swapped"),
            (after, mates, "second, swapped")]
    fig, axes = plt.subplots(4, len(shown), figsize=(1.4 * len(shown) + 0.6, 6), squeeze=False)
    for r, (images, members, label) in enumerate(rows):
        for c, (i, member) in enumerate(zip(shown, members)):
            ax = axes[r, c]
            image = images[member].float()
            ax.imshow((image[0] if image.shape[0] == 1 else image.permute(1, 2, 0) / 255).numpy(), cmap="gray")
            for gy, gx in plan.mask[i].nonzero().tolist():
                ax.add_patch(Rectangle((gx * pw - 0.5, gy * ph - 0.5), pw, ph, fill=False, edgecolor="red",
                                       linewidth=0.6))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    paired = int((plan.partner >= 0).sum()) // 2
    fig.suptitle(f"{title}: {int(leads.sum())} of {paired} pairs swapped; exchanged cells outlined", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(shown)


def plot_curves(runs: Sequence[dict], methods: Sequence[str], path: Path) -> None:
    """Test top-1 and ECE per epoch, one line per method (mean over seeds, band = ± std)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
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
