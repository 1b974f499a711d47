"""GPU-only checks of the CUDA kernels paradit uses (skipped without CUDA).

On one GPU: every attention backend's output and log-sum-exp against an fp32 reference, a Ring
attention emulated block by block with the CUDA LSE kernel (uneven blocks) against full attention,
and the model in bf16 on CUDA against fp32 on the CPU. Multi-GPU layouts run through
bench/gpu_suite.sh and tests/test_parallel.py's layouts under NCCL when several GPUs are lent.
"""
import pytest
import torch

from paradit.config import WanConfig
from paradit.models.attention import BACKENDS, _flash_module, fa4_available, kernels, math_attention_lse
from paradit.models.transformer import WanTransformer
from paradit.parallel.collectives import lse_merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bf16 operands with fp32 accumulation: relative error ~3e-3 typical; 2e-2 leaves margin and is
# still far below a real bug (a wrong scale or a dropped block gives > 1e-1).
BF16_RTOL = 2e-2
INSTALLED = [b for b in BACKENDS if (b != "flash" or _flash_module()) and (b != "fa4" or fa4_available())]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(s, h=8, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, s, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]


@pytest.mark.parametrize("backend", INSTALLED)
@pytest.mark.parametrize("seq", [1000, 4096])
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
