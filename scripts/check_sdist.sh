#!/usr/bin/env bash
# Installs ipsd_cuda the way a package index or a cluster does, and proves
# that what it installs works:
#   1. builds the sdist, and a wheel from that sdist (the CPU kernel only:
#      USE_CUDA=0), failing if the extension does not compile;
#   2. checks that the sdist holds exactly the repository's package and
#      C++/CUDA sources (headers included), and the wheel the compiled module;
#   3. installs the wheel, with the torch it was built against, into a fresh
#      virtual environment outside the checkout;
#   4. imports it there (not from the checkout), checks the CPU kernel was
#      built and runs a kernel swap, and runs the console script.
#
#   scripts/check_sdist.sh        # or: make sdist-check
#
# PYTHON: the interpreter with torch and the build tools (default .venv/bin/python).
# TORCH_REQUIREMENT: what to install as torch in the fresh environment (default: the
# version PYTHON has, without its local label such as +cu130).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(realpath -s "${PYTHON:-.venv/bin/python}")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ipsd-sdist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { printf '%s %s\n' "$(date +%T)" "$*"; }

step "sdist, then a wheel from it (CPU kernel)"
USE_CUDA=0 IPSD_REQUIRE_EXTENSION=1 "$PY" -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 ||
  { tail -n 40 "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "  $(basename "$SDIST") $(du -k "$SDIST" | cut -f1) KiB, $(basename "$WHEEL") $(du -k "$WHEEL" | cut -f1) KiB"

step "sdist contents = the tracked sources the build needs, plus generated metadata"
# PKG-INFO, setup.cfg and *.egg-info/ are written by the sdist build itself.
tar tzf "$SDIST" | grep -v '/$' | cut -d/ -f2- | grep -vE '^(PKG-INFO|setup\.cfg|[^/]*\.egg-info/.*)$' | sort >"$WORK/shipped"
git ls-files LICENSE README.md MANIFEST.in pyproject.toml setup.py ipsd_cuda 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' |
  sort >"$WORK/expected"
diff -u "$WORK/expected" "$WORK/shipped" || { echo "the sdist differs from the sources (- missing, + extra)"; exit 1; }
echo "  $(wc -l <"$WORK/shipped") files, as expected"
"$PY" -m zipfile -l "$WHEEL" | grep -E 'ipsd_cuda/_C\.[^ ]*\.so ' >/dev/null || { echo "the wheel has no compiled extension"; exit 1; }

TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
step "fresh environment outside the checkout: $TORCH_REQUIREMENT + the wheel"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$TORCH_REQUIREMENT" "$WHEEL" >"$WORK/install.log" 2>&1 ||
  { grep -v 'is ignored' "$WORK/install.log" | tail -n 20; exit 1; }

step "import, kernel swap, console script"
cd "$WORK"
# -I: neither the current folder nor PYTHONPATH can put the checkout on sys.path.
"$WORK/venv/bin/python" -I - "$OLDPWD" <<'PY'
import sys
from pathlib import Path

import torch

import ipsd_cuda

checkout = Path(sys.argv[1]).resolve()
where = Path(ipsd_cuda.__file__).resolve()
assert checkout not in where.parents, f"imported from the checkout: {where}"
assert ipsd_cuda.backends()["cpu"] and ipsd_cuda.kernel_available("cpu"), ipsd_cuda.backends()
images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
labels = torch.tensor([0, 1, 2, 3] * 2)
clean = images.clone()
plan = ipsd_cuda.swap(images, labels, patch_size=4, p=1.0, backend="kernel")
replayed = clean.clone()
ipsd_cuda.apply_plan(replayed, plan, patch_size=4, backend="torch")
assert torch.equal(images, replayed) and not torch.equal(images, clean)
print(f"  ipsd_cuda {ipsd_cuda.__version__} from {where.parent}, torch {torch.__version__},"
      f" backends {ipsd_cuda.backends()}: {plan}")
PY
"$WORK/venv/bin/ipsd-train" --help >/dev/null
step "ok"
