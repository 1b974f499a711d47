"""The Wan block's elementwise chains, each as the fewest eager kernels that keep diffusers' rounding.

Around its GEMMs and attention a block at 720p (75,600 tokens, dim 5120) moves the residual stream
through norms, modulation, gates and RoPE. Written as diffusers writes them (`x.float()`, an fp32
norm, an fp32 product, an fp32 sum, `.type_as(x)`), the modulated norm alone is 5 kernels and ~13 GB
of memory traffic per call on a bf16 stream, and a block's chains together move 104 GB in 48 kernels,
~1.4 s of a 12.5 s A14B forward on an H100; here 30 GB in 24 (bench/block_traffic.py counts both):

  * mixed-dtype elementwise ops compute in the promoted type (fp32) and store into an output of
    the stream's dtype in one kernel (`out=`), so `round(x + y * gate)` is one pass, not four;
  * torch's LayerNorm kernels accumulate in fp32 for bf16/fp16 input, so the norm reads the stream
    as it is instead of an fp32 copy of it;
  * the FFN's GELU runs in cuBLASLt's GEMM epilogue on CUDA.

In fp32 every function is diffusers' math up to summation order. In bf16 the modulated norm rounds
once more than diffusers (the normalised value, or the modulation vectors, are rounded to bf16
before the product): tests/test_elementwise.py bounds its error against an fp64 reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def addcmul_into(out: Tensor, a: Tensor, b: Tensor, c: Tensor, value: float = 1.0) -> Tensor:
    """out <- a + value * b * c, computed in the inputs' promoted dtype and rounded once into out's
    (which may be a strided view): one kernel on CUDA, reading the inputs and writing out (on CPU
    torch makes promoted temporaries first: the same values, more passes).

    Autograd records no op with an `out=` argument, so while a gradient is wanted (training the
    demo model) it is addcmul then a copy into out: the same rounding, one more pass.
    """
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or c.requires_grad):
        return out.copy_(torch.addcmul(a, b, c, value=value))
    return torch.addcmul(a, b, c, value=value, out=out)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm with fp32 statistics and affine, rounded once into the input's dtype.

    diffusers' FP32LayerNorm normalises `x.float()` and its caller rounds back with `.type_as(x)`;
    torch's kernel does the same for bf16/fp16 input (fp32 accumulation, one rounding at the store)
    without the fp32 copy of x and the fp32 output (~3 GB each per call at 720p). CUDA's kernel
    wants the weights in the input's dtype; the model holds them in its own, the stream's.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    def modulated(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """norm(x) * (1 + scale) + shift in x's dtype; x (B, L, D), shift and scale (B, 1 or L, D) fp32.

        One sample, one vector each (a whole-batch timestep): the modulation is the norm's affine,
        one kernel reading x and writing the result. Otherwise the norm, then one addcmul
        (per-token modulation as TI2V-5B's, or a batch of timesteps).
        """
        assert self.weight is None, "a modulated norm has no affine of its own"
        b, _, d = x.shape
        if b == 1 and shift.shape[1] == 1:
            w, bias = (1 + scale).reshape(d).to(x.dtype), shift.reshape(d).to(x.dtype)
            return F.layer_norm(x, self.normalized_shape, w, bias, self.eps)
        normed = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return addcmul_into(torch.empty_like(x), shift, normed, 1 + scale)


def linear_gelu(linear: nn.Linear, x: Tensor) -> Tensor:
    """gelu_tanh(linear(x)); on CUDA the GELU runs in the GEMM's epilogue (cuBLASLt GELU_BIAS, the
    tanh approximation), saving a read and a write of the (B, L, ffn_dim) activation.

    Only for plain weights: a float8 or other tensor-subclass weight (quant.py) goes through its
    module. On CPU `_addmm_activation` applies the exact erf GELU, not the tanh one Wan uses. Meta
    tensors (no values) take the CUDA path, so that bench/block_traffic.py counts what CUDA runs.
    """
    w, bias = linear.weight, linear.bias
    plain = type(w) in (torch.Tensor, nn.Parameter) and bias is not None and type(bias) in (torch.Tensor, nn.Parameter)
    if not (x.device.type in ("cuda", "meta") and plain and x.dtype == w.dtype):
        return F.gelu(linear(x), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)   # (B*L, ffn_dim)
    return out.view(*x.shape[:-1], -1)                                                      # (B, L, ffn_dim)
