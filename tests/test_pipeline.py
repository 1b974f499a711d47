"""The single-process pipeline: determinism, the expert switch, batched CFG, bad input."""
import pytest
import torch

from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.models.transformer import patchify, token_grid
from paradit.parallel.collectives import cfg_combine
from paradit.pipeline import Pipeline, VideoSettings

KW = dict(negative_prompt="blurry", steps=8, seed=3, progress=False)
PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("tiny")


def test_deterministic_under_a_seed(pipe):
    a = pipe(PROMPT, output="latent", **KW)
    b = pipe(PROMPT, output="latent", **KW)
    c = pipe(PROMPT, output="latent", **(KW | dict(seed=4)))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-2


def test_experts_switch_at_the_boundary(pipe):
    pipe(PROMPT, output="latent", **KW)
    trace = pipe.record.trace
    assert [t for t, _, _ in trace][:3] == [999, 988, 972]
    assert all((k == 0) == (t >= 875) for t, k, _ in trace)
    assert {k for _, k, _ in trace} == {0, 1}
    assert all(g == (4.0 if k == 0 else 3.0) for _, k, g in trace)  # per-expert guidance (high, low)


def test_each_expert_runs_exactly_its_steps(pipe):
    ran = []
    hooks = [m.blocks[0].register_forward_hook(lambda mod, i, o, k=k: ran.append(k))
             for k, m in enumerate(pipe.experts)]
    try:
        pipe(PROMPT, output="latent", **KW)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [k for _, k, _ in pipe.record.trace]  # one batched-CFG forward per step, right expert


def test_batched_cfg_equals_two_forwards(pipe):
    cfg = pipe.cfg
    latent = torch.randn(cfg.latent_shape(64, 48, 9), generator=torch.Generator().manual_seed(0))
    grid = token_grid(latent.shape, cfg.patch)
    x = patchify(latent[None], cfg.patch)[0]
    cond, uncond = pipe.encode_prompts("a blue square moving up", "blurry", (4.0, 3.0))
    t = torch.tensor(950.0)
    v = pipe.runtime.velocity(pipe.experts[0], x, t, cond, uncond, 4.0, grid)
    model = pipe.experts[0]
    vc = model.forward_tokens(x[None], t.reshape(1, 1), cond, grid)[0]
    vu = model.forward_tokens(x[None], t.reshape(1, 1), uncond, grid)[0]
    # a batch of 2 against two batches of 1: identical math; fp32 GEMMs may block differently per
    # batch size, so single elements near zero can differ by ~1e-6: compare relative norms (~1e-7)
    ref = cfg_combine(vc, vu, 4.0)
    assert ((v - ref).norm() / ref.norm()).item() < 1e-5
    assert (vc - vu).abs().mean() > 1e-3  # the two prompts really differ


def test_outputs(pipe):
    video = pipe(PROMPT, **KW)
    assert video.dtype == torch.uint8 and video.shape == (9, 64, 64, 3)
    latent = pipe(PROMPT, output="latent", **KW)
    assert latent.dtype == torch.float32 and latent.shape == (16, 3, 8, 8)


A14B, TI2V = WanConfig.preset("wan2.2-t2v-a14b"), WanConfig.preset("wan2.2-ti2v-5b")


@pytest.mark.parametrize("cfg,kw,message", [
    (A14B, dict(width=1280, height=700), "multiples of 16"),
    (A14B, dict(width=1000, height=720), "multiples of 16"),
    (TI2V, dict(width=1280, height=720), "multiples of 32"),
    (A14B, dict(frames=80), "4k\\+1"),
    (A14B, dict(frames=0), "4k\\+1"),
    (A14B, dict(steps=0), "steps"),
    (A14B, dict(shift=0.0), "shift"),
    (A14B, dict(guidance=(1.0, 2.0, 3.0)), "guidance"),
    (A14B, dict(sampler="ddim"), "sampler"),
])
def test_bad_video_settings(cfg, kw, message):
    with pytest.raises(ValueError, match=message):
        VideoSettings.resolve(cfg, **kw)


@pytest.mark.parametrize("kw,message", [
    (dict(prompt=None), r"^prompt=None: must be text \(a str\)"),              # was TypeError: NoneType ... iterable
    (dict(prompt=["a red circle"]), r"^prompt=\['a red circle'\]: must be text"),  # was TypeError: unhashable
    (dict(prompt=b"a red circle"), r"^prompt=b'a red circle': must be text"),
    (dict(prompt="  &nbsp; "), r"^prompt='  &nbsp; ': empty after removing whitespace; describe the video"),  # ran
    (dict(prompt="a red \udce9 circle"), r"^prompt='a red \\udce9 circle': not valid UTF-8 \(a lone surrogate "
                                          r"at position 6\)"),            # was TypeError: TextEncodeInput must be ...
    (dict(prompt="a red circle", negative_prompt=3), r"^negative_prompt=3: must be text"),
])
def test_bad_prompts_are_named(pipe, kw, message):
    """The CLI and the service refused these with the field named; the library raised the tokenizer's
    TypeError, or generated from a blank prompt."""
    with pytest.raises(ParameterError, match=message):
        pipe(**kw, steps=1, output="latent", progress=False)


def test_bad_stream_items_are_named(pipe):
    """pipe.stream([3]) raised 'cannot unpack non-iterable int object'; stream("a prompt") 'not enough values
    to unpack'."""
    with pytest.raises(ParameterError, match=r"^prompts\[0\]=3: give \(prompt, negative_prompt, settings"):
        pipe.stream([3])
    with pytest.raises(ParameterError, match=r"^prompts\[0\]='a'"):
        pipe.stream("a red circle")
    ok = (PROMPT, None, VideoSettings.resolve(pipe.cfg, steps=1))
    with pytest.raises(ParameterError, match=r"^prompts\[1\]=\('b', None, 5\): .*VideoSettings"):
        pipe.stream([ok, ("b", None, 5)], progress=False)


def test_preset_defaults():
    s = VideoSettings.resolve(A14B)
    assert (s.width, s.height, s.frames, s.steps, s.shift, s.guidance) == (1280, 720, 81, 40, 12.0, (4.0, 3.0))
    assert A14B.num_tokens(1280, 720, 81) == 75_600 and A14B.num_tokens(832, 480, 81) == 32_760


def test_unknown_preset_and_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset"):
        WanConfig.preset("wan9")
    with pytest.raises(ParameterError, match=r"^model='.*missing': not a preset name and not a checkpoint"):
        Pipeline.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ParameterError, match=r"^model='.*': not a Wan checkpoint: expected model_index.json"):
        Pipeline.from_pretrained(str(tmp_path))


def test_a_prompt_longer_than_the_text_length_is_cut_with_a_warning():
    import logging

    from paradit.models.text_encoder import TextEncoder

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("paradit")
    logger.addHandler(handler)
    try:
        enc = TextEncoder.tiny(32, text_len=6)
        short = enc.encode(["a red circle"])                                  # 3 words + EOS: fits
        assert records == []
        long = enc.encode(["a red circle moving left slowly over the plain background"])
    finally:
        logger.removeHandler(handler)
    (rec,) = records
    assert rec.levelno == logging.WARNING and "11 tokens" in rec.getMessage() and "last 5 are cut" in rec.getMessage()
    assert short.shape == long.shape == (1, 6, 32)


def test_prompts_are_encoded_alone_and_cached():
    """TextEncoder.embed, what a request calls: each prompt encoded alone (the same embedding whatever
    it comes with), repeated prompts taken from the LRU, the model's context entered only when a
    prompt is missing; warm_up caches the default negative prompt."""
    import contextlib

    from paradit.models.text_encoder import TextEncoder

    enc = TextEncoder.tiny(32, text_len=16)
    entered = []

    @contextlib.contextmanager
    def on_device():
        entered.append(1)
        yield

    negative = WanConfig.preset("tiny").negative_prompt
    assert enc.warm_up(negative) > 0 and list(enc.cache) == [negative]
    both = enc.embed([PROMPT, negative], on_device)
    assert len(entered) == 1 and list(enc.cache) == [PROMPT, negative]             # only PROMPT was encoded
    assert torch.equal(both, torch.cat([enc.encode([PROMPT]), enc.encode([negative])]))
    assert torch.equal(enc.embed([PROMPT, negative], on_device), both) and len(entered) == 1   # both cached
    for i in range(enc.CACHED_PROMPTS):                              # PROMPT last used: evicted first
        enc.embed([f"a red circle {i}"])
    assert PROMPT not in enc.cache and len(enc.cache) == enc.CACHED_PROMPTS
    assert torch.equal(enc.embed([PROMPT]), both[:1])
