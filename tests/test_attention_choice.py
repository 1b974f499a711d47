"""How the attention backend is chosen (CPU: shapes on the meta device, no kernel runs).

`auto` on Hopper/Blackwell with flash-attn-4 picks per call shape (models/attention.PerShape,
threshold FA4_MIN_WORK from the H200 table); a requested backend that cannot run is an error."""
import os
import pytest
import torch

from paradit.models import attention
from paradit.models.attention import FA4_MIN_WORK, PerShape, pick_backend


def meta(b, s, h, d=128):
    return torch.empty(b, s, h, d, device="meta", dtype=torch.bfloat16)


def test_per_shape_takes_fa4_from_the_measured_crossover_and_records_each_shape():
    choice = PerShape()
    small_q, small_k = meta(1, 4095, 40), meta(1, 4095, 40)      # R8 at 480p, B=1: cuDNN won there
    big_q, big_k = meta(2, 4095, 40), meta(2, 4095, 40)          # the same block at B=2: fa4 won
    assert 1 * 40 * 4095 * 4095 < FA4_MIN_WORK <= 2 * 40 * 4095 * 4095
    assert not choice._fa4(small_q, small_k)
    assert choice._fa4(big_q, big_k)
    assert choice._fa4(meta(1, 75600, 5), meta(1, 75600, 5))     # U8 at 720p
    assert choice.ran == {"B1 H40 q4095 k4095 d128": "cuDNN", "B2 H40 q4095 k4095 d128": "flash-attn-4",
                          "B1 H5 q75600 k75600 d128": "flash-attn-4"}


def test_auto_on_cpu_is_sdpa_and_fa4_without_its_package_is_refused(monkeypatch):
    assert pick_backend("cpu", torch.float32) == "sdpa"
    monkeypatch.setattr(attention, "fa4_available", lambda: False)
    with pytest.raises(ValueError, match="'fa4' needs CUDA and the flash-attn-4 package"):
        pick_backend("cpu", torch.float32, "fa4")


def test_fa4_refuses_fp32(monkeypatch):
    monkeypatch.setattr(attention, "fa4_available", lambda: True)
    with pytest.raises(ValueError, match="bf16/fp16 only"):
        pick_backend("cuda", torch.float32, "fa4")


def test_fa4_op_has_shapes_for_torch_compile():
    out, lse = attention._fa4_shapes(meta(2, 10, 3), meta(2, 12, 3), meta(2, 12, 3))
    assert out.shape == (2, 10, 3, 128) and lse.shape == (2, 3, 10) and lse.dtype == torch.float32


def test_fa4_is_imported_with_its_kernel_cache_on_unless_the_environment_says(monkeypatch):
    """flash-attn-4 reads FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED when first imported: paradit turns
    its on-disk kernel cache on there (the start-up's 6-9 s compile paid once per machine), and
    leaves a value the user set. A stand-in module records what the import saw."""
    import sys
    import types

    from paradit.models import attention
    seen = []
    fake = types.ModuleType("flash_attn.cute")
    fake.flash_attn_func = lambda q, k, v, return_lse: (q.clone(), q.new_zeros(q.shape[0], q.shape[2], q.shape[1]))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", fake)
    q = torch.zeros(1, 4, 2, 8)
    for preset, want in ((None, "1"), ("0", "0")):
        if preset is None:
            monkeypatch.delenv(attention.FA4_CACHE_ENV, raising=False)
        else:
            monkeypatch.setenv(attention.FA4_CACHE_ENV, preset)
        attention._fa4_func()
        seen.append(os.environ[attention.FA4_CACHE_ENV])
    assert seen == ["1", "0"]
    out, lse = attention._fa4_op(q, q, q)                  # the op goes through the same import
    assert out.shape == q.shape and lse.shape == (1, 2, 4)
