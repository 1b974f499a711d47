"""GPU-only checks of the CUDA kernels paradit uses (skipped without CUDA).

On one GPU: every attention backend's output and log-sum-exp against an fp32 reference, a Ring
attention emulated block by block with the CUDA LSE kernel (uneven blocks) against full attention,
and the model in bf16 on CUDA against fp32 on the CPU. Multi-GPU layouts run through
bench/gpu_suite.sh and tests/test_parallel.py's layouts under NCCL when several GPUs are lent.
"""
import pytest
import torch

from paradit.config import WanConfig
from paradit.models.attention import BACKENDS, _flash_module, fa4_available, kernels, math_attention_lse, pick_backend
from paradit.models.transformer import WanTransformer
from paradit.parallel.collectives import lse_merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bf16 operands with fp32 accumulation: relative error ~3e-3 typical; 2e-2 leaves margin and is
# still far below a real bug (a wrong scale or a dropped block gives > 1e-1).
BF16_RTOL = 2e-2
INSTALLED = [b for b in BACKENDS if (b != "flash" or _flash_module()) and (b != "fa4" or fa4_available())]
if torch.cuda.is_available() and pick_backend("cuda", torch.bfloat16) == "auto":
    INSTALLED.append("auto")      # per shape: flash-attn-4 or cuDNN


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(s, h=8, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, s, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]


@pytest.mark.parametrize("backend", INSTALLED)
@pytest.mark.parametrize("seq", [1000, 4096, 11200])  # 11,200 x 8 heads: auto takes fa4
def test_attention_backends_with_lse(backend, seq):
    q, k, v = qkv(seq)
    ref_out, ref_lse = math_attention_lse(q.float(), k.float(), v.float())
    plain, with_lse = kernels(backend, "cuda")
    out, lse = with_lse(q, k, v)
    assert rel(plain(q, k, v), ref_out) < BF16_RTOL
    assert rel(out, ref_out) < BF16_RTOL
    assert lse.shape == ref_lse.shape and rel(lse, ref_lse) < 1e-3  # lse is accumulated in fp32


@pytest.mark.parametrize("backend", INSTALLED)
@pytest.mark.parametrize("batch", [1, 2])
def test_ring_merge_of_uneven_blocks_on_cuda(backend, batch):
    q, k, v = (t.expand(batch, -1, -1, -1).contiguous() for t in qkv(2000, seed=1))
    _, with_lse = kernels(backend, "cuda")
    out = lse = None
    for kb, vb in zip(k.split([700, 650, 650], 1), v.split([700, 650, 650], 1)):
        out, lse = lse_merge(out, lse, *with_lse(q, kb, vb))
    ref = math_attention_lse(q.float(), k.float(), v.float())[0]
    assert rel(out, ref) < BF16_RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sdpa_lse_kernel_per_dtype(dtype):
    """Ring's CUDA LSE kernel: cuDNN in bf16/fp16, the efficient kernel in fp32; odd, unequal
    query and key lengths (a Ring block of an uneven split)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(2, 999, 5, 128, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(2, 1003, 5, 128, device="cuda", generator=g).to(dtype) for _ in range(2))
    ref_out, ref_lse = math_attention_lse(q.float(), k.float(), v.float())
    out, lse = kernels("sdpa", "cuda")[1](q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert rel(out, ref_out) < (1e-4 if dtype == torch.float32 else BF16_RTOL)
    assert (lse - ref_lse).abs().max() < 1e-3


def test_model_bf16_cuda_matches_fp32_cpu():
    cfg = WanConfig.preset("tiny").replace(dim=512, num_heads=4, ffn_dim=1024, num_layers=2, text_dim=64)
    torch.manual_seed(0)
    model = WanTransformer(cfg).eval()
    x = torch.randn(1, 16, 3, 20, 28)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 16, 64)
    with torch.no_grad():
        ref = model(x, t, ctx)
        got = model.to("cuda", torch.bfloat16)(x.cuda(), t.cuda(), ctx.cuda())
    assert got.dtype == torch.bfloat16
    assert rel(got.float().cpu(), ref) < 5e-2  # bf16 weights and residual stream over 2 blocks


@pytest.mark.parametrize("backend", INSTALLED)
def test_compiled_model_matches_eager_under_each_backend(backend):
    """The attention seam under torch.compile (flash-attn-4 is an opaque custom op; auto's choice
    is made on static shapes while tracing): the compiled model gives the eager result."""
    from paradit.compile import compile_blocks
    from paradit.parallel.mesh import single_device_mesh
    from paradit.parallel.runtime import Runtime
    cfg = WanConfig.preset("tiny").replace(dim=512, num_heads=4, ffn_dim=1024, num_layers=2, text_dim=64)
    torch.manual_seed(0)
    model = WanTransformer(cfg).eval().to("cuda", torch.bfloat16)
    runtime = Runtime(single_device_mesh("cuda"), backend, torch.bfloat16)
    runtime.bind(model)
    x = torch.randn(1, 16, 3, 20, 28, device="cuda")
    t = torch.tensor([700.0], device="cuda")
    ctx = torch.randn(1, 16, 64, device="cuda")
    with torch.no_grad():
        eager = model(x.bfloat16(), t, ctx.bfloat16())
        compile_blocks([model])
        compiled = model(x.bfloat16(), t, ctx.bfloat16())
    assert rel(compiled.float(), eager.float()) < 1e-2
    assert runtime.kernels_ran()


def test_cudnn_fp8_attention_against_bf16():
    """cuDNN's FP8 SDPA (Hopper): e4m3 q, k, v, P and O with per-tensor scales. The error against
    the bf16 kernel is what FP8 costs here (bench/attention_kernels.py --fp8 reports it at full size:
    6% with unit-variance q, 11.5% with q x 4); at this shape it measured 0.100 on the H200. A wrong
    scale or layout gives an error of order 1."""
    from paradit.models import quant
    if quant.cudnn_fp8_attention_missing("cuda"):
        pytest.skip("needs " + "; ".join(quant.cudnn_fp8_attention_missing("cuda")))
    q, k, v = qkv(3000, h=8)
    q = q * 4                                    # a peakier softmax than unit-variance scores give
    ref = math_attention_lse(q.float(), k.float(), v.float())[0]
    got = quant.cudnn_fp8_attention(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert rel(got, ref) < 0.2
