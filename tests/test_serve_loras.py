"""Per-request LoRAs (--lora-dir): jobs alternating two sets and none give generate's latents with the
same LoRAs, bit for bit (fp32, one process: the same merge arithmetic, and the base weights copied
back exactly at every change; tests/test_lora_sets.py checks the weights themselves); queued jobs
are ordered to save switches without passing any over more than MAX_PASSES times; the switch time
is in the job's timings and /metrics; bad LoRA fields are 400 naming the field."""
from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import save_file

from paradit.config import WanConfig
from paradit.serve.process import ServerProcess
from test_lora import random_lora
from test_serve import AUTH, KEY, PROMPT, Server, latent_of

SETS = {"a": ["--lora", "{dir}/a.safetensors:0.2"],
        "b": ["--lora-high", "{dir}/b.safetensors:0.3", "--lora-low", "{dir}/a.safetensors:0.1"], "none": []}
REQUEST = {"a": [{"name": "a", "scale": 0.2}],
           "b": [{"name": "b", "scale": 0.3, "expert": "high"}, {"name": "a", "scale": 0.1, "expert": "low"}],
           "none": []}
ORDER = ["a", "b", "a", "none", "b"]


def generated(name: str, folder, out) -> torch.Tensor:
    from safetensors.torch import load_file

    from paradit.generate import main
    flags = [f.format(dir=folder) for f in SETS[name]]
    assert main(["--model", "demo", *flags, "--prompt", PROMPT, "--seed", "3", "--steps", "4", "--save-latents",
                 "--no-progress", "--out", str(out)]) == 0
    return load_file(out.with_suffix(".latent.safetensors"))["latent"]


@pytest.mark.parametrize("nproc, layout", [(1, []), (2, ["--ulysses", "2"])], ids=["1proc", "ulysses-2proc"])
def test_per_request_loras(nproc, layout, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for seed, name in ((1, "a"), (2, "b")):
        tensors, meta = random_lora(WanConfig.preset("demo"), "kohya", seed)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / f"{name}.safetensors", metadata=meta)
    # rank 0 slowed at step 2 of each job: the jobs behind the first are all queued when it ends
    proc = ServerProcess([*layout, "--lora-dir", str(folder), "--api-key", KEY, "--save-latents"], nproc=nproc,
                         state_dir=tmp_path / "state", env={"PARADIT_DELAY_AT": "0:step2:1"}).launch()
    with proc, httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as client:
        served = Server("loras", proc.wait_ready(), client, proc.state_dir)
        refs = {name: generated(name, folder, tmp_path / f"{name}.mp4") for name in SETS}
        assert not torch.equal(refs["a"], refs["none"]) and not torch.equal(refs["a"], refs["b"])
        jobs = [served.submit(seed=3, num_inference_steps=4, loras=REQUEST[name]) for name in ORDER]
        done = [served.finished(j["id"]) for j in jobs]
        for name, v in zip(ORDER, done):
            assert v["status"] == "completed", v
            latent = latent_of(served.state_dir, v["id"])
            if nproc == 1:   # the same arithmetic as generate's: bit for bit (the base weights restored exactly)
                assert torch.equal(latent, refs[name]), name
            else:            # fp32, Ulysses' other reduction order: rounding only (every rank switched alike)
                torch.testing.assert_close(latent, refs[name], rtol=1e-5, atol=1e-5, msg=name)
        started = [name for _, name in sorted((v["timings"]["stages"][0]["start"], n) for v, n in zip(done, ORDER))]
        assert started == ["a", "a", "b", "b", "none"], started    # grouped by set: 3 switches, not 5
        switches = [v["timings"].get("lora_switch_s") for v in done]
        assert sum(1 for s in switches if s) == 3, switches
        metrics = httpx.get(proc.url + "/metrics").text
        assert "paradit_lora_switch_seconds_count 3.0" in metrics
        for loras, param in (([{"name": "c"}], "loras[0].name"), ([{"name": "a", "scale": 0.0}], "loras[0].scale"),
                             ([{"name": "a", "scale": 1e9}], "loras[0].scale"),
                             ([{"name": "a", "expert": "mid"}], "loras[0].expert")):
            r = client.post("/v1/videos", json={"prompt": PROMPT, "loras": loras})
            assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, r.text
