"""Tables and a bar chart from the JSON that the benchmarks in ``bench/`` write.

    pytest bench -m cpu --benchmark-json=results.json
    python bench/report.py results.json [--png chart.png]

One Markdown table per group (one input, every implementation): the median
time; how many copies of the batch it costs (median ÷ ``copy``'s); how many
times faster than our fallback each row is (``plan`` rows against
``plan:torch``, ``apply`` rows against ``apply:torch``, whole calls against
``swap:torch``) and than each peer; and the effective bandwidth, the bytes
that the swap must move divided by the median, next to that of ``copy``, a
plain copy of the same batch timed in the same run. A swap must read and write every exchanged cell in both
members of its pair: ``4 * cells moved * itemsize`` bytes, counted from the
plan; a copy reads and writes the batch once: ``2 * N*C*H*W * itemsize``.
Peers are credited with the same bytes as the swap: it is the work asked of
them, not what they actually move. Then the targets that the run covers,
met or missed.

The CutMix groups (``bench/test_bench_cutmix.py``, ``extra_info["bench"] ==
"cutmix"``) get one table instead, a row per input: how many times faster
``ipsd_cuda.CutMix`` (``cutmix:kernel``) is than our fallback and than each
peer, and its cost in copies of the batch; then their targets. The peers cut
one box for the batch, one per pair or one per sample, not quite our work,
so the ratios say what a user gains by switching; no bandwidth, as the
bytes each one moves differ.
"""

import argparse
import json
import sys
from pathlib import Path

FALLBACK = {"plan": "plan:torch", "apply": "apply:torch", "swap": "swap:torch", "peer": "swap:torch"}
MOVES_DATA = ("apply", "swap", "peer")  # kinds whose bandwidth means something
COLOURS = {
    "reference": "0.55",
    "plan": "#9ecae1",
    "apply": "#2171b5",
    "swap": "#08306b",
    "peer": "#fd8d3c",
    "cutmix": "#31a354",
}

# The targets, per (device, shape, dtype): how many times faster than the
# fallback the whole swap and the plan must be; whether the whole swap must
# beat the one-box CutMix peers; at most how many copies of the batch it may
# cost; and, on the GPU, the share of copy bandwidth that applying a plan
# must reach.
TARGETS = {
    ("cpu", (256, 3, 32, 32), "uint8"): dict(swap=10.0, plan=5.0, peers=("timm:batch", "torchvision"), copies=5.0),
    ("cpu", (256, 3, 32, 32), "float32"): dict(swap=10.0, plan=5.0, peers=("timm:batch", "torchvision"), copies=5.0),
    ("cpu", (64, 3, 224, 224), "uint8"): dict(swap=14.0),
    ("cpu", (64, 3, 224, 224), "float32"): dict(swap=14.0),
    ("cuda", (128, 3, 224, 224), "float32"): dict(apply_share=0.8),
}
# Other processes' load above which a median is not to be trusted: with one
# torch thread per core, each parallel op then waits for a scheduler slice.
DISTURBED_CORES = 0.5
DISTURBED = "(!)"

# The CutMix table's columns: what ``cutmix:kernel`` is compared with, and
# the words of the header (torchvision's one box for the whole batch is less
# work than a box per pair: the header says so).
CUTMIX = "cutmix:kernel"
CUTMIX_VERSUS = {
    "cutmix:torch": "our fallback",
    "torchvision": "torchvision (one box per batch)",
    "timm:pair": "timm pair",
    "timm:elem": "timm elem",
    "kornia": "kornia",
}
# The CutMix targets, per device, on every input: at least how many times
# faster than each peer ``cutmix:kernel`` must be. torchvision cuts one box
# for the whole batch, a lower bound; timm's pair mode is the same CutMix,
# a box per pair, in a Python loop.
CUTMIX_TARGETS = {"cpu": {"torchvision": 1.0, "timm:pair": 10.0}}


def load(path):
    """The run's machine info and its groups: {group: {impl: row}}, in run order."""
    data = json.loads(Path(path).read_text())
    groups = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        groups.setdefault(bench["group"], {})[info["impl"]] = dict(info, median=bench["stats"]["median"])
    return data.get("machine_info", {}), data.get("datetime", ""), groups


def fmt_time(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def bandwidth(row):
    """Bytes per second the row achieves, or None where no data must move."""
    if row["kind"] == "reference":
        return row["copy_bytes"] / row["median"]
    if row["kind"] in MOVES_DATA:
        return row["moved_bytes"] / row["median"]
    return None


def speedup(rows, of, over):
    """How many times faster ``of`` is than ``over`` (None when either is missing)."""
    if of in rows and over in rows:
        return rows[over]["median"] / rows[of]["median"]
    return None


def fmt_ratio(ratio):
    return "" if ratio is None else f"{ratio:.2f}×"


def copies(rows, impl):
    if "copy" in rows and impl in rows:
        return rows[impl]["median"] / rows["copy"]["median"]
    return None


def table(rows):
    """The Markdown table of one group, and a line splitting the kernel swap into plan + apply."""
    peers = [impl for impl, row in rows.items() if row["kind"] == "peer"]
    copy_bw = bandwidth(rows["copy"]) if "copy" in rows else None
    header = ["implementation", "median", "copies", "× fallback", *(f"× {p}" for p in peers), "GB/s", "of copy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for impl, row in rows.items():
        compares = row["kind"] in MOVES_DATA
        fallback = FALLBACK.get(row["kind"])
        bw = bandwidth(row)
        busy = row.get("other_cores_busy")
        n_copies = copies(rows, impl) if impl != "copy" else None
        cells = [
            impl,
            fmt_time(row["median"]) + (f" {DISTURBED}" if busy is not None and busy >= DISTURBED_CORES else ""),
            "" if n_copies is None else f"{n_copies:.1f}",
            fmt_ratio(speedup(rows, impl, fallback)) if fallback and impl != fallback else "",
            *(fmt_ratio(speedup(rows, impl, p)) if compares and impl != p else "" for p in peers),
            "" if bw is None else f"{bw / 1e9:.2f}",
            "" if bw is None or copy_bw is None else f"{bw / copy_bw:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if all(k in rows for k in ("swap:kernel", "plan:kernel", "apply:kernel")):
        whole = rows["swap:kernel"]["median"]
        plan, apply = rows["plan:kernel"]["median"] / whole, rows["apply:kernel"]["median"] / whole
        lines.append(
            f"\nswap:kernel ≈ plan {plan:.0%} + apply {apply:.0%} + the rest {1 - plan - apply:.0%} "
            "(checks, and on CUDA the plan and the exchange share one kernel)"
        )
    return "\n".join(lines)


def target_checks(rows):
    """(check, measured, met) for each target that this group covers."""
    info = next(iter(rows.values()))
    goals = TARGETS.get((info["device"], tuple(info["shape"]), info["dtype"]), {})
    checks = []
    for kind in ("swap", "plan"):
        ratio = speedup(rows, f"{kind}:kernel", f"{kind}:torch")
        if kind in goals and ratio is not None:
            checks.append((f"{kind}:kernel ≥ {goals[kind]:g}× {kind}:torch", fmt_ratio(ratio), ratio >= goals[kind]))
    for peer in goals.get("peers", ()):
        ratio = speedup(rows, "swap:kernel", peer)
        if ratio is not None:
            checks.append((f"swap:kernel ≥ 1× {peer}", fmt_ratio(ratio), ratio >= 1))
    n_copies = copies(rows, "swap:kernel")
    if "copies" in goals and n_copies is not None:
        checks.append((f"swap:kernel ≤ {goals['copies']:g} copies", f"{n_copies:.1f}", n_copies <= goals["copies"]))
    if "apply_share" in goals and "apply:kernel" in rows and "copy" in rows:
        share = bandwidth(rows["apply:kernel"]) / bandwidth(rows["copy"])
        target = f"apply:kernel ≥ {goals['apply_share']:.0%} of copy bandwidth"
        checks.append((target, f"{share:.0%}", share >= goals["apply_share"]))
    return checks


def is_cutmix(rows):
    """Whether a group comes from the CutMix benchmarks (older runs have no "bench": swaps)."""
    return next(iter(rows.values())).get("bench") == "cutmix"


def disturbed(row):
    busy = row.get("other_cores_busy")
    return busy is not None and busy >= DISTURBED_CORES


def input_name(info):
    return f"{info['device']} {'x'.join(map(str, info['shape']))} {info['dtype']} {info['layout']}"


def cutmix_table(groups):
    """One row per input: ``cutmix:kernel``'s speedups over our fallback and the peers, and its copies."""
    header = ["input", *(f"× {words}" for words in CUTMIX_VERSUS.values()), "copies"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rows in groups.values():
        ours = rows.get(CUTMIX)
        cells = [input_name(next(iter(rows.values())))]
        for other in (*CUTMIX_VERSUS, "copy"):
            ratio = copies(rows, CUTMIX) if other == "copy" else speedup(rows, CUTMIX, other)
            if ratio is None:
                cells.append("–")
                continue
            text = f"{ratio:.1f}" if other == "copy" else fmt_ratio(ratio)
            cells.append(text + (f" {DISTURBED}" if disturbed(ours) or disturbed(rows[other]) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cutmix_target_checks(rows):
    """(check, measured, met) for each CutMix target that this group covers."""
    info = next(iter(rows.values()))
    checks = []
    for peer, goal in CUTMIX_TARGETS.get(info["device"], {}).items():
        ratio = speedup(rows, CUTMIX, peer)
        if ratio is not None:
            checks.append((f"{CUTMIX} ≥ {goal:g}× {peer}", fmt_ratio(ratio), ratio >= goal))
    return checks


def cutmix_report(groups):
    out = [
        "\n### CutMix, a box per pair\n",
        f"How many times faster `ipsd_cuda.CutMix` ({CUTMIX}, soft targets included) is than our "
        "fallback (cutmix:torch) and than each peer, on the same input; – where one was skipped or "
        f"not run. copies: its median over that of copying the batch. {DISTURBED}: other processes "
        f"kept {DISTURBED_CORES} or more cores busy during one of the two benchmarks.\n",
        cutmix_table(groups),
    ]
    checks = [(name, *check) for name, rows in groups.items() for check in cutmix_target_checks(rows)]
    if checks:
        out.append("\n### CutMix targets\n")
        out.append("| group | target | measured | met |\n|---|---|---|---|")
        out.extend(f"| {g} | {c} | {m} | {'yes' if ok else 'NO'} |" for g, c, m, ok in checks)
    return "\n".join(out)


def fmt_load(load):
    return "?" if load is None else ", ".join(f"{v:.2f}" for v in load)


def header(machine, when):
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    parts = [
        f"run {when}",
        f"CPU {cpu}, torch {machine.get('torch', '?')} with {machine.get('torch_threads', '?')} threads",
        f"GPU {machine.get('cuda_device') or 'none'}, ipsd_cuda kernels {machine.get('ipsd_cuda_backends', '?')}",
        f"load average (1, 5, 15 min) before the run {fmt_load(machine.get('loadavg_start'))}, "
        f"after it {fmt_load(machine.get('loadavg_end'))}",
    ]
    if machine.get("other_cores_busy") is not None:
        parts.append(
            f"other processes kept {machine['other_cores_busy']} of the {machine.get('cores', '?')} "
            f"cores busy on average during the run; {DISTURBED} marks a benchmark during which they "
            f"kept {DISTURBED_CORES} or more busy"
        )
    return "\n".join(parts)


def report(machine, when, groups):
    out = [header(machine, when)]
    cutmix_groups = {name: rows for name, rows in groups.items() if is_cutmix(rows)}
    groups = {name: rows for name, rows in groups.items() if name not in cutmix_groups}
    for name, rows in groups.items():
        info = next(iter(rows.values()))
        out.append(f"\n### {name}\n\n{info['pairs']} pairs, swap ratio {info['swap_ratio']}, "
                   f"{info['moved_bytes'] / 1e6:.2f} MB to move, copy of the batch {info['copy_bytes'] / 1e6:.2f} MB\n")
        out.append(table(rows))
    checks = [(name, *check) for name, rows in groups.items() for check in target_checks(rows)]
    if checks:
        out.append("\n### Targets\n")
        out.append("| group | target | measured | met |\n|---|---|---|---|")
        out.extend(f"| {g} | {c} | {m} | {'yes' if ok else 'NO'} |" for g, c, m, ok in checks)
    if cutmix_groups:
        out.append(cutmix_report(cutmix_groups))
    return "\n".join(out)


def chart(groups, path):
    """One panel per group: median time of every implementation, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ncols = 2 if len(groups) > 1 else 1
    nrows = -(-len(groups) // ncols)
    legend_height = 0.4  # inches below the panels
    height = 3.2 * nrows + legend_height
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, height), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, groups.items()):
        impls = list(rows)[::-1]  # first row of the table on top
        ax.barh(impls, [rows[i]["median"] * 1e3 for i in impls], color=[COLOURS[rows[i]["kind"]] for i in impls])
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("median (ms), log scale", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    kinds = {row["kind"] for rows in groups.values() for row in rows.values()}
    legend = [Patch(color=colour, label=kind) for kind, colour in COLOURS.items() if kind in kinds]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="JSON written by pytest --benchmark-json")
    parser.add_argument("--png", help="also write a bar chart here")
    args = parser.parse_args(argv)
    if not Path(args.results).exists():
        sys.exit(f"{args.results} does not exist: pytest-benchmark writes no JSON when every benchmark was skipped")
    machine, when, groups = load(args.results)
    if not groups:
        sys.exit(f"{args.results} holds no benchmarks")
    print(report(machine, when, groups))
    if args.png:
        chart(groups, args.png)
        print(f"\nchart: {args.png}")


if __name__ == "__main__":
    main()
