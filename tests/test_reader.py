"""The weight reader: several threads, either source (pread, mmap), direct or through the staging
slots piece by piece with the cast after the copy, equal a plain safetensors load; on 4 gloo ranks
of one node each rank reads a quarter of the bytes and every rank ends with all weights."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from paradit.checkpoint import save_diffusers_layout
from paradit.launch import spawn
from paradit.models.loading import index_checkpoint, read_tensors
from paradit.models.reader import Reader, header
from paradit.parallel.weights import shares
from paradit.pipeline import tiny_components
from reader_workers import shared_load
from workers import tiny_config


def write_expert(folder: Path) -> Path:
    cfg = tiny_config(heads=4)
    (expert, _), _, _ = tiny_components(cfg.replace(boundary=0.875), "cpu", torch.float32)
    save_diffusers_layout(expert, folder, max_shard_bytes=20_000)     # several shards
    return folder


def stored_bytes(folder: Path) -> int:
    return sum(e.nbytes for f in folder.glob("*.safetensors") for e in header(f).values())


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    return write_expert(tmp_path_factory.mktemp("expert"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_equal_a_plain_load(expert, dtype):
    index = index_checkpoint(expert)
    names = sorted(index.files)
    stats = {}
    got = read_tensors(index, names, dtype, "cpu", threads=3, stats=stats)
    plain = {}
    for f in expert.glob("*.safetensors"):
        plain |= load_file(f)
    assert len(plain) == len(names) and stats["bytes"] == stored_bytes(expert)
    for name in names:
        ref = plain[index.files[name][1]]
        assert got[name].dtype == dtype and torch.equal(got[name], ref.to(dtype)), name


@pytest.mark.parametrize("source", ["pread", "mmap"])
@pytest.mark.parametrize("staged", [False, True])
def test_sources_and_staging_equal_a_plain_load(expert, tmp_path, source, staged):
    """staged: the CUDA path's piece loop on the CPU, with 4 kB slots so that tensors span several
    pieces and the bf16 / fp16 casts run piece by piece after the copy."""
    odd = {"bf16": torch.randn(3, 1000).bfloat16(), "i64": torch.arange(7), "empty": torch.empty(0, 5),
           "scalar": torch.tensor(2.5), "mask": torch.tensor([True, False, True])}
    save_file(odd, tmp_path / "odd.safetensors")
    files = [*expert.glob("*.safetensors"), tmp_path / "odd.safetensors"]
    entries = {k: e for f in files for k, e in header(f).items()}
    plain = {k: t for f in files for k, t in load_file(f).items()}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dtypes = {k: dtype if e.dtype.is_floating_point else e.dtype for k, e in entries.items()}
        stats = {}
        with Reader("cpu", threads=2, source=source, staged=staged, stage_bytes=4096) as reader:
            got = reader.read(entries, dtypes, stats)
        assert stats["bytes"] == sum(e.nbytes for e in entries.values())
        for k, ref in plain.items():
            assert got[k].dtype == dtypes[k] and torch.equal(got[k], ref.to(dtypes[k])), (k, dtype)


def test_shares_balance_bytes(expert):
    entries = {k: e for f in expert.glob("*.safetensors") for k, e in header(f).items()}
    parts = shares(entries, 4)
    assert sorted(n for p in parts for n in p) == sorted(entries)      # each tensor read exactly once
    loads = [sum(entries[n].nbytes for n in p) for p in parts]
    assert max(loads) - min(loads) <= max(e.nbytes for e in entries.values())


def test_four_ranks_read_the_files_once_between_them(expert):
    total = stored_bytes(expert)
    results = spawn(shared_load, 4, str(expert))
    assert all(r["same"] and r["keys"] for r in results)             # every rank: the plain load's weights
    assert sum(r["bytes"] for r in results) == total                  # the node read each byte once
    for r in results:
        assert r["bytes"] + r["received"] == total
        assert r["bytes"] < 0.35 * total                              # about a quarter each


class Doubled:
    """A transform (the LoraMerge interface) of some tensors: x2, a new tensor, on the tensor's device."""

    def __init__(self, names):
        self.names, self.calls = frozenset(names), []

    def __call__(self, name, t):
        self.calls.append(name)
        return t * 2


@pytest.mark.parametrize("staged", [False, True])
def test_reads_into_given_buffers_and_transforms_as_it_reads(expert, staged):
    """out=: the caller's destinations (an offloaded expert's host buffer, one flat allocation with
    a view per tensor) are filled in place, casts included; the transform's tensors come back into
    them. staged: the path a host destination takes through the GPU, with the CPU standing in."""
    entries = {k: e for f in expert.glob("*.safetensors") for k, e in header(f).items()}
    plain = {k: t for f in expert.glob("*.safetensors") for k, t in load_file(f).items()}
    names = sorted(entries)
    for dtype in (torch.float32, torch.bfloat16):
        dtypes = dict.fromkeys(names, dtype)
        flat = torch.full((sum(entries[n].nbytes for n in names),), 7, dtype=torch.uint8)
        out, at = {}, 0
        for n in names:
            size = entries[n].nbytes * dtype.itemsize // entries[n].dtype.itemsize
            out[n] = flat[at:at + size].view(dtype).view(entries[n].shape)
            at += size
        changed = Doubled(names[::3])
        with Reader("cpu", threads=3, staged=staged, stage_bytes=4096) as reader:
            got = reader.read(entries, dtypes, out=out, transform=changed)
        assert sorted(changed.calls) == sorted(changed.names)                 # each once
        for n in names:
            assert got[n].data_ptr() == out[n].data_ptr(), n                   # in the given memory
            want = plain[n].to(dtype) * (2 if n in changed.names else 1)
            assert torch.equal(got[n], want), (n, dtype)


def test_quick_gil_handoff_is_set_inside_and_restored_after():
    """The loader's reads beside flash-attn-4's kernel build: the GIL switch interval is short while
    they run, and what it was afterwards, an error included."""
    import sys

    from paradit.models.reader import quick_gil_handoff
    before = sys.getswitchinterval()
    with pytest.raises(KeyError):
        with quick_gil_handoff(2e-4):
            assert sys.getswitchinterval() == pytest.approx(2e-4)
            raise KeyError("a failed read")
    assert sys.getswitchinterval() == before
