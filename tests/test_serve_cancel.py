"""DELETE of a running job under 2 processes (Ulysses 2): every rank stops it at the same step
boundary, the job and its files are gone, and the lane runs the next job with generate's latent."""
from __future__ import annotations

import httpx
import torch

from paradit.serve.process import ServerProcess, wait_for
from test_serve import AUTH, KEY, PROMPT, Server, latent_of

LONG = 24


def test_a_running_job_is_cancelled_on_every_rank(tmp_path):
    from safetensors.torch import load_file

    from paradit.generate import main
    # rank 1 slowed at step 3 of each job: the job is seen running before it can finish
    proc = ServerProcess(["--ulysses", "2", "--api-key", KEY, "--save-latents"], nproc=2,
                         state_dir=tmp_path / "state", env={"PARADIT_DELAY_AT": "1:step3:3"}).launch()
    with proc, httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as client:
        served = Server("cancel", proc.wait_ready(), client, proc.state_dir)
        long = served.submit(num_inference_steps=LONG, seed=1)
        wait_for(lambda: client.get(f"/v1/videos/{long['id']}").json()["status"] == "in_progress", 120,
                 what="the long job running")
        r = client.delete(f"/v1/videos/{long['id']}")
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        wait_for(lambda: client.get(f"/v1/videos/{long['id']}").status_code == 404, 60, what="the job gone")
        assert "cancelled at step" in proc.output and not list(served.state_dir.glob("videos/*"))
        after = served.finished(served.submit(seed=5, num_inference_steps=3)["id"])
        assert after["status"] == "completed", after
        out = tmp_path / "ref.mp4"
        assert main(["--model", "demo", "--prompt", PROMPT, "--seed", "5", "--steps", "3", "--save-latents",
                     "--no-progress", "--out", str(out)]) == 0
        # fp32, Ulysses' other reduction order than one process: rounding only
        torch.testing.assert_close(latent_of(served.state_dir, after["id"]),
                                   load_file(out.with_suffix(".latent.safetensors"))["latent"], rtol=1e-5, atol=1e-5)
        assert proc.proc.poll() is None, proc.output[-3000:]
