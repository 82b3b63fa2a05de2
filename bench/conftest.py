"""pytest hooks of the benchmarks: device markers and what the machine was doing.

Run from the repository root, e.g. ``pytest bench -m cpu --benchmark-json=out.json``;
``bench/report.py`` turns the JSON into tables.
"""

import os
import time
from pathlib import Path

import pytest
import torch

import ipsd_cuda

_LOAD_AT_START = pytest.StashKey[tuple]()
_CPU_AT_START = pytest.StashKey[tuple]()


def _cpu_seconds():
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process).

    The machine's figure is None where there is no /proc/stat (not Linux).
    """
    own = os.times()
    machine = None
    stat = Path("/proc/stat")
    if stat.exists():
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait; guest time is already in user
        machine = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), machine, own.user + own.system


def pytest_addoption(parser):
    parser.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, one per core). On a machine that "
        "other jobs keep busy, 1 gives steadier numbers: with one thread per core, every "
        "parallel op waits for the scheduler to hand it the busy core.",
    )


def pytest_configure(config):
    threads = config.getoption("bench_threads")
    if threads is not None:
        torch.set_num_threads(threads)
    config.addinivalue_line("markers", "cpu: a benchmark on the CPU")
    config.addinivalue_line("markers", "cuda: a benchmark on the GPU (skipped without CUDA)")
    # The machine is shared: the load before the run says whether others were
    # busy, the load after it mostly measures the benchmarks themselves.
    config.stash[_LOAD_AT_START] = os.getloadavg()
    config.stash[_CPU_AT_START] = _cpu_seconds()
    # pytest-benchmark writes its JSON at the very end, into an existing folder
    # only: create it now rather than lose the whole run (e.g. runs/ in a fresh checkout).
    # Older pytest-benchmark releases open the file while parsing the options
    # (an open file, whose folder therefore exists); newer ones pass a path.
    json_path = config.getoption("benchmark_json", None)
    if isinstance(json_path, os.PathLike):
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)


def _others_busy(start, end):
    """Cores that other processes kept busy, on average, between two _cpu_seconds()."""
    (wall0, busy0, own0), (wall1, busy1, own1) = start, end
    if busy0 is None or wall1 <= wall0:
        return None
    return round(((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0), 2)


@pytest.fixture
def others_busy():
    """A function: how many cores other processes have kept busy since this test began.

    A run-wide average hides a job that starts halfway: each benchmark
    records its own, so that the report can flag the disturbed ones.
    """
    start = _cpu_seconds()
    return lambda: _others_busy(start, _cpu_seconds())


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["ipsd_cuda_backends"] = ipsd_cuda.backends()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["loadavg_start"] = list(config.stash[_LOAD_AT_START])
    machine_info["loadavg_end"] = list(os.getloadavg())
    # The direct measure of how much the numbers were disturbed.
    machine_info["other_cores_busy"] = _others_busy(config.stash[_CPU_AT_START], _cpu_seconds())
    machine_info["cores"] = os.cpu_count()
