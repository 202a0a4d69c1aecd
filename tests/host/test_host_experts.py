"""Host experts against the reference (`expert_forward` in float64) on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from prophet import host_gemv
from prophet.errors import ConfigError
from prophet.formats import (
    ExpertFormat,
    dequantize,
    dequantize_expert,
    expert_forward,
    quantize,
    weight_format,
)
from prophet.host_experts import HostExperts, HostJob, jobs_for, native_bf16, physical_cores
from prophet.store import HostStore

FORMATS = [
    ExpertFormat(64, 40),  # Mixtral-like: gated silu
    ExpertFormat(37, 29, glu=False, activation="gelu"),  # odd sizes: kernel tails in both dims
    ExpertFormat(48, 24, activation="gpt_oss", has_bias=True),
]
E, K = 6, 2


def _store(fmt: ExpertFormat, dtype: torch.dtype, gen: torch.Generator, weights: str | None = None) -> HostStore:
    store = HostStore(2, E, fmt, dtype, pin=False, weights=weight_format(weights) if weights else None)
    for layer in range(2):
        for e in range(E):
            store.write(layer, e, {n: torch.randn(s, generator=gen) * 0.3 for n, s in fmt.shapes.items()})
    return store


def _routing(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])  # [T, K]
    return idx, torch.rand(tokens, K, generator=gen).softmax(-1)


def _reference(store: HostStore, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
               experts: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of ``experts`` by `expert_forward` with weights and inputs in ``dtype``."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in experts:
        t = {n: v.to(dtype) for n, v in store.read_canonical(layer, e).items()}
        tok, j = (idx == e).nonzero(as_tuple=True)
        if len(tok):
            y = expert_forward(store.fmt, t, x[tok].to(dtype)).double()
            out.index_add_(0, tok, y * w[tok, j, None].double())
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.activation)
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("threads", [1, 3])
def test_fp32_equals_reference(fmt: ExpertFormat, tokens: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(tokens * 7 + threads)
    store = _store(fmt, torch.float32, gen)
    x = torch.randn(tokens, fmt.hidden_size, generator=gen)
    idx, w = _routing(tokens, gen)
    experts = [0, 2, 5]
    with HostExperts(store, threads=threads) as host:
        result = host.submit(1, x, jobs_for(idx, w, experts)).result()
    out = result.out
    assert [n for n, _ in result.timings] == [int((idx == e).sum()) for e in experts]
    ref = _reference(store, 1, x, idx, w, experts, torch.float64)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.activation)
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize(("kernel", "native"), [(True, False), (False, False), (True, True)],
                         ids=["kernel", "torch", "native-bf16"])
def test_bf16_error_no_worse_than_eager_bf16(fmt: ExpertFormat, tokens: int, kernel: bool, native: bool) -> None:
    """bf16 weights: the host path accumulates in fp32, so its error against the fp64 reference of the same
    bf16 weights is at most that of computing the experts in bf16 as the unwrapped model does."""
    if kernel and not host_gemv.available():
        pytest.skip("host GEMV kernel not built here (no compiler or no AVX2)")
    gen = torch.Generator().manual_seed(100 + tokens)
    store = _store(fmt, torch.bfloat16, gen)
    x = torch.randn(tokens, fmt.hidden_size, generator=gen).bfloat16().float()
    idx, w = _routing(tokens, gen)
    experts = [1, 3, 4]
    with HostExperts(store, threads=2, use_kernel=kernel, native=native) as host:
        out = host.submit(0, x, jobs_for(idx, w, experts)).result().out
    ref = _reference(store, 0, x, idx, w, experts, torch.float64)
    eager = _reference(store, 0, x, idx, w, experts, torch.bfloat16)
    if native:  # torch's bf16 matmul rounds each product to bf16 as eager does: RMS within tests/test_accuracy.py's 10%
        err, eager_err = ((out.double() - ref).pow(2).mean().sqrt().item(), (eager - ref).pow(2).mean().sqrt().item())
        assert err <= eager_err * 1.10 + 1e-6, f"host bf16 RMS error {err:.3g} vs eager bf16 {eager_err:.3g}"
        return
    err, eager_err = (out.double() - ref).abs().max().item(), (eager - ref).abs().max().item()
    assert err <= eager_err * 1.05 + 1e-6, f"host bf16 error {err:.3g} vs eager bf16 {eager_err:.3g}"


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8", "mxfp4"])
def test_quantized_store_equals_its_dequantized_reference(weights: str) -> None:
    """Every stored format: the host computes from the format's own dequantization (the reference)."""
    fmt = ExpertFormat(64, 32)
    gen = torch.Generator().manual_seed(len(weights))
    store = _store(fmt, torch.float32, gen, weights)
    x = torch.randn(3, 64, generator=gen)
    idx, w = _routing(3, gen)
    with HostExperts(store, threads=2) as host:
        out = host.submit(1, x, jobs_for(idx, w, [0, 1, 4])).result().out
    torch.testing.assert_close(out.double(), _reference(store, 1, x, idx, w, [0, 1, 4], torch.float64),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not host_gemv.available(), reason="host GEMV kernel not built here")
@pytest.mark.parametrize("shape", [(4, 8), (5, 9), (33, 130), (100, 7), (19, 8203)])  # 19 rows: eight at a time and the rest
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("bf16_x", [True, False], ids=["bf16_x", "fp32_x"])
def test_kernel_rows_equal_fp32_product(shape: tuple[int, int], tokens: int, bf16_x: bool) -> None:
    """Every kernel path (one bf16-exact token: one row stream or eight rows; else rows x token pairs)."""
    n, k = shape
    gen = torch.Generator().manual_seed(n * k + tokens)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(tokens, k, generator=gen)
    if bf16_x:
        x = x.bfloat16().float()
    y = torch.full((tokens, n), float("nan"))
    host_gemv.gemv_rows(w, x, y, 0, n)
    ref = (x.double() @ w.double().T).float()
    torch.testing.assert_close(y, ref, atol=1e-5 * k**0.5, rtol=1e-5)
    y2 = torch.full((tokens, n), float("nan"))
    host_gemv.gemv_rows(w, x, y2, 1, n - 1)  # a row range leaves the rest untouched
    assert y2[:, 0].isnan().all() and y2[:, -1].isnan().all()
    torch.testing.assert_close(y2[:, 1:-1], y[:, 1:-1])


@pytest.mark.skipif(not host_gemv.available(), reason="host GEMV kernel not built here")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("shape", "group"), [((5, 64), 32), ((9, 37), 16), ((7, 301), 0), ((3, 40), 7),
                                              ((4, 200), 64)])
def test_int_kernel_equals_dequantize_then_matmul(bits: int, shape: tuple[int, int], group: int) -> None:
    """int8/int4 rows (every code, odd sizes, group tails, odd groups, one scale per row, whole 32-column blocks)
    against the reference `dequantize` then an fp64 product; 1 token (decode in registers), 3 and 32 (rows
    dequantized once, then fp32 dot products)."""
    n, k = shape
    wf = weight_format(f"int{bits}", group_size=group)
    gen = torch.Generator().manual_seed(n * k + bits + group)
    values, scales = quantize(wf, torch.randn(n, k, generator=gen))
    codes = torch.randint(0, 256, (values.numel(),), generator=gen, dtype=torch.uint8)  # -128 and -8 too
    values.view(torch.uint8).view(-1).copy_(codes)
    w = dequantize(wf, values, scales, shape).double()
    for tokens in (1, 3, 32):
        x = torch.randn(tokens, k, generator=gen)
        y = torch.full((tokens, n), float("nan"))
        host_gemv.gemv_int_rows(values, scales, group or k, bits, x, y, 0, n)
        torch.testing.assert_close(y.double(), x.double() @ w.T, atol=1e-5 * k**0.5, rtol=1e-5)
        y2 = torch.full((tokens, n), float("nan"))
        host_gemv.gemv_int_rows(values, scales, group or k, bits, x, y2, 1, n - 1)
        assert y2[:, 0].isnan().all() and y2[:, -1].isnan().all()


@pytest.mark.skipif(not host_gemv.available(), reason="host GEMV kernel not built here")
@pytest.mark.parametrize("name", ["fp8", "fp8-channel", "fp8-tensor"])
@pytest.mark.parametrize("shape", [(300, 260), (5, 37), (130, 8)])
def test_fp8_kernel_equals_dequantize_then_matmul(name: str, shape: tuple[int, int]) -> None:
    """e4m3 rows (every code: subnormals, zero, both signs) with per-tensor, per-row and 128x128 block scales
    (block tails in both dims) against the reference `dequantize` then an fp64 product; 1, 3 and 32 tokens."""
    n, k = shape
    wf = weight_format(name)
    gen = torch.Generator().manual_seed(n * k + len(name))
    w = torch.randn(n, k, generator=gen) * torch.logspace(-4, 0, k)  # small values: subnormal codes too
    values, scales = quantize(wf, w)
    if n * k >= 256:  # every code but the two NaNs
        codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
        values.view(torch.uint8).view(-1)[: len(codes)] = codes
    ref = dequantize(wf, values, scales, shape).double()
    block_rows, group = wf.block(n, k)
    for tokens in (1, 3, 32):
        x = torch.randn(tokens, k, generator=gen)
        y = torch.full((tokens, n), float("nan"))
        host_gemv.gemv_fp8_rows(values, scales, block_rows, group, x, y, 0, n)
        torch.testing.assert_close(y.double(), x.double() @ ref.T, atol=1e-5 * k**0.5, rtol=1e-5)


@pytest.mark.skipif(not host_gemv.available(), reason="host GEMV kernel not built here")
@pytest.mark.parametrize("shape", [(33, 130), (4, 64), (7, 45), (3, 31)])
def test_mxfp4_kernel_equals_dequantize_then_matmul(shape: tuple[int, int]) -> None:
    """mxfp4 rows (every byte of two e2m1 codes, e8m0 scales from 2^-127 up, a partial last group, odd K)
    against the reference `dequantize` then an fp64 product; 1 token (decode in registers), 3 and 32 (rows
    dequantized once, then fp32 dot products)."""
    n, k = shape
    wf = weight_format("mxfp4")
    gen = torch.Generator().manual_seed(n * k)
    values, scales = quantize(wf, torch.randn(n, k, generator=gen))
    values.view(-1).copy_(torch.randint(0, 256, (values.numel(),), generator=gen, dtype=torch.uint8))
    if values.numel() >= 256:
        values.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales.copy_(torch.randint(0, 141, scales.shape, generator=gen, dtype=torch.uint8))
    scales.view(-1)[0] = 0  # 2^-127: the subnormal scale
    ref = dequantize(wf, values, scales, shape).double()
    for tokens in (1, 3, 32):
        x = torch.randn(tokens, k, generator=gen)
        y = torch.full((tokens, n), float("nan"))
        host_gemv.gemv_mxfp4_rows(values, scales, x, y, 0, n)
        bound = 1e-6 * (x.double().abs() @ ref.abs().T) + 1e-30  # fp32 sums of terms 2^-127 .. 2^16 apart
        assert ((y.double() - x.double() @ ref.T).abs() <= bound).all()
        y2 = torch.full((tokens, n), float("nan"))
        host_gemv.gemv_mxfp4_rows(values, scales, x, y2, 1, n - 1)  # a row range leaves the rest untouched
        assert y2[:, 0].isnan().all() and y2[:, -1].isnan().all()
        torch.testing.assert_close(y2[:, 1:-1], y[:, 1:-1])


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8", "fp8-channel", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 5])
def test_quant_store_host_experts_against_reference(weights: str, dtype: torch.dtype, tokens: int) -> None:
    """A whole layer from an int8/int4/fp8/mxfp4 store through its kernel (biases, gpt_oss activation, odd sizes):
    equal to the dequantize reference in fp32; in bf16 no further from the fp64 product of the quantized
    weights than the path that dequantizes to bf16 first (the fallback, and the device kernels)."""
    fmt = FORMATS[2] if tokens == 1 else FORMATS[1]
    gen = torch.Generator().manual_seed(tokens + len(weights))
    store = _store(fmt, dtype, gen, weights)
    x = torch.randn(tokens, fmt.hidden_size, generator=gen).to(dtype).float()
    idx, w = _routing(tokens, gen)
    experts = [0, 2, 3]
    jobs = jobs_for(idx, w, experts)
    with HostExperts(store, threads=2) as host, HostExperts(store, threads=1, use_kernel=False) as fallback:
        assert host.quant_kernel == host_gemv.available() and not fallback.quant_kernel
        out = host.submit(0, x, jobs).result().out
        rounded = fallback.submit(0, x, jobs).result().out
    ref = torch.zeros(x.shape, dtype=torch.float64)  # fp64 product of the quantized weights (not rounded)
    for e in experts:
        t = {n: v.double() for n, v in dequantize_expert(store.layout, store.read(0, e)).items()}
        tok, j = (idx == e).nonzero(as_tuple=True)
        ref.index_add_(0, tok, expert_forward(fmt, t, x[tok].double()) * w[tok, j, None].double())
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        err, err_rounded = (out.double() - ref).abs().max().item(), (rounded.double() - ref).abs().max().item()
        assert err <= 1.05 * err_rounded + 1e-6, (err, err_rounded)


def test_submit_returns_at_once_and_orders_layers() -> None:
    gen = torch.Generator().manual_seed(0)
    store = _store(FORMATS[0], torch.float32, gen)
    x = torch.randn(2, 64, generator=gen)
    job = HostJob(1, torch.tensor([0, 1]), torch.tensor([1.0, 0.5]))
    with HostExperts(store, threads=2) as host:
        futures = [host.submit(layer, x, [job]) for layer in (0, 1)]
        outs = [f.result().out for f in futures]
        assert not torch.equal(outs[0], outs[1])
        torch.testing.assert_close(outs[1], host.run(1, x, [job]).out)
        assert host.submit(0, x, []).result().out.abs().sum() == 0


def test_bad_input_raises() -> None:
    store = HostStore(1, 2, FORMATS[0], torch.float32, pin=False)
    with pytest.raises(ConfigError, match="threads"):
        HostExperts(store, threads=0)
    with HostExperts(store, threads=1) as host, pytest.raises(ConfigError, match="CPU"):
        host.submit(0, torch.zeros(1, 64, device="meta"), [])


def test_native_bf16_read_from_cpu_flags(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu avx2 avx512f avx512_bf16 fma\n")
    assert native_bf16(info)
    info.write_text("flags\t: fpu avx2 avx512f avx512_vnni fma\n")
    assert not native_bf16(info)
    assert not native_bf16(tmp_path / "missing")


def test_physical_cores_count_smt_siblings_once(tmp_path) -> None:
    for cpu, core in enumerate([0, 1, 0, 1]):  # two cores, two SMT threads each
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert physical_cores({0, 2}, tmp_path) == 1  # affinity to one core's two threads
    assert physical_cores({0, 5}, tmp_path) == 2  # no topology for cpu5: count logical CPUs
