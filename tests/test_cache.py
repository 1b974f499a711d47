"""The step cache (paradit/engine/cache.py): its rule against a direct reading of EasyCache, its
refusals, and every layout skipping the same steps as one device and giving its cached latent."""
import json
import subprocess
import sys

import pytest
import torch

from paradit.engine.cache import StepCache
from paradit.errors import ParameterError
from paradit.launch import spawn
from paradit.parallel.mesh import single_device_mesh
from paradit.settings import CacheSettings, VideoSettings
from paradit.config import WanConfig
from cache_workers import PROMPTS, cached_run, layout_table

# (world, name, layout, CHORDS cores); heads 2, 45 tokens (no degree divides it)
TABLE = [
    (2, "U2", dict(ulysses=2), None),
    (2, "R2", dict(ring=2), None),
    (2, "CFG2", dict(cfg=2), None),
    (2, "DP2", dict(dp=2), None),
    (2, "split1+1", dict(experts="split", stages=((1, 1, 1), (1, 1, 1))), None),
    (2, "CHORDS2", dict(chords=2), 2),
    (2, "U2 sharded", dict(ulysses=2, shard_weights="sp"), None),       # FSDP2 blocks: skipped steps gather none
    (4, "U2xR2", dict(ulysses=2, ring=2), None),
    (4, "U2xCFG2", dict(ulysses=2, cfg=2), None),
    (4, "R2xDP2", dict(ring=2, dp=2), None),
    (4, "split2+2", dict(experts="split", stages=((2, 1, 1), (1, 1, 2))), None),   # U2 hands off to CFG2
    (4, "CHORDS2xU2", dict(chords=2, ulysses=2), 2),
    (4, "U2xCFG2 sharded", dict(ulysses=2, cfg=2, shard_weights="request"), None),
    (8, "U2xR2xCFG2", dict(ulysses=2, ring=2, cfg=2), None),
    (8, "CHORDS2xR2xCFG2", dict(chords=2, ring=2, cfg=2), 2),
    (8, "split4+4", dict(experts="split", stages=((2, 2, 1), (2, 1, 2))), None),
]
RTOL = 1e-5  # fp32, same math in another order (split attention and CFG) on the same skipped steps
HIGH_STEPS = 8  # of the 12 at shift 12 (t >= 875): a split high stage reports only these


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------ settings

def test_settings_parse_and_refuse_with_the_fix():
    assert CacheSettings.parse("easy:0.1:3") == CacheSettings("easy", 0.1, 3)
    assert CacheSettings.parse("easy") == CacheSettings()
    assert CacheSettings.parse("off") is None and CacheSettings.parse("none") is None
    cfg = WanConfig.preset("tiny")
    assert VideoSettings.resolve(cfg).cache is None                       # off by default
    assert VideoSettings.resolve(cfg, cache="easy:0.2").cache.threshold == 0.2
    for bad, words in [("mag", "choose one of easy"), ("easy:x", "THRESHOLD must be a number"),
                       ("easy:0", "must be in (0, 10]"), ("easy:nan", "finite"), ("easy:0.1:-1", "integer from 0"),
                       ("easy:0.1:2:3", "METHOD[:THRESHOLD[:WARMUP]]"), ("easy:", "METHOD[:THRESHOLD")]:
        with pytest.raises(ParameterError, match="cache") as err:
            VideoSettings.resolve(cfg, cache=bad)
        assert words in str(err.value), (bad, str(err.value))


# ------------------------------------------------------------------ the rule

def easycache_reference(xs_and_model, steps, experts, threshold, warmup):
    """EasyCache read directly from the paper, on whole tensors (means, not shard sums): the
    skipped steps of a sequential Euler run of `model` (x, i) -> v."""
    x, model = xs_and_model
    skipped, k, acc, x_prev, last, prev_expert = [], None, 0.0, None, None, None   # last: (x_c, v_c)
    for i in range(steps):
        if experts[i] != prev_expert:
            k, last, prev_expert = None, None, experts[i]
        forced = i < warmup or i == steps - 1 or k is None or last is None
        skip = False
        if not forced:
            acc += k * (x - x_prev).abs().mean().item() / last[1].abs().mean().item()
            skip = acc < threshold
        if not skip:
            acc = 0.0
        v = last[1] if skip else model(x, i)
        if skip:
            skipped.append(i)
        elif last is not None:
            k = (v - last[1]).abs().mean().item() / (x - last[0]).abs().mean().item()
        if not skip:
            last = (x, v)
        x_prev, x = x, x - 0.08 * v
    return skipped


def test_rule_matches_easycache_read_from_the_paper():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64) * 0.3, torch.randn(5, generator=g, dtype=torch.float64)

    def model(x, i):  # a smooth velocity field that drifts with the step
        return torch.tanh(x @ a) * (1 + 0.05 * i) + b
    steps, experts = 16, [0] * 9 + [1] * 7
    x0 = torch.randn(10, 5, generator=g, dtype=torch.float64)
    for threshold, warmup in [(0.05, 2), (0.2, 0), (0.5, 4)]:
        want = easycache_reference((x0, model), steps, experts, threshold, warmup)
        cache, x, got = StepCache(CacheSettings("easy", threshold, warmup), steps, single_device_mesh()), x0, []
        for i in range(steps):
            skip = cache.plan([(0, i, experts[i], x)])[0]
            v = cache.reuse(0) if skip else model(x, i)
            cache.update(0, x, v, skip)
            got += [i] * skip
            x = x - 0.08 * v
        assert got == want, (threshold, warmup)
        forced = set(range(warmup)) | {0, 1, 9, 10, steps - 1}   # warm-up, each expert's first two, the last
        assert not forced & set(got) and got, (threshold, got)   # the check can fail both ways


# ------------------------------------------------------------------ the pipeline, one device

def test_skipped_steps_run_no_transformer_and_off_changes_nothing():
    plain = cached_run(None, None)
    calls = []
    from cache_workers import SEQUENTIAL, tiny_config, NEGATIVE, HEADS
    from paradit.pipeline import Pipeline, tiny_components
    cfg = tiny_config(HEADS)
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32)
    for m in experts:
        m.blocks[0].register_forward_hook(lambda *_: calls.append(1))   # one batched-CFG forward a step
    pipe = Pipeline(cfg, experts, text, None)
    kw = {k: v for k, v in SEQUENTIAL.items() if k != "cache"}
    off = pipe(PROMPTS[0], negative_prompt=NEGATIVE, output="latent", **kw)
    assert pipe.record.cache is None and len(calls) == 12
    calls.clear()
    on = pipe(PROMPTS[0], negative_prompt=NEGATIVE, output="latent", cache=SEQUENTIAL["cache"], **kw)
    saved = len(pipe.record.cache.skipped)
    assert 0 < saved < 12 and len(calls) == 12 - saved       # a skipped step runs no expert
    assert len(pipe.record.trace) == 12                       # ... but is a step of its expert
    assert torch.equal(on, plain["latent"]) and not torch.equal(on, off)


@pytest.mark.parametrize("offload", ["experts", "layers"])
def test_offloaded_experts_skip_the_same_steps_and_copy_nothing_for_them(offload):
    from paradit.pipeline import Pipeline
    kw = dict(steps=12, seed=3, output="latent", progress=False)
    ref = Pipeline.from_pretrained("tiny")(PROMPTS[0], cache="easy:0.3:1", **kw)
    resident = Pipeline.from_pretrained("tiny")
    pipe = Pipeline.from_pretrained("tiny", offload=offload)
    assert torch.equal(pipe(PROMPTS[0], **kw), resident(PROMPTS[0], **kw))
    copied, n = getattr(pipe.residency, "copied_bytes", None), len(pipe.residency.log)
    assert torch.equal(pipe(PROMPTS[0], cache="easy:0.3:1", **kw), ref)
    skipped = {e["step"] for e in pipe.record.cache.skipped}
    assert skipped and len(pipe.record.residency) == 12 - len(skipped)    # one entry per computed step
    if offload == "layers":   # the blocks stream for computed steps only
        assert pipe.residency.copied_bytes - copied == pytest.approx(copied * (12 - len(skipped)) / 12)
    else:   # the plan's prefetches and releases at the same evaluations as a warm request's without the cache
        log = pipe.residency.log
        assert log[n:] == log[1:n] and any(e[0] in skipped for e in log[n:])   # (a release at a skipped step)


# ------------------------------------------------------------------ every layout

@pytest.fixture(scope="module")
def references():
    return {(p, cores): cached_run(None, cores, p) for p in PROMPTS for cores in (None, 2)}


def check_run(run, ref, what):
    want = ref["skipped"]
    if run["latent"] is None:   # a split high stage: it reports its own (high-noise) steps only
        want = [s for s in want if s[0] < HIGH_STEPS]
    assert run["skipped"] == want, f"{what}: skipped {run['skipped']}, one device {want}"
    if run["latent"] is not None:
        assert rel_err(run["latent"], ref["latent"]) < RTOL, what


@pytest.mark.parametrize("world", sorted({r[0] for r in TABLE}))
def test_every_layout_skips_the_steps_of_one_device(world, references):
    rows = [(name, layout, cores) for w, name, layout, cores in TABLE if w == world]
    results = spawn(layout_table, world, rows, timeout_s=280)
    assert all(r["skipped"] for r in references.values()), "the reference skips nothing: the test proves nothing"
    for rank, per_layout in enumerate(results):
        for name, layout, cores in rows:
            (run,) = per_layout[name]
            check_run(run, references[(run["prompt"], cores)], f"{name} rank {rank}")


def test_twenty_requests_in_a_row_stay_in_lockstep(references):
    rows = [("U2xCFG2", dict(ulysses=2, cfg=2), None), ("CHORDS2", dict(chords=2), 2),
            ("split", dict(experts="split", stages=((1, 1, 1), (1, 1, 1))), None)]
    results = spawn(layout_table, 2, rows[1:], 20, timeout_s=280)   # a hang fails here, on the timeout
    for rank, per_layout in enumerate(results):
        for name, _, cores in rows[1:]:
            assert len(per_layout[name]) == 20
            for j, run in enumerate(per_layout[name]):
                check_run(run, references[(PROMPTS[0], cores)], f"{name} repeat {j} rank {rank}")


# ------------------------------------------------------------------ the CLI

def test_cli_writes_the_skipped_steps_and_names_the_flag(tmp_path):
    """Split experts under torchrun (the low stage writes the high stage's skips) against the library
    on one process."""
    from safetensors.torch import load_file

    from paradit.cli.flags import DEFAULT_PROMPT
    from paradit.pipeline import Pipeline
    out = tmp_path / "split.mp4"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "paradit.generate", "--model", "demo", "--steps", "20", "--cache", "easy:0.1", "--experts",
                          "split", "--save-latents", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    side = json.loads(out.with_suffix(".json").read_text())
    pipe = Pipeline.from_pretrained("demo")
    ref = pipe(DEFAULT_PROMPT, steps=20, cache="easy:0.1", output="latent", progress=False)
    cache = side["cache"]
    assert side["settings"]["cache"] == "easy:0.1:2" and cache == pipe.record.cache.as_dict()
    assert cache["evaluations"] == 20 and cache["saved"] == len(cache["skipped"]) > 0
    assert cache["computed"] == 20 - cache["saved"] and {e["step"] for e in cache["skipped"]}.isdisjoint({0, 1, 19})
    assert {e["expert"] for e in cache["skipped"]} == {0, 1}                # both stages skip some
    assert rel_err(load_file(out.with_suffix(".latent.safetensors"))["latent"], ref) < RTOL
    bad = subprocess.run([sys.executable, "-m", "paradit.generate", "--model", "demo", "--cache", "easy:-1",
                          "--out", str(tmp_path / "b.mp4")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--cache easy:-1" in bad.stderr and not (tmp_path / "b.mp4").exists()


# ------------------------------------------------------------------ the service

def test_service_takes_a_default_and_a_per_request_cache(tmp_path):
    import httpx

    from paradit.serve.process import ServerProcess, wait_for
    proc = ServerProcess(["--model", "demo", "--cache", "easy:0.1", "--api-key", "k"], state_dir=tmp_path).start()
    with proc, httpx.Client(base_url=proc.url, headers={"Authorization": "Bearer k"}, timeout=30) as client:
        def finished(body):
            r = client.post("/v1/videos", json={"prompt": PROMPTS[0], "num_inference_steps": 20} | body)
            assert r.status_code == 200, r.text
            vid = r.json()["id"]
            return wait_for(lambda: (lambda v: v if v["status"] in ("completed", "failed") else None)(
                client.get(f"/v1/videos/{vid}").json()), 120, what="the job")

        def sidecar(video):
            return next(d for d in map(json.loads, (p.read_text() for p in tmp_path.glob("videos/*.json")))
                        if d["id"] == video["id"])
        served, off, own = finished({}), finished({"cache": "off"}), finished({"cache": "easy:0.3:4"})
        assert sidecar(served)["cache"]["saved"] > 0 and sidecar(off)["cache"] is None
        mine = sidecar(own)["cache"]
        assert mine["threshold"] == 0.3 and min(e["step"] for e in mine["skipped"]) >= 4
        r = client.post("/v1/videos", json={"prompt": PROMPTS[0], "cache": "easy:-1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache", r.text


# ------------------------------------------------------------------ the benchmark

def test_bench_sweeps_the_demo_model_and_extrapolates_a_checkpoint(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    import cache as bench
    import e2e

    assert bench.main(["--prompts", "2", "--thresholds", "0.1,0.3", "--steps", "16", "--out", str(tmp_path)]) == 0
    (demo,) = tmp_path.glob("*_cache_16steps.json")
    result = json.loads(demo.read_text())
    assert demo.with_suffix(".png").stat().st_size > 0
    low, high = result["summary"]
    assert 0 < low["saved_fraction"] < high["saved_fraction"] < 1     # a higher threshold skips more
    assert low["mean_psnr_db"] > high["mean_psnr_db"] > 20 and 0 < high["mean_ssim"] <= low["mean_ssim"] <= 1
    same = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    assert bench.ssim(same, same) == pytest.approx(1.0) and bench.ssim(same, 255 - same) < 0.5
    assert [r["judge_uncached"]["speed"] for r in result["runs"]] == [None] * 4     # demo's prompts name none
    # demo64: its own prompts (a speed word each), judged; its file beside demo's
    assert bench.main(["--model", "demo64", "--prompts", "1", "--thresholds", "0.3", "--steps", "4", "--warmup", "1",
                       "--out", str(tmp_path)]) == 0
    (big,) = json.loads(next(tmp_path.glob("*_cache_demo64_4steps.json")).read_text())["runs"]
    assert big["prompt"] == "a red square moving left slowly" and big["judge_cached"]["speed"] is not None
    assert set(big["judge_uncached"]) == {"colour", "shape", "direction", "speed"} and big["psnr_db"] != 0
    with pytest.raises(ValueError, match="'tiny' is not a judged demo model"):
        bench.judged_prompts("tiny", 1)
    # a checkpoint folder (random weights): speed only, extrapolated at the demo sweep's savings
    e2e.write_checkpoint("tiny", tmp_path / "ckpt", "cpu")
    assert bench.main(["--model", str(tmp_path / "ckpt"), "--size", "64x48", "--frames", "5", "--prompts", "1",
                       "--thresholds", "0.3", "--steps", "12",
                       "--extrapolate-to", "40", "--savings-from", str(demo), "--out", str(tmp_path)]) == 0
    (speed,) = tmp_path.glob("*_cache_wan2.2-t2v-a14b.json")   # the folder is read as its model kind
    lo_e, e = json.loads(speed.read_text())["extrapolated"]    # every demo threshold, 0.1 not run here
    assert (lo_e["threshold"], e["threshold"]) == (0.1, 0.3)
    assert lo_e["saved_fraction"] == low["saved_fraction"] and lo_e["computed_step_s"] == e["computed_step_s"]
    assert e["saved_fraction"] == high["saved_fraction"] and e["saved_fraction_from"] == "demo sweep"
    assert "psnr_db" not in json.loads(speed.read_text())["runs"][0]
    assert e["uncached_s"] == pytest.approx(40 * e["computed_step_s"])
