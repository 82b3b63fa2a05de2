"""The reference experiments (training loop, data, metrics, batch pipelines, regime study) on small synthetic data."""

import ast
import gzip
import json
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import ipsd_cuda
from ipsd_cuda.reference import batches, cost, datasets, methods, plots, regimes, train
from ipsd_cuda.reference.metrics import classification_metrics, expected_calibration_error


def run_train(tmp_path, *args):
    out = tmp_path / "out"
    train.main(["--data", "synthetic", "--epochs", "1", "--quiet", "--out", str(out), *args])
    with open(out / "metrics.json") as f:
        return json.load(f), out


def test_compare_one_epoch_writes_metrics_and_plot(tmp_path, capsys):
    metrics, out = run_train(tmp_path, "--method", "compare", "--seeds", "0", "1", "--batch-size", "32")
    assert metrics["config"]["process_group"] is None
    assert (out / "curves.png").stat().st_size > 0
    compared = train.COMPARED
    assert [(r["method"], r["seed"]) for r in metrics["runs"]] == [(m, s) for s in (0, 1) for m in compared]
    for run in metrics["runs"]:
        epoch = run["epochs"][0]
        assert set(epoch["test"]) == {"top1", "nll", "ece"} and epoch["images_per_s"] > 0
        assert epoch["steps"] == 512 // 32
        assert np.isfinite(epoch["train"]["loss"])
        if run["method"] == "ips":
            assert epoch["train"]["pairs_per_batch"] == 32 and epoch["swap_s"] > 0
            assert 0 <= epoch["train"]["first_teacher"] <= 1
        else:
            assert epoch["train"]["first_teacher"] is None
        if run["method"] == "ce":
            assert epoch["train"]["kd"] == 0 and epoch["swap_s"] is None
    assert set(metrics["summary"]) == set(compared)
    ips = compared.index("ips")
    assert metrics["summary"]["ips"]["top1"]["values"] == [
        r["final"]["top1"] for r in metrics["runs"][ips :: len(compared)]
    ]
    printed = capsys.readouterr().out
    assert "± " in printed and "ips" in printed and "cutmix" in printed


@pytest.mark.parametrize(
    "method, backward_per_step",
    [("ce", 32), ("cskd", 32), ("ips", 64), ("cutmix", 32), ("swap-across", 64)],
)
def test_every_method_trains_and_counts_its_backward_images(tmp_path, method, backward_per_step):
    """Anchors and partners both go through the backward pass for ips and swap-across, the anchors
    alone for cskd; ce and cutmix draw plain batches of --batch-size."""
    metrics, _ = run_train(tmp_path, "--method", method, "--batch-size", "32", "--pipeline", "resident")
    epoch = metrics["runs"][0]["epochs"][0]
    assert np.isfinite(epoch["train"]["loss"]) and np.isfinite(epoch["test"]["nll"])
    assert epoch["backward_images"] == epoch["steps"] * backward_per_step
    swaps = method in ("ips", "cutmix", "swap-across")
    assert (epoch["swap_s"] is not None and epoch["swap_s"] > 0) == swaps


def test_several_methods_in_one_command(tmp_path):
    metrics, out = run_train(tmp_path, "--method", "ce", "cutmix", "--batch-size", "64")
    assert [r["method"] for r in metrics["runs"]] == ["ce", "cutmix"] and out.name == "out"
    assert set(metrics["summary"]) == {"ce", "cutmix"}
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "compare", "ips"])


def test_swap_across_pairs_classes_and_ips_takes_a_box(tmp_path):
    """swap-across pairs the anchors-and-partners batch across classes (4 classes: most pairs
    differ); ips with --region box draws its swapped pairs."""
    metrics, _ = run_train(tmp_path, "--method", "swap-across", "--batch-size", "32", "--p", "1")
    train_stats = metrics["runs"][0]["epochs"][0]["train"]
    assert train_stats["pairs_per_batch"] == 32 and 0.5 < train_stats["cross_class"] < 1
    metrics, out = run_train(tmp_path, "--method", "ips", "--region", "box", "--batch-size", "32")
    assert metrics["config"]["region"] == "box" and (out / "swaps-seed0.png").stat().st_size > 0
    # The method the loop builds from those settings swaps boxes: each pair's cells, a rectangle.
    args = train.parse_args(["--method", "ips", "--region", "box", "--p", "1"])
    ips = methods.build("ips", methods.LossSettings(), methods.SwapSettings(4, 0.5, None, args.p, args.region), 4)
    x = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    batch = ips.prepare(x, torch.arange(8).repeat(2))
    mask = batch.plan.mask
    assert mask.flatten(1).any(1).all()
    assert torch.equal(mask.flatten(1).sum(1), mask.any(2).sum(1) * mask.any(1).sum(1))


def test_same_seed_same_initial_weights_and_result(tmp_path):
    # On the CPU only: cuDNN's convolution backward on a GPU is not bit-reproducible.
    a, _ = run_train(tmp_path / "a", "--method", "ips", "--batch-size", "32", "--device", "cpu")
    b, _ = run_train(tmp_path / "b", "--method", "ips", "--batch-size", "32", "--device", "cpu")
    assert a["runs"][0]["final"] == b["runs"][0]["final"]


def test_learns_the_synthetic_task(tmp_path):
    metrics, _ = run_train(tmp_path, "--method", "ips", "--epochs", "4", "--batch-size", "32", "--lr", "0.05")
    # 4 classes: chance is 25%.
    assert metrics["runs"][0]["final"]["top1"] > 60


def test_swap_in_loader_workers(tmp_path):
    metrics, _ = run_train(
        tmp_path, "--method", "ips", "--swap-on", "loader", "--num-workers", "2", "--batch-size", "32",
        "--patch-size", "4", "8", "--alpha", "1.0", "--p", "0.5",
    )
    epoch = metrics["runs"][0]["epochs"][0]
    assert epoch["swap_s"] is None and epoch["train"]["pairs_per_batch"] == 32


def test_bf16_autocast_and_channels_last(tmp_path):
    metrics, out = run_train(tmp_path, "--method", "ips", "--amp", "--channels-last", "--batch-size", "32",
                             "--ce-on", "clean")
    epoch = metrics["runs"][0]["epochs"][0]
    assert np.isfinite(epoch["train"]["loss"]) and np.isfinite(epoch["test"]["nll"])
    assert (out / "swaps-seed0.png").stat().st_size > 0


def test_npz_data(tmp_path):
    g = np.random.default_rng(0)
    arrays = {
        "x_train": g.random((64, 12, 12, 3), dtype=np.float32),
        "y_train": g.integers(0, 3, 64),
        "x_test": g.random((32, 12, 12, 3), dtype=np.float32),
        "y_test": g.integers(0, 3, 32),
    }
    np.savez(tmp_path / "mine.npz", **arrays)
    data = datasets.load(str(tmp_path / "mine.npz"))
    assert data.x_train.shape == (64, 3, 12, 12) and data.x_train.dtype == torch.uint8
    assert data.num_classes == 3
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "mine.npz"), "--method", "cskd", "--epochs", "1",
                "--batch-size", "8", "--quiet", "--out", str(out)])
    assert (out / "metrics.json").exists()


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path):
    g = np.random.default_rng(1)
    arrays = {
        "x_train": g.integers(0, 256, (20, 28, 28)),
        "y_train": g.integers(0, 10, 20),
        "x_test": g.integers(0, 256, (10, 28, 28)),
        "y_test": g.integers(0, 10, 10),
    }
    for key, name in datasets.FASHION_MNIST_FILES.items():
        _write_idx(tmp_path / name, arrays[key])
    data = datasets.load("fashion-mnist", str(tmp_path))
    assert torch.equal(data.x_train[:, 0], torch.from_numpy(arrays["x_train"].astype(np.uint8)))
    assert torch.equal(data.y_test, torch.from_numpy(arrays["y_test"]))
    (tmp_path / datasets.FASHION_MNIST_FILES["y_test"]).unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load("fashion-mnist", str(tmp_path))


def test_missing_data_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        train.main(["--data", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])


def test_metrics_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    labels = torch.randint(0, 7, (500,), generator=g)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    ece = 0.0
    for b in range(15):
        inside = (conf > b / 15) & (conf <= (b + 1) / 15)
        if inside.any():
            accuracy = (pred[inside] == labels[inside]).double().mean()
            ece += inside.sum() / 500 * abs(accuracy - conf[inside].double().mean())
    assert expected_calibration_error(probs, labels) == pytest.approx(float(ece), abs=1e-6)
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(100 * (pred == labels).double().mean().item())
    assert m["nll"] == pytest.approx(-probs.log()[torch.arange(500), labels].mean().item(), rel=1e-5)


def test_a_world_size_without_torchrun_trains_alone(tmp_path, monkeypatch):
    """Clusters and containers may export WORLD_SIZE: only torchrun's launch joins a group."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    metrics, _ = run_train(tmp_path, "--method", "ce", "--batch-size", "64")
    assert metrics["config"]["process_group"] is None


@pytest.mark.parametrize("processes, method", [(2, "ce"), (2, "ips"), (1, "ips")])
def test_ddp_under_torchrun(tmp_path, processes, method):
    """torchrun with CPU processes (gloo): each rank trains on its share of the anchors;
    one process joins a process group too, the path a cluster takes."""
    out = tmp_path / "out"
    # Its own session, so that a hang kills the workers too, not only torchrun.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
         "-m", "ipsd_cuda.reference.train", "--data", "synthetic", "--method", method, "--epochs", "1",
         "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["config"]["world_size"] == processes
    assert metrics["config"]["process_group"] == "gloo"
    epoch = metrics["runs"][0]["epochs"][0]
    # 512 samples over the ranks, 16 anchors per step on each.
    assert epoch["steps"] == 512 // processes // 16
    assert np.isfinite(epoch["test"]["nll"]) and epoch["images_per_s"] > 0


def test_console_script():
    script = os.path.join(os.path.dirname(sys.executable), "ipsd-train")
    if not os.path.exists(script):
        pytest.skip("ipsd_cuda is not pip-installed in this environment")
    with open(script) as f:
        if "ipsd_cuda.reference.train" not in f.read():
            pytest.skip("the installed ipsd-train was generated from another version of pyproject.toml")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage: ipsd-train") and "--method" in result.stdout


def test_resident_pipeline_amp_channels_last_and_gaps(tmp_path):
    """The device-resident path on CPU tensors: bf16 autocast, channels_last, the swap on the gathered batch."""
    metrics, out = run_train(tmp_path, "--method", "ips", "--pipeline", "resident", "--amp", "--channels-last",
                             "--batch-size", "32", "--ce-on", "clean")
    epoch = metrics["runs"][0]["epochs"][0]
    assert epoch["steps"] == 512 // 32 and epoch["swap_s"] > 0
    assert np.isfinite(epoch["train"]["loss"]) and np.isfinite(epoch["test"]["nll"])
    assert set(epoch["train_eval"]) == {"top1", "nll", "ece"}
    train_stats = epoch["train"]
    # p = 0.5: about half of the pairs swapped; gaps are probabilities.
    assert 0.3 < train_stats["swapped_share"] < 0.7
    for key in ("gap", "gap_swapped", "gap_clean"):
        assert 0 <= train_stats[key] <= 1
    assert (out / "swaps-seed0.png").stat().st_size > 0


def test_resident_cskd_reports_clean_gaps_only(tmp_path):
    metrics, _ = run_train(tmp_path, "--method", "cskd", "--pipeline", "resident", "--batch-size", "32")
    stats = metrics["runs"][0]["epochs"][0]["train"]
    assert stats["gap_swapped"] is None and stats["swapped_share"] == 0 and 0 <= stats["gap_clean"] <= 1


def test_crop_flip_matches_the_per_sample_augmentation():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 2, 9, 7), dtype=torch.uint8, generator=g)
    pad = batches.crop_pad(7)
    offsets = torch.randint(0, 2 * pad + 1, (6, 2), generator=g)
    flips = torch.tensor([True, False, True, False, False, True])
    out = batches.crop_flip_at(images, pad, offsets, flips)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for i in range(6):
        dy, dx = offsets[i].tolist()
        want = torch.nn.functional.pad(images[i], (pad,) * 4)[:, dy : dy + 9, dx : dx + 7]
        assert torch.equal(out[i], want.flip(-1) if flips[i] else want)


def test_resident_batches_swap_never_writes_the_data_set():
    data = datasets.synthetic(num_train=64)
    resident_copy = data.x_train.clone()
    index = batches.IndexBatches(data.y_train, 8, paired=True, seed=0)
    source = batches.ResidentBatches(data.x_train, data.y_train, index, "cpu", augment=False)
    for x, y in source:
        ipsd_cuda.swap(x, y, patch_size=4, p=1.0, pairing="halves")
    assert torch.equal(source.images, resident_copy) and len(source) == 64 // 8


def test_balanced_subset_is_nested_and_balanced():
    data = datasets.synthetic(num_train=512, num_classes=4)
    small, large = data.balanced(10), data.balanced(30)
    assert small.y_train.bincount().tolist() == [10] * 4 and large.y_train.bincount().tolist() == [30] * 4
    rows = {bytes(x.numpy()) for x in large.x_train}
    assert all(bytes(x.numpy()) in rows for x in small.x_train)
    assert torch.equal(small.x_test, data.x_test)
    with pytest.raises(ValueError, match="fewer than"):
        data.balanced(1000)


def test_swap_examples_show_swapped_pairs_for_loader_swaps(tmp_path):
    _, out = run_train(tmp_path, "--method", "ips", "--swap-on", "loader", "--batch-size", "16")
    assert (out / "swaps-seed0.png").stat().st_size > 0


def test_plot_swaps_draws_only_swapped_pairs(tmp_path):
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3] * 2)
    before = x.clone()
    none = ipsd_cuda.swap(x, labels, patch_size=4, p=0.0, pairing="halves")
    assert plots.plot_swaps(x, none, (4, 4), "t", tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()
    plan = ipsd_cuda.swap(x, labels, patch_size=4, p=1.0, pairing="halves")
    assert plots.plot_swaps(x, plan, (4, 4), "t", tmp_path / "all.png", pairs=3) == 3
    # Drawing recovers the clean batch from the plan without touching the swapped one.
    assert not torch.equal(x, before) and (tmp_path / "all.png").exists()


def test_cli_output(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in help_text and "synthetic: 512 train" in help_text
    run_train(tmp_path, "--method", "ce", "--batch-size", "64")
    captured = capsys.readouterr()
    table_line = next(line for line in captured.out.splitlines() if line.startswith("ce "))
    assert "±" not in table_line
    assert re.search(r"wall time \d+ s;", captured.out)
    # stderr is not a terminal here: no progress bars.
    assert "it/s" not in captured.err


def test_regime_study_tiny_grid_resumes(tmp_path, capsys):
    out = tmp_path / "regimes"
    argv = ["--data", "synthetic", "--sizes", "4", "8", "--ablations", "--ablation-size", "4", "--epochs", "4:1",
            "8:1", "--evals", "1", "--seeds", "0", "--jobs", "1", "--out", str(out),
            "--train-args", "--batch-size 8 --pipeline resident"]
    regimes.main(argv)
    files = sorted(p.name for p in (out / "runs").glob("*.json"))
    summary = json.loads((out / "summary.json").read_text())
    # The comparison at every size, the ablations at the ablation size.
    assert len(files) == 2 * len(regimes.COMPARISON) + len(regimes.ABLATIONS)
    assert set(summary["cells"]["4"]) == set(regimes.CELLS)
    assert set(summary["cells"]["8"]) == set(regimes.COMPARISON)
    record = json.loads((out / "runs" / "4-ips-seed0.json").read_text())
    assert record["run"]["epochs"][0]["train"]["gap"] is not None
    # The compute-fair cells train twice the epochs and back-propagate twice the images.
    double = json.loads((out / "runs" / "8-ce-2x-seed0.json").read_text())
    single = json.loads((out / "runs" / "8-ce-seed0.json").read_text())
    assert len(double["run"]["epochs"]) == 2 * len(single["run"]["epochs"])
    cells = summary["cells"]["8"]
    assert cells["ce-2x"]["backward_images"]["mean"] == 2 * cells["ce"]["backward_images"]["mean"]
    assert cells["ips"]["backward_images"]["mean"] == cells["ce-2x"]["backward_images"]["mean"]
    assert all((out / name).stat().st_size > 0 for name in ("regimes.png", "cost.png", "curves.png"))
    table_md, paired_md = (out / "table.md").read_text().split("Paired differences, seed by seed:")
    assert table_md.strip().count("\n") == 1 + len(files)
    # Every question at both sizes; one seed, so no spread.
    paired_rows = [line for line in paired_md.strip().splitlines()[2:]]
    assert len(paired_rows) == 2 * len(regimes.PAIRED) and all("| 1/1 |" in r or "| 0/1 |" in r for r in paired_rows)
    ce_2x = next(r for r in paired_rows if r.startswith("| 8 | IPS - CE at equal compute"))
    expected = cells["ips"]["top1"]["mean"] - cells["ce-2x"]["top1"]["mean"]
    assert f"| {expected:.2f} |" in ce_2x
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    capsys.readouterr()
    regimes.main(argv)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    with pytest.raises(SystemExit, match="other arguments"):
        regimes.main([a if a != "4:1" else "4:2" for a in argv])


def test_library_never_imports_the_reference_code():
    code = "import sys, ipsd_cuda; print(any(m.startswith('ipsd_cuda.reference') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_reference_code_uses_public_names_only():
    """The reference modules import ``ipsd_cuda`` itself (never its private modules) and use names in ``__all__``."""
    folder = os.path.dirname(datasets.__file__)
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("ipsd_cuda"), (name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name == "ipsd_cuda" or not a.name.startswith("ipsd_cuda") for a in node.names), name
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ipsd_cuda":
                assert node.attr in ipsd_cuda.__all__, (name, node.attr)


def test_cost_table_names_settings_and_times_steps(tmp_path, capsys):
    """Two calls with different settings share one table: the run with alpha 0.5 is
    named so; a step's time and the preparation's are the epochs after the first."""
    first, first_out = run_train(tmp_path / "a", "--method", "ce", "ips", "--epochs", "3", "--batch-size", "64")
    _, second_out = run_train(tmp_path / "b", "--method", "ips", "--alpha", "0.5", "--p", "1", "--epochs", "2")
    cost.main([str(first_out / "metrics.json"), str(second_out / "metrics.json")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| ce, seed 0", "| ips, seed 0", "| ips, alpha 0.5, p 1.0, seed 0"
    ]
    ips = first["runs"][1]["epochs"]
    want = cost.run_cost(first["runs"][1])
    steps = sum(e["steps"] for e in ips[1:])
    assert want["step_ms"] == pytest.approx(sum(e["epoch_s"] for e in ips[1:]) / steps * 1e3)
    assert want["prepare_ms"] == pytest.approx(sum(e["swap_s"] for e in ips[1:]) / steps * 1e3)
    assert 0 < want["prepare_share"] < 1
    assert want["backward_images"] == sum(e["backward_images"] for e in ips) == 3 * 512 * 2
    assert f"{want['step_ms']:.1f}" in rows[1] and "–" in rows[0]


def test_epochs_for_budget_from_a_timing_run(tmp_path):
    metrics, out = run_train(tmp_path, "--method", "compare", "--epochs", "2", "--batch-size", "64")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "epochs_for_budget.py")
    result = subprocess.run([sys.executable, script, str(out / "metrics.json"), "--budget-s", "1000"],
                            capture_output=True, text=True, check=True)
    fits = int(re.search(r"epochs that fit 1000 s: (\d+)", result.stdout).group(1))
    per_epoch = sum(train.epoch_seconds(r) for r in metrics["runs"])
    assert fits <= 1000 / per_epoch and fits > 0
    assert all(m in result.stdout for m in train.COMPARED)


def test_regime_study_in_worker_processes(tmp_path):
    """The study's default path: runs in spawned worker processes, progress through a queue."""
    out = tmp_path / "regimes"
    regimes.main(["--data", "synthetic", "--sizes", "4", "--epochs", "4:1", "--evals", "1",
                  "--seeds", "0", "--jobs", "2", "--out", str(out), "--train-args", "--batch-size 8"])
    assert len(list((out / "runs").glob("*.json"))) == len(regimes.COMPARISON)
    assert json.loads((out / "summary.json").read_text())["sizes"] == ["4"]
