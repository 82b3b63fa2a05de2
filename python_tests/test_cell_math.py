"""The shared host/device arithmetic, compiled on the host: the CUDA kernel's
unit numbering equals the CPU kernel's run walk and the cells tile each
sample; the CUDA plan's counting equals the CPU plan's sorting; and the
fallback's mix31 is the C++ one."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ipsd_cuda._fallback import mix31

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def compile_check(tmp_path, name):
    binary = tmp_path / name
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-Wall", "-Werror", str(HERE / f"{name}.cpp"), "-o", str(binary)],
        check=True,
    )
    return binary


def test_cuda_unit_order_matches_cpu_runs(tmp_path):
    binary = compile_check(tmp_path, "cell_math_check")
    result = subprocess.run([str(binary), "3000", "7"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "ok 3000 layouts"


def test_cuda_plan_counting_matches_cpu_sorting(tmp_path):
    binary = compile_check(tmp_path, "plan_math_check")
    result = subprocess.run([str(binary), "1500", "11"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "ok 1500 batches"


def test_fallback_mix31_is_the_cpp_one(tmp_path):
    binary = compile_check(tmp_path, "plan_math_check")
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor([0, 1, 2**31 - 1]), torch.randint(0, 2**31, (200,), generator=g)])
    result = subprocess.run([str(binary), "mix", *map(str, x.tolist())], capture_output=True, text=True, check=True)
    assert [int(v) for v in result.stdout.split()] == mix31(x).tolist()
