"""Tables and a bar chart from the JSON that the benchmarks in ``bench/`` write.

    pytest bench -m cpu --benchmark-json=results.json
    python bench/report.py results.json [--png chart.png]

One Markdown table per group (one input, every implementation): the median
time; how many times faster than our fallback each row is (``apply`` rows
against ``apply:torch``, whole calls against ``swap:torch``) and than each
peer; and the effective bandwidth, the bytes that the swap must move divided
by the median, next to that of ``copy``, a plain copy of the same batch
timed in the same run. A swap must read and write every exchanged cell in both
members of its pair: ``4 * cells moved * itemsize`` bytes, counted from the
plan; a copy reads and writes the batch once: ``2 * N*C*H*W * itemsize``.
Peers are credited with the same bytes as the swap: it is the work asked of
them, not what they actually move. Then the targets of issue 4 that the run
covers, met or missed.
"""

import argparse
import json
import sys
from pathlib import Path

FALLBACK = {"apply": "apply:torch", "swap": "swap:torch", "peer": "swap:torch"}
MOVES_DATA = ("apply", "swap", "peer")  # kinds whose bandwidth means something
COLOURS = {"reference": "0.55", "plan": "#9ecae1", "apply": "#2171b5", "swap": "#08306b", "peer": "#fd8d3c"}

# Issue 4's targets: kernel vs fallback per (device, shape, dtype); on the GPU
# also the share of copy bandwidth and the latency of a whole small swap.
FALLBACK_TARGETS = {
    ("cpu", (256, 3, 32, 32), "uint8"): 4.0,
    ("cpu", (64, 3, 224, 224), "float32"): 4.0,
    ("cuda", (128, 3, 224, 224), "float32"): 8.0,
}
COPY_SHARE_TARGET = 0.75
# Other processes' load above which a median is not to be trusted: with one
# torch thread per core, each parallel op then waits for a scheduler slice.
DISTURBED_CORES = 0.5
DISTURBED = "(!)"
SMALL_SWAP_TARGET_S = 100e-6


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


def table(rows):
    """The Markdown table of one group, and a line splitting the kernel swap into plan + apply."""
    peers = [impl for impl, row in rows.items() if row["kind"] == "peer"]
    copy_bw = bandwidth(rows["copy"]) if "copy" in rows else None
    header = ["implementation", "median", "× fallback", *(f"× {p}" for p in peers), "GB/s", "of copy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for impl, row in rows.items():
        compares = row["kind"] in MOVES_DATA
        fallback = FALLBACK.get(row["kind"])
        bw = bandwidth(row)
        busy = row.get("other_cores_busy")
        cells = [
            impl,
            fmt_time(row["median"]) + (f" {DISTURBED}" if busy is not None and busy >= DISTURBED_CORES else ""),
            fmt_ratio(speedup(rows, impl, fallback)) if compares and impl != fallback else "",
            *(fmt_ratio(speedup(rows, impl, p)) if compares and impl != p else "" for p in peers),
            "" if bw is None else f"{bw / 1e9:.2f}",
            "" if bw is None or copy_bw is None else f"{bw / copy_bw:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if all(k in rows for k in ("swap:kernel", "plan", "apply:kernel")):
        whole = rows["swap:kernel"]["median"]
        plan, apply = rows["plan"]["median"] / whole, rows["apply:kernel"]["median"] / whole
        lines.append(
            f"\nswap:kernel = plan {plan:.0%} + apply {apply:.0%} + checks and noise {1 - plan - apply:.0%}"
        )
    return "\n".join(lines)


def target_checks(rows):
    """(check, measured, met) for each of issue 4's targets that this group covers."""
    info = next(iter(rows.values()))
    key = (info["device"], tuple(info["shape"]), info["dtype"])
    checks = []
    goal = FALLBACK_TARGETS.get(key)
    if goal is not None:
        for of, over in (("apply:kernel", "apply:torch"), ("swap:kernel", "swap:torch")):
            ratio = speedup(rows, of, over)
            if ratio is not None:
                checks.append((f"{of} ≥ {goal:g}× {over}", fmt_ratio(ratio), ratio >= goal))
    if key[0] == "cpu" and goal is not None:
        for peer in (impl for impl, row in rows.items() if row["kind"] == "peer"):
            ratio = speedup(rows, "swap:kernel", peer)
            if ratio is not None:
                checks.append((f"swap:kernel faster than {peer}", fmt_ratio(ratio), ratio > 1))
    if key[0] == "cuda" and goal is not None and "apply:kernel" in rows and "copy" in rows:
        share = bandwidth(rows["apply:kernel"]) / bandwidth(rows["copy"])
        target = f"apply:kernel ≥ {COPY_SHARE_TARGET:.0%} of copy bandwidth"
        checks.append((target, f"{share:.0%}", share >= COPY_SHARE_TARGET))
    if key[0] == "cuda" and key[1] == (256, 3, 32, 32) and "swap:kernel" in rows:
        median = rows["swap:kernel"]["median"]
        checks.append(
            (f"swap:kernel < {fmt_time(SMALL_SWAP_TARGET_S)}", fmt_time(median), median < SMALL_SWAP_TARGET_S)
        )
    return checks


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
    for name, rows in groups.items():
        info = next(iter(rows.values()))
        out.append(f"\n### {name}\n\n{info['pairs']} pairs, swap ratio {info['swap_ratio']}, "
                   f"{info['moved_bytes'] / 1e6:.2f} MB to move, copy of the batch {info['copy_bytes'] / 1e6:.2f} MB\n")
        out.append(table(rows))
    checks = [(name, *check) for name, rows in groups.items() for check in target_checks(rows)]
    if checks:
        out.append("\n### Targets (issue 4)\n")
        out.append("| group | target | measured | met |\n|---|---|---|---|")
        out.extend(f"| {g} | {c} | {m} | {'yes' if ok else 'NO'} |" for g, c, m, ok in checks)
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
    legend = [Patch(color=colour, label=kind) for kind, colour in COLOURS.items()]
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
