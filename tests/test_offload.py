"""Offload: the residency schedule, the host copies' mechanics on the CPU, and the pipeline's
results with and without offload (equal bit for bit: offload moves weights, it computes nothing)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_workers import write_checkpoint
from paradit.config import WanConfig
from paradit.generate import failure, parse_args
from paradit.models.build import build_on_meta
from paradit.models.lora import LoraSpec
from paradit.models.transformer import WanTransformer
from paradit.offload import ExpertResidency, HostWeights, host_weights_of, offload_on_load
from paradit.settings import ChordsSettings
from paradit.pipeline import Pipeline
from paradit.residency import Action, residency_at, residency_plan
from paradit.schedulers.schedule import high_noise_steps

KW = dict(negative_prompt="blurry", steps=8, seed=3, progress=False, output="latent")
PROMPT = "a red circle moving left"


# ------------------------------------------------------------------ the schedule (pure)
def test_plan_releases_then_streams_at_the_switch():
    seq = [0] * 26 + [1] * 14                    # T2V-A14B, 40 steps: 26 high-noise steps
    plan = residency_plan(seq)
    assert plan == [Action("before", 0, "prefetch", 0), Action("after", 25, "release", 0),
                    Action("before", 26, "prefetch", 1), Action("after", 39, "release", 1),
                    Action("after", 39, "prefetch", 0)]
    assert residency_at(plan, 40) == [{0}] * 26 + [{1}] * 14     # never both on the GPU


@pytest.mark.parametrize("lead", [1, 3])
def test_plan_prefetches_lead_evaluations_ahead(lead):
    seq = [0] * 6 + [1] * 4
    plan = residency_plan(seq, lead)
    assert Action("before", 6 - lead, "prefetch", 1) in plan
    assert Action("after", 5, "release", 0) in plan               # after its last step, not before
    assert residency_at(plan, 10) == [{0}] * (6 - lead) + [{0, 1}] * lead + [{1}] * 4


def test_plan_of_one_expert_keeps_it():
    assert residency_plan([0, 0, 0]) == [Action("before", 0, "prefetch", 0)]
    assert residency_plan([]) == []


def test_plan_refuses_alternating_experts():
    with pytest.raises(ValueError, match="switch expert at most once.*3 times"):
        residency_plan([0, 1, 0, 1])
    with pytest.raises(ValueError, match="lead"):
        residency_plan([0, 1], lead=-1)


# ------------------------------------------------------------------ the mechanics on the CPU
def test_host_weights_copy_and_release_keep_tied_tensors_tied():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4)).eval()
    model[2].weight = model[0].weight                              # tied: one tensor, two names
    x = torch.randn(3, 4)
    ref = model(x)
    unique = {id(t) for t in [*model.parameters(), *model.buffers()]}
    w = HostWeights(model, "cpu", chunks=[model[2]])
    assert len(w.host) == len(unique) == 8 and len(w.chunks) == 2
    on_host = {h.data_ptr() for h in w.host}
    ptrs = lambda: [t.data_ptr() for t in [*model.parameters(), *model.buffers()]]  # noqa: E731
    assert set(ptrs()) == on_host and not w.resident
    assert w.to_device() == [] and w.resident                      # the CPU: no stream, no events
    assert not set(ptrs()) & on_host                               # every tensor is a fresh copy
    assert model[2].weight.data_ptr() == model[0].weight.data_ptr()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)      # a copy: the same numbers
    w.release()
    assert set(ptrs()) == on_host and not w.resident
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_host_buffers_of_a_meta_built_expert():
    """The layout an offloaded expert is read into: one buffer per chunk (the embeddings and other
    loose tensors, each block, the head), every tensor a 256-byte-aligned view of its dtype and shape
    that no other tensor overlaps, the module pointed at them."""
    cfg = WanConfig.preset("tiny")
    model = build_on_meta(lambda: WanTransformer(cfg)).to(torch.bfloat16)
    views = offload_on_load("cpu")(model)
    w = host_weights_of(model)
    assert len(w.buffers) == 1 + cfg.num_layers + 1 and w.bytes == sum(b.tensor.numel() for b in w.buffers)
    assert w.chunk_modules == [None, *model.blocks, model.head]
    state = model.state_dict()
    assert views.keys() == state.keys() and not any(t.is_meta for t in state.values())
    for c, ids in enumerate(w.chunks):
        spans = sorted(w.ranges[i] for i in ids)
        assert all(a % 256 == 0 for a, _ in spans) and all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
        base = w.buffers[c].tensor.data_ptr()
        assert all(w.host[i].data_ptr() == base + w.ranges[i][0] for i in ids)
    for name, t in state.items():
        assert t.dtype == torch.bfloat16 and t.data_ptr() == views[name].data_ptr(), name
    block = {p.data_ptr() for p in model.blocks[1].parameters()}          # block 1: chunk 2's buffer
    assert block == {w.host[i].data_ptr() for i in w.chunks[2]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("offload_ckpt"))


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from lora_distill import write
    from ckpt_workers import TINY_T2V
    return Path(write(TINY_T2V, tmp_path_factory.mktemp("offload_lora"), 4, torch.float32, 0)["high_noise"]["path"])


@pytest.mark.parametrize("with_lora", [False, True])
def test_offloaded_experts_are_read_straight_into_their_host_buffers(folder, lora, with_lora):
    """From a checkpoint, offload='all' reads each expert and the text encoder into their host buffers
    as they load (no second copy at apply_offload), LoRAs merged on the way; the latent is the resident
    run's, bit for bit."""
    loras = [LoraSpec(lora, 0.8, "high"), LoraSpec(lora, 1.2, "low")] if with_lora else []
    kw = dict(KW, width=80, height=48, frames=5, steps=3)
    ref = Pipeline.from_pretrained(str(folder), loras=loras)(PROMPT, **kw)
    pipe = Pipeline.from_pretrained(str(folder), offload="all", loras=loras)
    text = pipe.text_encoder.model
    assert pipe.text_residency.weights is host_weights_of(text)
    assert len(pipe.text_residency.weights.buffers) == 1 + len(text.encoder.block)
    assert text.shared.weight.data_ptr() == text.encoder.embed_tokens.weight.data_ptr()     # still tied
    assert pipe.startup["host_buffers_s"] > 0 and ("lora_merge_s" in pipe.startup) == with_lora
    for k, expert in enumerate(pipe.experts):
        w = pipe.residency.weights[k]
        assert w is host_weights_of(expert) and not w.resident
        held = [(b.tensor.data_ptr(), b.tensor.data_ptr() + b.tensor.numel()) for b in w.buffers]
        assert all(any(a <= p.data_ptr() < b for a, b in held) for p in expert.parameters())
    assert torch.equal(pipe(PROMPT, **kw), ref)
    if with_lora:   # the LoRAs changed the weights: the reference is not the plain model's
        assert not torch.equal(Pipeline.from_pretrained(str(folder))(PROMPT, **kw), ref)


def test_residency_outside_a_request_swaps_on_demand():
    pipe = Pipeline.from_pretrained("tiny")
    r = ExpertResidency(pipe.experts, "cpu")
    assert r.active and r.resident == set()
    r.before(1)
    r.after(1)
    assert r.resident == {1}
    r.before(0)
    assert r.resident == {0} and r.log == [(0, "prefetch", 1), (0, "release", 1), (0, "prefetch", 0)]


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def reference():
    return Pipeline.from_pretrained("tiny")(PROMPT, **KW)


def test_offload_all_same_latent_and_residency_per_step(reference):
    pipe = Pipeline.from_pretrained("tiny", offload="all")
    n_high = high_noise_steps(pipe.cfg.boundary, 8, pipe.cfg.shift)
    assert 0 < n_high < 8
    for _ in range(2):                                             # the second request starts warm
        latent = pipe(PROMPT, **KW)
        assert torch.equal(latent, reference)
        assert pipe.record.residency == [(0,)] * n_high + [(1,)] * (8 - n_high)
    # between requests: the low expert released, the high one already back for the next request
    assert pipe.residency.resident == {0}
    assert not pipe.residency.weights[1].resident and pipe.residency.weights[0].resident
    log = pipe.residency.log
    assert log[:5] == [(0, "prefetch", 0), (n_high - 1, "release", 0), (n_high, "prefetch", 1),
                       (7, "release", 1), (7, "prefetch", 0)]
    assert log[5:] == log[1:5]                                     # request 2: no copy at its start
    te = pipe.text_residency    # copied in for the first request, back out; the second's prompts are cached
    assert te.copies == 1 and not te.weights.resident
    assert list(pipe.text_encoder.cache) == [PROMPT, KW["negative_prompt"]]
    assert len(te.weights.buffers) == 1 + len(pipe.text_encoder.model.encoder.block)   # a buffer per block
    held = {p.data_ptr() for p in pipe.text_encoder.model.parameters()}
    assert held <= {h.data_ptr() for h in te.weights.host}


def test_chords_cores_in_turn_refuse_expert_offload_before_any_step(reference):
    pipe = Pipeline.from_pretrained("tiny", offload="experts")
    assert pipe.text_residency is None
    with pytest.raises(ValueError, match="at most once"):
        pipe(PROMPT, chords=ChordsSettings(4), **KW)
    assert pipe.record.trace == []                                 # nothing ran
    assert torch.equal(pipe(PROMPT, **KW), reference)              # and the pipeline still works


def test_bad_mode():
    with pytest.raises(ValueError, match="offload='gpu'.*auto, none, text-encoder, experts, all"):
        Pipeline.from_pretrained("tiny", offload="gpu")


def test_auto_is_none_on_the_cpu():
    assert Pipeline.from_pretrained("tiny", offload="auto").offload == "none"


def test_cli_offload_all(tmp_path):
    out = tmp_path / "v.mp4"
    run = subprocess.run([sys.executable, "-m", "paradit.generate", "--model", "tiny", "--offload", "all",
                          "--steps", "2", "--size", "64x64", "--frames", "5", "--no-progress", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["offload"] == "all"
    with pytest.raises(ValueError, match=r"--offload invalid choice: 'gpu' \(choose from") as err:
        parse_args(["--offload", "gpu"])                           # exit 2, the choices named
    assert failure(err.value)[0] == 2


def test_startup_bench_at_the_tiny_preset(tmp_path):
    # bench/startup.py end to end on the CPU: a tiny checkpoint, each component, the start-up, steps
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import startup
    assert startup.main(["tiny", "--device", "cpu", "--steps", "3", "--size", "64x64", "--frames", "5",
                         "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*_startup.json")
    data = json.loads(path.read_text())
    assert set(data["alone"]) == {"experts", "text_encoder", "vae"}
    assert all(part["s"] > 0 and part["bytes"] > 0 for part in data["alone"].values())
    assert data["startup"]["bytes"] > 0 and data["startup"]["phases_s"]["weights_s"] > 0
    none, experts = data["steps"]
    assert (none["offload"], experts["offload"]) == ("none", "experts")
    assert len(none["steps_s"]) == len(experts["steps_s"]) == 3
    assert none["experts"] == experts["experts"] and experts["switch_index"] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked host memory needs CUDA")
def test_pinned_host_weights_on_cuda_round_trip():
    from paradit.offload import PinnedBuffer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 5)).to(torch.bfloat16).cuda()
    x = torch.randn(4, 300, dtype=torch.bfloat16, device="cuda")
    ref = model(x)
    w = HostWeights(model, "cuda", chunks=[model[1]])
    # registered with the driver, one registration per buffer (torch's is_pinned() knows only its own blocks)
    assert len(w.buffers) == 2 and all(isinstance(b, PinnedBuffer) and b._registered for b in w.buffers)
    assert all(not p.is_cuda for p in model.parameters())
    stream = torch.cuda.Stream()
    events = w.to_device(stream)
    assert len(events) == 2
    for ev in events:
        torch.cuda.current_stream().wait_event(ev)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)      # a copy: the same numbers
    w.release()
    assert all(not p.is_cuda for p in model.parameters())
    w.buffers[0].close()
    assert w.buffers[0]._registered is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked host memory needs CUDA")
def test_a_chunk_larger_than_a_fault_piece_copies_in_one_transfer():
    """The text encoder's crash (CUDA error: invalid argument in to_device): a buffer over 1 GiB was
    registered in 1 GiB pieces, and one copy spanning two registrations is refused by the driver."""
    from paradit.models.reader import PinnedBuffer
    emb = torch.nn.Embedding(5 * 2**20, 128, dtype=torch.bfloat16)      # 1.25 GiB, one chunk
    torch.nn.init.normal_(emb.weight)
    ref = emb.weight.detach().clone()
    w = HostWeights(emb, "cuda")
    assert w.bytes > PinnedBuffer.PIECE and len(w.buffers) == 1
    assert w.to_device() == []                                     # the compute stream, as the text encoder
    assert emb.weight.is_cuda and torch.equal(emb.weight.cpu(), ref)


class FakeDriver:
    """cudaHostRegister / cudaHostUnregister recorded, for the page-locking order on the CPU."""

    def __init__(self):
        self.calls = []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size))
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


@pytest.mark.parametrize("pin_first", [False, True], ids=["pinned-once-filled", "pinned-first"])
def test_offloaded_expert_is_page_locked_after_the_read_fills_it(folder, monkeypatch, pin_first):
    """An offloaded expert's buffers: allocated without page-locking, filled by the reader (whose
    writes fault the pages in), then each registered once, whole, its contents kept (no zeroing
    after the read); pin=True (an expert with LoRAs) registers them before the read instead. The
    driver is a recorder here; the weights are the plain load's."""
    from paradit.models.loading import load_transformer
    from paradit.offload import then_pinned
    driver = FakeDriver()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: driver)
    path = folder / "transformer"
    model = then_pinned(load_transformer, path, host=offload_on_load("cuda", pin=pin_first))
    weights = host_weights_of(model)
    spans = sorted((b.tensor.data_ptr(), b.tensor.numel()) for b in weights.buffers)
    registered = sorted((ptr, size) for op, ptr, size in driver.calls if op == "register")
    assert registered == spans and weights.pinned                     # each buffer once, whole
    plain = load_transformer(path).state_dict()
    assert all(torch.equal(t, plain[n]) for n, t in model.state_dict().items())
    assert weights.pin() >= 0 and len(driver.calls) == len(spans)     # pinned already: nothing more
