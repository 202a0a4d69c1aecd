"""Grouped-GEMM MoE kernels (`prophet.kernels.moe`): Triton against the reference, the reference against a
float64 per-token loop and against transformers' eager experts, input validation and backend choice.

On a machine without CUDA the Triton kernels run in the interpreter (tests/kernels/conftest.py), which is
slow: sizes stay tiny and launch tiles are 16 wide so that many programs and masked edges are exercised.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch

from prophet.errors import KernelError
from prophet.kernels import moe
from prophet.kernels.moe import moe_experts, moe_experts_reference, moe_experts_triton, resolve_backend
from prophet.kernels.tuning import GemmConfig, MoEConfig
from prophet.models.adapter import ExpertFormat, expert_forward

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative L2 error
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),  # the interpreter computes bf16 wrongly
]
TILE16 = GemmConfig(block_n=16, block_k=16)


@dataclass(frozen=True)
class Case:
    tokens: int = 5
    top_k: int = 2
    experts: int = 4
    slots: int = 0  # cache slots; 0 means one per expert
    hidden: int = 32
    inter: int = 16
    activation: str = "silu"
    glu: bool = True
    bias: bool = False
    routing: str = "topk"  # topk: k distinct experts per token; one: all pairs to one expert; dup: with replacement
    path: str = "decode"
    block_m: int = 16
    split_k: int = 1
    slab_pad: int = 0  # extra elements at the end of each slot's slab (alignment padding in the pool)
    slot_dtype: torch.dtype = torch.int64

    @property
    def fmt(self) -> ExpertFormat:
        return ExpertFormat(self.hidden, self.inter, glu=self.glu, activation=self.activation, has_bias=self.bias)

    @property
    def config(self) -> MoEConfig:
        return MoEConfig(self.path, TILE16, TILE16, block_m=self.block_m, split_k=self.split_k)


@dataclass
class Inputs:
    hidden: torch.Tensor  # [T, H]
    slot_ids: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k] float32 router weights
    w1: torch.Tensor  # [S, N1, H] view into the slot pool
    w2: torch.Tensor  # [S, H, I] view into the slot pool
    b1: torch.Tensor | None  # [S, N1]
    b2: torch.Tensor | None  # [S, H]

    def args(self, fmt: ExpertFormat) -> tuple:
        return (self.hidden, self.slot_ids, self.weights, self.w1, self.w2, fmt, self.b1, self.b2)


def slab_views(pool: torch.Tensor, fmt: ExpertFormat) -> dict[str, torch.Tensor]:
    """The expert tensors as views into ``pool [S, slab]``, in the canonical slab order (as the cache does)."""
    views, offset = {}, 0
    for name, shape in fmt.shapes.items():
        size = math.prod(shape)
        views[name] = pool[:, offset : offset + size].view(pool.shape[0], *shape)
        offset += size
    return views


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device = DEVICE) -> Inputs:
    """Fresh random inputs; experts live in a scrambled subset of slots of a slab pool, as in the cache."""
    fmt = case.fmt
    slots = case.slots or case.experts
    pool = torch.randn(slots, fmt.numel + case.slab_pad)  # [S, slab]
    scaled = slab_views(pool, fmt)
    scaled["w1"].mul_(fmt.hidden_size**-0.5)
    scaled["w2"].mul_(fmt.intermediate_size**-0.5)
    views = slab_views(pool.to(device=device, dtype=dtype), fmt)

    t, k, e = case.tokens, case.top_k, case.experts
    if case.routing == "topk":
        experts = torch.rand(t, e).topk(k, dim=1).indices
    elif case.routing == "one":
        experts = torch.full((t, k), e - 1)
    else:
        experts = torch.randint(0, e, (t, k))
    expert_to_slot = torch.randperm(slots)[:e]  # the cache's remapping: slot ids are not expert ids
    slot_ids = expert_to_slot[experts].to(device=device, dtype=case.slot_dtype)
    weights = torch.softmax(torch.randn(t, k), dim=1).to(device)
    hidden = torch.randn(t, fmt.hidden_size).to(device=device, dtype=dtype)
    return Inputs(hidden, slot_ids, weights, views["w1"], views["w2"], views.get("b1"), views.get("b2"))


@pytest.fixture(autouse=True)
def poisoned_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the kernels write starts as NaN (or -1), so an unwritten element fails the test."""

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    monkeypatch.setattr(moe, "_workspace", poisoned)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


CASES = [
    # a single decode token
    pytest.param(Case(tokens=1), id="one_token"),
    # fewer pairs than the 16-row block of the prefill path: every group is mostly padding
    pytest.param(Case(tokens=3, path="prefill"), id="fewer_tokens_than_block"),
    # 21 tokens x 2 = 42 pairs over 4 experts: groups straddle block boundaries
    pytest.param(Case(tokens=21, path="prefill"), id="not_multiple_of_block"),
    # odd H and I: masked edges in both GEMMs' N and K loops
    pytest.param(Case(hidden=37, inter=19, path="prefill"), id="odd_hidden_and_intermediate"),
    # odd sizes on the decode path too
    pytest.param(Case(hidden=37, inter=19), id="odd_sizes_decode"),
    # a prime number of experts, top-3
    pytest.param(Case(tokens=9, experts=7, top_k=3, path="prefill"), id="prime_experts"),
    # top-1 routing
    pytest.param(Case(tokens=6, top_k=1), id="top1"),
    # top-k equal to the number of experts: every token visits every expert
    pytest.param(Case(tokens=4, experts=4, top_k=4, path="prefill"), id="topk_equals_experts"),
    # every token to the same expert: one big group, all other slots empty
    pytest.param(Case(tokens=19, top_k=1, routing="one", path="prefill"), id="all_tokens_one_expert"),
    # all tokens to one expert on the decode path: one program does every pair
    pytest.param(Case(tokens=7, top_k=1, routing="one"), id="all_tokens_one_expert_decode"),
    # more slots than experts: most slots hold nothing this step and must be skipped
    pytest.param(Case(tokens=6, experts=3, slots=13, path="prefill"), id="unused_slots"),
    # experts scattered over a larger pool: slot ids are not expert ids (and exceed the expert count)
    pytest.param(Case(tokens=5, experts=5, slots=9, top_k=2), id="slot_ids_not_expert_ids"),
    # slabs padded beyond the expert's tensors: stride(0) of w1/w2 is neither N1*H nor H*I
    pytest.param(Case(tokens=4, slab_pad=24, bias=True, path="prefill"), id="slab_stride_with_padding"),
    # the same slot twice in one token's top-k: both contributions are summed
    pytest.param(Case(tokens=6, top_k=3, routing="dup"), id="duplicate_slots_in_token"),
    # gpt-oss activation (clamped swiglu with alpha) with both biases
    pytest.param(Case(activation="gpt_oss", bias=True), id="gpt_oss_with_bias"),
    pytest.param(Case(tokens=11, activation="gpt_oss", bias=True, path="prefill"), id="gpt_oss_with_bias_prefill"),
    # plain (non-gated) experts: relu(w1 x), w1 has I rows
    pytest.param(Case(activation="relu", glu=False), id="relu_not_glu"),
    pytest.param(Case(tokens=11, activation="relu", glu=False, path="prefill"), id="relu_not_glu_prefill"),
    # gated GELU variants (exact erf and tanh approximation)
    pytest.param(Case(activation="gelu"), id="gelu_glu"),
    pytest.param(Case(activation="gelu_tanh", bias=True, path="prefill"), id="gelu_tanh_glu_bias"),
    # decode path at a batch that fills its 32-row tile (8 tokens x 4)
    pytest.param(Case(tokens=8, top_k=4, experts=6), id="decode_path_full_tile"),
    # prefill path with 32-row blocks and several blocks per slot
    pytest.param(Case(tokens=40, top_k=2, experts=3, block_m=32, path="prefill"), id="prefill_path_multi_block"),
    # down GEMM's reduction split over 3 programs, bias added once
    pytest.param(Case(inter=40, bias=True, split_k=3), id="split_k_with_bias"),
    # int32 slot ids
    pytest.param(Case(tokens=6, slot_dtype=torch.int32, path="prefill"), id="int32_slot_ids"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case: Case, dtype: torch.dtype) -> None:
    inputs = make_inputs(case, dtype)
    out = moe_experts_triton(*inputs.args(case.fmt), config=case.config)
    ref = moe_experts_reference(*inputs.args(case.fmt))
    assert out.shape == inputs.hidden.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "an output element was never written (still NaN)"
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_default_launch_settings_match_reference(path: str) -> None:
    # No config passed: the launcher picks settings itself (tuned table or the logged default).
    case = Case(tokens=3 if path == "decode" else 40, hidden=48, inter=40)
    inputs = make_inputs(case, torch.float32)
    out = moe_experts_triton(*inputs.args(case.fmt))
    assert relative_error(out, moe_experts_reference(*inputs.args(case.fmt))) < TOLERANCE[torch.float32]


def test_triton_is_deterministic() -> None:
    case = Case(tokens=10, top_k=3, routing="dup", split_k=2, path="prefill")
    inputs = make_inputs(case, torch.float32)
    first = moe_experts_triton(*inputs.args(case.fmt), config=case.config)
    again = moe_experts_triton(*inputs.args(case.fmt), config=case.config)
    assert torch.equal(first, again)


def test_empty_batch_returns_empty_output() -> None:
    case = Case(tokens=0)
    inputs = make_inputs(case, torch.float32)
    for fn in (moe_experts_triton, moe_experts_reference):
        assert fn(*inputs.args(case.fmt)).shape == (0, case.hidden)


@pytest.mark.gpu
def test_bf16_mixtral_like_shape_on_gpu() -> None:
    # A larger bf16 problem with tuned or default settings on both paths (the real kernels, not the interpreter).
    for tokens in (1, 4, 64):
        case = Case(tokens=tokens, experts=8, hidden=1024, inter=704)
        inputs = make_inputs(case, torch.bfloat16)
        out = moe_experts_triton(*inputs.args(case.fmt))
        assert relative_error(out, moe_experts_reference(*inputs.args(case.fmt))) < TOLERANCE[torch.bfloat16]


def naive_moe_float64(inputs: Inputs, fmt: ExpertFormat) -> torch.Tensor:
    """One (token, j) at a time through the adapter's `expert_forward`, in float64 with no rounding."""
    tokens, top_k = inputs.slot_ids.shape
    out = torch.zeros(tokens, fmt.hidden_size, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            s = int(inputs.slot_ids[t, j])
            tensors = {"w1": inputs.w1[s], "w2": inputs.w2[s]}
            if fmt.has_bias:
                tensors |= {"b1": inputs.b1[s], "b2": inputs.b2[s]}
            tensors = {name: v.double().cpu() for name, v in tensors.items()}
            out[t] += float(inputs.weights[t, j]) * expert_forward(fmt, tensors, inputs.hidden[t].double().cpu())
    return out


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize(
    "case",
    [
        # gated silu with duplicate slots in a token
        pytest.param(Case(tokens=4, top_k=3, routing="dup"), id="silu_duplicates"),
        # gpt-oss activation with biases, large inputs so the clamps bite
        pytest.param(Case(tokens=3, activation="gpt_oss", bias=True), id="gpt_oss_bias"),
        # plain relu experts, odd sizes
        pytest.param(Case(tokens=3, activation="relu", glu=False, hidden=13, inter=7), id="relu_not_glu_odd"),
        # gated gelu variants
        pytest.param(Case(tokens=2, activation="gelu"), id="gelu"),
        pytest.param(Case(tokens=2, activation="gelu_tanh", bias=True), id="gelu_tanh_bias"),
    ],
)
def test_reference_matches_float64_per_token_loop(case: Case, dtype: torch.dtype) -> None:
    inputs = make_inputs(case, dtype, torch.device("cpu"))
    if case.activation == "gpt_oss":
        inputs.hidden.mul_(8.0)  # pushes gate and up past the +-7 clamp for some rows
    ref = moe_experts_reference(*inputs.args(case.fmt))
    assert relative_error(ref, naive_moe_float64(inputs, case.fmt)) < {torch.float32: 1e-6, torch.float16: 5e-3}[dtype]


def test_reference_matches_transformers_mixtral_experts() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    experts = MixtralExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    hidden = torch.randn(7, 32)
    index = torch.rand(7, 5).topk(2, dim=1).indices
    weights = torch.softmax(torch.randn(7, 2), dim=1)
    fmt = ExpertFormat(32, 24)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        ours = moe_experts_reference(hidden, index, weights, experts.gate_up_proj, experts.down_proj, fmt)
    assert relative_error(ours, expected) < 1e-6


def test_reference_matches_transformers_gpt_oss_experts() -> None:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    h, i, e = 32, 16, 4
    config = GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    experts = GptOssExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    # gpt-oss stores gate_up as [E, H, 2I] with gate and up interleaved; canonical is [E, 2I, H], gate first
    gate_up = experts.gate_up_proj.detach().transpose(1, 2)  # [E, 2I, H]
    w1 = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
    b1 = torch.cat([experts.gate_up_proj_bias[:, 0::2], experts.gate_up_proj_bias[:, 1::2]], dim=1).detach()
    w2 = experts.down_proj.detach().transpose(1, 2).contiguous()  # [E, H, I]
    hidden = torch.randn(6, h) * 4
    index = torch.rand(6, e).topk(2, dim=1).indices
    weights = torch.softmax(torch.randn(6, 2), dim=1)
    fmt = ExpertFormat(h, i, activation="gpt_oss", has_bias=True)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        ours = moe_experts_reference(hidden, index, weights, w1, w2, fmt, b1, experts.down_proj_bias.detach())
    assert relative_error(ours, expected) < 1e-6


def _bad(case: Case = Case(), **changes: object) -> tuple:
    """Valid fp32 CPU arguments with ``changes`` applied (names of `Inputs` fields, or fmt)."""
    inputs = make_inputs(case, torch.float32, torch.device("cpu"))
    args = dict(vars(inputs), fmt=case.fmt)
    args.update(changes)
    return (args["hidden"], args["slot_ids"], args["weights"], args["w1"], args["w2"], args["fmt"], args["b1"], args["b2"])


@pytest.mark.parametrize("fn", [moe_experts_reference, moe_experts_triton], ids=["reference", "triton"])
@pytest.mark.parametrize(
    "make_args, words",
    [
        # hidden width differs from fmt.hidden_size
        (lambda: _bad(hidden=torch.randn(5, 31)), r"hidden has shape \(5, 31\)"),
        # slot ids of another batch size
        (lambda: _bad(slot_ids=torch.zeros(4, 2, dtype=torch.int64)), "slot_ids has shape"),
        # router weights of another shape
        (lambda: _bad(weights=torch.rand(5, 3)), "weights has shape"),
        # float slot ids
        (lambda: _bad(slot_ids=torch.zeros(5, 2)), "int32 or int64"),
        # float64 is not a kernel dtype
        (lambda: _bad(hidden=torch.randn(5, 32, dtype=torch.float64)), "float32, float16 or bfloat16"),
        # weights in another dtype than the activations
        (lambda: _bad(w1=torch.randn(4, 32, 32, dtype=torch.float16)), "w1 dtype"),
        # w2 of the wrong shape
        (lambda: _bad(w2=torch.randn(4, 16, 32)), "w2 has shape"),
        # a transposed view: rows not contiguous
        (lambda: _bad(w2=torch.randn(4, 16, 32).transpose(1, 2)), "inner stride"),
        # slot id past the last slot
        (lambda: _bad(slot_ids=torch.full((5, 2), 4)), r"slot ids span \[4, 4\] but there are 4 slots"),
        # negative slot id
        (lambda: _bad(slot_ids=torch.full((5, 2), -1)), "slot ids span"),
        # biased format without biases
        (lambda: _bad(Case(bias=True), b1=None), "b1 is None"),
        # biases for an unbiased format
        (lambda: _bad(b1=torch.zeros(4, 32), b2=torch.zeros(4, 32)), "has_bias is False"),
    ],
)
def test_bad_inputs_raise_kernel_error_naming_the_fix(fn, make_args, words: str) -> None:
    with pytest.raises(KernelError, match=words):
        fn(*make_args())


def test_triton_on_cpu_without_interpreter_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs(Case(), torch.float32, torch.device("cpu"))
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        moe_experts_triton(*inputs.args(Case().fmt))


@pytest.mark.parametrize(
    "backend, env, device, expected",
    [
        ("auto", None, "cpu", "reference"),  # CPU tensors: the reference
        ("auto", None, "cuda", "triton"),  # CUDA tensors: Triton
        ("auto", "reference", "cuda", "reference"),  # PROPHET_KERNELS forces the reference
        ("auto", "triton", "cpu", "triton"),  # ... or Triton
        ("reference", "triton", "cuda", "reference"),  # an explicit backend beats the environment
        ("triton", None, "cpu", "triton"),
    ],
)
def test_backend_choice(monkeypatch, backend: str, env: str | None, device: str, expected: str) -> None:
    if env is None:
        monkeypatch.delenv("PROPHET_KERNELS", raising=False)
    else:
        monkeypatch.setenv("PROPHET_KERNELS", env)
    assert resolve_backend(backend, torch.device(device)) == expected


def test_unknown_backend_is_refused() -> None:
    inputs = make_inputs(Case(), torch.float32, torch.device("cpu"))
    with pytest.raises(KernelError, match="backend='cutlass'"):
        moe_experts(*inputs.args(Case().fmt), backend="cutlass")


def test_auto_backend_on_cpu_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROPHET_KERNELS", raising=False)
    case = replace(Case(), tokens=3)
    inputs = make_inputs(case, torch.float32, torch.device("cpu"))
    assert torch.equal(moe_experts(*inputs.args(case.fmt)), moe_experts_reference(*inputs.args(case.fmt)))


def test_activation_codes_match_the_kernels() -> None:
    from prophet.kernels import moe_kernels

    names = {"silu": "SILU", "gelu": "GELU", "gelu_tanh": "GELU_TANH", "relu": "RELU", "gpt_oss": "GPT_OSS"}
    assert {act: getattr(moe_kernels, const).value for act, const in names.items()} == moe.ACTIVATION_CODES


def test_module_imports_and_runs_the_reference_without_triton() -> None:
    # Triton blocked in a fresh interpreter: the reference works, the Triton backend says what to install.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from prophet.errors import KernelError\n"
        "from prophet.kernels.moe import moe_experts, moe_experts_triton\n"
        "from prophet.models.adapter import ExpertFormat\n"
        "fmt = ExpertFormat(8, 4)\n"
        "args = (torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1),\n"
        "        torch.randn(1, 8, 8), torch.randn(1, 8, 4), fmt)\n"
        "assert moe_experts(*args, backend='reference').shape == (2, 8)\n"
        "try:\n"
        "    moe_experts_triton(*args)\n"
        "except KernelError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "install triton" in out.stdout
