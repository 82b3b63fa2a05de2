"""Build ipsd_cuda's extension: always the CPU kernel, the CUDA kernel when it can be built.

Install with ``pip install --no-build-isolation .`` (or ``-e .``), so that the
extension is compiled against the torch already installed. The CUDA kernel
is built whenever torch is a CUDA build and a CUDA toolkit (``nvcc``) is
found; no GPU is needed for that. Environment:

- ``FORCE_CUDA=1``: a CUDA build is required: a missing toolkit or a CPU-only
  torch stops the build instead of building the CPU kernel only.
- ``USE_CUDA=0``: build the CPU kernel only.
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures; without a visible GPU the
  default is ``7.5;8.0;9.0+PTX``.
- ``DEBUG=1``: unoptimised build with debug symbols (``-G`` for CUDA).
- ``IPSD_REQUIRE_EXTENSION=1``: fail the install if the extension does not
  build (otherwise the package installs with its pure-PyTorch fallback).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.errors import CompileError

try:
    import torch
except ImportError:
    sys.exit(
        "ipsd_cuda compiles against the PyTorch you have installed, and none was "
        "found in this environment.\n"
        "Install PyTorch first (https://pytorch.org/get-started/locally/), e.g.\n"
        "    pip install torch\n"
        "then build without an isolated environment, so the build sees it:\n"
        "    pip install --no-build-isolation ."
    )

ROOT = Path(__file__).parent
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"


def env_flag(name, default="0"):
    return os.environ.get(name, default) == "1"


def find_cuda_home():
    """The CUDA toolkit's root, or None.

    torch guesses it from the ``nvcc`` on PATH, which is wrong when that
    ``nvcc`` is a wrapper script; nvcc's dry run names its real directory.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda")
        return str(default) if (default / "bin" / "nvcc").exists() else None
    dry_run = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    here = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.M)
    if here:
        return str(Path(here.group(1).strip()).parent)
    return str(Path(nvcc).resolve().parent.parent)


def pip_cuda_includes(cuda_home):
    """Header folders of the pip-installed CUDA libraries, when the toolkit lacks them.

    ATen/cuda/CUDAContext.h includes cusparse.h, which a bare nvcc toolkit
    may not ship; the nvidia-* wheels that CUDA builds of torch depend on do.
    """
    if (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec else []
    return sorted(
        {str(h.parent) for root in roots for h in Path(root).glob("*/include/cusparse.h")}
    )


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension reads it at import.
    os.environ["CUDA_HOME"] = CUDA_HOME

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    if os.environ.get("USE_CUDA") == "0":
        return False
    if env_flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME.")
        if torch.version.cuda is None:
            sys.exit(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build: install a CUDA build of torch.")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


class BuildExtensionOrFallBack(BuildExtension):
    """torch's BuildExtension, but a failed compile leaves the package usable.

    setuptools skips an ``optional`` extension whose build raises
    CompileError; torch's ninja build raises RuntimeError, so it is translated.
    ipsd_cuda then warns once at import and uses its PyTorch fallback.
    """

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (RuntimeError, subprocess.CalledProcessError) as err:
            raise CompileError(str(err)) from err


def openmp_flags():
    """The flags that let the CPU kernel's at::parallel_for use torch's threads.

    at::parallel_for is header code: compiled without OpenMP it runs its whole
    range on the calling thread, whatever torch.set_num_threads says. With the
    flag, the extension's OpenMP calls bind to the libgomp that torch loaded
    (same soname), so they share torch's thread count.
    """
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    if not sys.platform.startswith("linux"):
        # Apple's clang and MSVC spell it differently; there the CPU kernel runs on one thread.
        return []
    return ["-fopenmp"]


def extension():
    debug = env_flag("DEBUG")
    use_cuda = want_cuda()
    sources = ["csrc/swap.cpp", "csrc/cpu/swap_kernel.cpp"]
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx.append(f"-DIPSD_WITH_CUDA={int(use_cuda)}")
    openmp = openmp_flags()
    cxx += openmp
    kwargs = {"extra_link_args": openmp}
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        print(
            f"ipsd_cuda: building the CUDA kernel with {CUDA_HOME}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}"
        )
        sources.append("csrc/cuda/swap_kernel.cu")
        kwargs["include_dirs"] = pip_cuda_includes(CUDA_HOME)
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"],
        }
        make = CUDAExtension
    else:
        print("ipsd_cuda: building the CPU kernel only")
        kwargs["extra_compile_args"] = {"cxx": cxx}
        make = CppExtension
    return make(
        "ipsd_cuda._C",
        sources,
        optional=not env_flag("IPSD_REQUIRE_EXTENSION"),
        **kwargs,
    )


setup(
    packages=find_packages(include=["ipsd_cuda", "ipsd_cuda.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionOrFallBack},
)
