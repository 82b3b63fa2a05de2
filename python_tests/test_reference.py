"""The reference training loop, its data sources and metrics, on small synthetic data."""

import gzip
import json
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from ipsd_cuda import datasets, train
from ipsd_cuda.metrics import classification_metrics, expected_calibration_error


def run_train(tmp_path, *args):
    out = tmp_path / "out"
    train.main(["--data", "synthetic", "--epochs", "1", "--quiet", "--out", str(out), *args])
    with open(out / "metrics.json") as f:
        return json.load(f), out


def test_compare_one_epoch_writes_metrics_and_plot(tmp_path, capsys):
    metrics, out = run_train(tmp_path, "--method", "compare", "--seeds", "0", "1", "--batch-size", "32")
    assert (out / "curves.png").stat().st_size > 0
    assert [(r["method"], r["seed"]) for r in metrics["runs"]] == [
        (m, s) for s in (0, 1) for m in ("ce", "cskd", "ips")
    ]
    for run in metrics["runs"]:
        epoch = run["epochs"][0]
        assert set(epoch["test"]) == {"top1", "nll", "ece"} and epoch["images_per_s"] > 0
        assert epoch["steps"] == 512 // 32
        assert np.isfinite(epoch["train"]["loss"])
        if run["method"] == "ips":
            assert epoch["train"]["pairs_per_batch"] == 32 and epoch["swap_s"] > 0
            assert 0 <= epoch["train"]["first_teacher"] <= 1
        if run["method"] == "ce":
            assert epoch["train"]["kd"] == 0
    assert set(metrics["summary"]) == {"ce", "cskd", "ips"}
    assert metrics["summary"]["ips"]["top1"]["values"] == [r["final"]["top1"] for r in metrics["runs"][2::3]]
    printed = capsys.readouterr().out
    assert "± " in printed and "ips" in printed


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
            ece += inside.sum() / 500 * abs((pred[inside] == labels[inside]).double().mean() - conf[inside].double().mean())
    assert expected_calibration_error(probs, labels) == pytest.approx(float(ece), abs=1e-6)
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(100 * (pred == labels).double().mean().item())
    assert m["nll"] == pytest.approx(-probs.log()[torch.arange(500), labels].mean().item(), rel=1e-5)


@pytest.mark.parametrize("method", ["ce", "ips"])
def test_two_process_ddp(tmp_path, method):
    """torchrun with 2 CPU processes (gloo): each rank trains on half of the anchors."""
    out = tmp_path / "out"
    # Its own session, so that a hang kills the workers too, not only torchrun.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "ipsd_cuda.train", "--data", "synthetic", "--method", method, "--epochs", "1",
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
    assert metrics["config"]["world_size"] == 2
    epoch = metrics["runs"][0]["epochs"][0]
    # 512 samples over 2 ranks: 256 anchors per rank, 16 per step.
    assert epoch["steps"] == 256 // 16
    assert np.isfinite(epoch["test"]["nll"]) and epoch["images_per_s"] > 0


def test_console_script():
    script = os.path.join(os.path.dirname(sys.executable), "ipsd-train")
    if not os.path.exists(script):
        pytest.skip("ipsd_cuda is not pip-installed in this environment")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage: ipsd-train") and "--method" in result.stdout
