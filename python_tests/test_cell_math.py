"""The shared cell arithmetic, compiled on the host: the CUDA kernel's unit
numbering equals the CPU kernel's run walk, and the cells tile each sample."""

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_unit_order_matches_cpu_runs(tmp_path):
    binary = tmp_path / "cell_math_check"
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-Wall", "-Werror", str(HERE / "cell_math_check.cpp"), "-o", str(binary)],
        check=True,
    )
    result = subprocess.run([str(binary), "3000", "7"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "ok 3000 layouts"
