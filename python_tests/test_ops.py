"""The registered op: schema and fake kernel (opcheck), torch.compile, what was built."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import ipsd_cuda
from conftest import DEVICES, IMAGE_DTYPES, kernel_available, random_bits, reference_apply, same_bits


def op_samples(device):
    g = torch.Generator().manual_seed(0)
    for dtype in IMAGE_DTYPES:
        for channels_last in (False, True):
            for patch in ((4, 4), (3, 5)):
                x = random_bits((6, 3, 11, 13), dtype, generator=g, channels_last=channels_last, device=device)
                labels = torch.tensor([0, 1, 0, 1, 2, 2], device=device)
                plan = ipsd_cuda.make_plan(labels, ipsd_cuda.grid_for(x, patch))
                yield (x, plan.partner, plan.mask, *patch)
    x = random_bits((4, 7, 9), torch.int64, generator=g, device=device)
    plan = ipsd_cuda.make_plan(torch.tensor([5, 5, 5, 5], device=device), (3, 3))
    yield (x, plan.partner, plan.mask, 3, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if not kernel_available(device):
        pytest.skip(f"no {device} kernel built")
    for args in op_samples(device):
        torch.library.opcheck(torch.ops.ipsd_cuda.apply_plan_.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_op_rejects_mismatched_mask(device):
    """The op checks its own arguments too, for callers of torch.ops directly."""
    if not kernel_available(device):
        pytest.skip(f"no {device} kernel built")
    x = torch.zeros(4, 3, 8, 8, device=device)
    partner = torch.tensor([1, 0, 3, 2], device=device)
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 2, 2\)"):
        torch.ops.ipsd_cuda.apply_plan_(x, partner, torch.zeros(4, 3, 3, dtype=torch.bool, device=device), 4, 4)
    with pytest.raises(TypeError, match="partner must be int64"):
        torch.ops.ipsd_cuda.apply_plan_(x, partner.int(), torch.zeros(4, 2, 2, dtype=torch.bool, device=device), 4, 4)
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        torch.ops.ipsd_cuda.apply_plan_(x[:, :, ::2], partner, torch.zeros(4, 1, 2, dtype=torch.bool, device=device), 4, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compile_fullgraph(device, backend):
    """swap traces into one graph, kernel and fallback alike; with inductor's
    fallback_random (eager's random numbers) it draws what eager draws."""
    torch._dynamo.reset()

    def step(images, labels):
        # p=1: with the default p=0.5 all four pairs stay idle one time in 16.
        plan = ipsd_cuda.swap(images, labels, patch_size=4, p=1.0, backend=backend)
        return images * 2, plan.partner, plan.mask

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    images = random_bits((8, 3, 16, 16), torch.float32, generator=g, device=device)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    original = images.clone()
    doubled, partner, mask = compiled(images, labels)
    plan = ipsd_cuda.SwapPlan(partner, mask)
    assert plan.mask.any()
    assert same_bits(images, reference_apply(original, plan, 4))
    assert same_bits(doubled, images * 2)

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        results = []
        for run in (torch.compile(step, fullgraph=True), step):
            x = original.clone()
            torch.manual_seed(4)
            results.append((x, *run(x, labels)[1:]))
    (xa, pa, ma), (xb, pb, mb) = results
    assert torch.equal(pa, pb) and torch.equal(ma, mb) and same_bits(xa, xb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_apply_plan_compiles_fullgraph(device, backend):
    """apply_plan traces without the eager, value-dependent plan check."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def replay(x, partner, mask):
        ipsd_cuda.apply_plan(x, ipsd_cuda.SwapPlan(partner, mask), patch_size=8, backend=backend)
        return x + 1

    g = torch.Generator().manual_seed(1)
    x = random_bits((6, 3, 16, 24), torch.float16, generator=g, device=device)
    plan = ipsd_cuda.make_plan(torch.tensor([0, 1, 0, 1, 2, 2], device=device), (2, 3), p=1.0)
    expected = reference_apply(x.clone(), plan, 8)
    out = replay(x, plan.partner, plan.mask)
    assert same_bits(x, expected) and same_bits(out, expected + 1)


def test_backends_reports_build():
    built = ipsd_cuda.backends()
    assert set(built) == {"cpu", "cuda"} and all(isinstance(v, bool) for v in built.values())
    # CI states what it built; a silently missing kernel must fail there.
    expected = os.environ.get("IPSD_EXPECT_KERNELS")
    if expected is not None:
        want = {name: name in expected.split(",") for name in ("cpu", "cuda")}
        assert built == want, f"built {built}, IPSD_EXPECT_KERNELS={expected}"


def test_kernel_available_means_built_and_present(monkeypatch):
    """backends() says what was compiled; kernel_available says what a swap will run."""
    from ipsd_cuda import _ops

    built = ipsd_cuda.backends()
    assert ipsd_cuda.kernel_available("cpu") == built["cpu"]
    assert ipsd_cuda.kernel_available(torch.zeros(1)) == built["cpu"]
    assert ipsd_cuda.kernel_available("cuda") == (built["cuda"] and torch.cuda.is_available())
    assert not ipsd_cuda.kernel_available("meta")
    # A CUDA kernel compiled on a machine without a GPU: built, not available.
    monkeypatch.setattr(_ops, "backends", lambda: {"cpu": True, "cuda": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not ipsd_cuda.kernel_available("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ipsd_cuda.kernel_available("cuda") and ipsd_cuda.kernel_available(torch.device("cuda", 1))
    assert not ipsd_cuda.kernel_available("cuda:2")
    monkeypatch.setattr(_ops, "backends", lambda: {"cpu": False, "cuda": False})
    assert not ipsd_cuda.kernel_available("cpu") and not ipsd_cuda.kernel_available("cuda:0")


def _run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )


def test_force_fallback_uses_pure_pytorch():
    result = _run_python(
        "import torch, ipsd_cuda\n"
        "x = torch.rand(4, 3, 8, 8); ipsd_cuda.swap(x, torch.tensor([0, 0, 1, 1]), patch_size=4)\n"
        "print(ipsd_cuda.backends())",
        IPSD_FORCE_FALLBACK="1",
    )
    assert "{'cpu': False, 'cuda': False}" in result.stdout
    assert "Warning" not in result.stderr


def test_missing_extension_warns_once_and_falls_back():
    result = _run_python(
        "import sys; sys.modules['ipsd_cuda._C'] = None\n"
        "import torch, ipsd_cuda, importlib\n"
        "x = torch.rand(4, 3, 8, 8); ipsd_cuda.swap(x, torch.tensor([0, 0, 1, 1]), patch_size=4)\n"
        "ipsd_cuda.swap(x, torch.tensor([0, 0, 1, 1]), patch_size=4)\n"
        "print(ipsd_cuda.backends())"
    )
    assert "{'cpu': False, 'cuda': False}" in result.stdout
    assert result.stderr.count("could not be loaded") == 1
    assert "pip install --no-build-isolation" in result.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_auto_uses_the_kernel_where_built(device, monkeypatch):
    from ipsd_cuda import _ops, patch_swap, plan

    calls = []

    def spy(module, name, tag):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a: (calls.append(tag), original(*a))[1])

    spy(_ops, "swap_kernel", "kernel")
    spy(patch_swap, "make_plan_torch", "torch")
    spy(plan, "make_plan_kernel", "kernel")
    spy(plan, "make_plan_torch", "torch")
    x = torch.zeros(2, 1, 4, 4, device=device)
    labels = torch.tensor([0, 0], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ipsd_cuda.swap(x, labels, patch_size=2)
        ipsd_cuda.make_plan(labels, (2, 2))
    assert calls == ["kernel" if kernel_available(device) else "torch"] * 2


def _openmp_build():
    return ipsd_cuda.backends()["cpu"] and sys.platform.startswith("linux") and (
        "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    )


@pytest.mark.skipif(not _openmp_build(), reason="needs the CPU kernel and torch's OpenMP backend on Linux")
def test_cpu_kernel_runs_on_torchs_threads():
    """Built with OpenMP (else at::parallel_for runs on one thread) and bound to torch's libgomp, not a second one."""
    from ipsd_cuda import _ops

    with open(_ops._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()
    ipsd_cuda.swap(torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64), patch_size=2)
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not ipsd_cuda.backends()["cpu"], reason="CPU kernel not built")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("patch", [2, 16])
@pytest.mark.parametrize("pairing", ["random", "halves"])
def test_cpu_kernel_bits_do_not_depend_on_threads(restore_threads, dtype, channels_last, patch, pairing):
    """Batches big enough to split into several tasks (plan and exchange): 1, 2 and 3 threads, and the
    fallback, give the same plan and bits."""
    g = torch.Generator().manual_seed(patch)
    labels = torch.randint(0, 4, (512,), generator=g)
    if pairing == "halves":
        labels[256:] = labels[:256]
    x = random_bits((512, 3, 32, 32), dtype, generator=g, channels_last=channels_last)
    results = []
    for threads, backend in ((1, "kernel"), (2, "kernel"), (3, "kernel"), (1, "torch")):
        torch.set_num_threads(threads)
        out = x.clone(memory_format=torch.preserve_format)
        plan = ipsd_cuda.swap(out, labels, patch_size=patch, p=0.5, pairing=pairing, backend=backend,
                              generator=torch.Generator().manual_seed(7))
        results.append((plan, out))
    (first, expected), *others = results
    assert not same_bits(expected, x)
    for plan, out in others:
        assert torch.equal(plan.partner, first.partner) and torch.equal(plan.mask, first.mask)
        assert same_bits(out, expected)
