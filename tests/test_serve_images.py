"""Image-to-video through the service: the first frame in the request (`input_reference`, a multipart
upload or base64 in JSON), with generate's latent for the same image and settings; bad images
refused with 400 (or 413) naming the field. One process each: an I2V-A14B-shaped and a TI2V-5B-shaped
tiny checkpoint (the layouts' parallel paths are tests/test_conditioning's)."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch

from ckpt_workers import TINY_I2V, TINY_TI2V, sample_image, write_checkpoint
from paradit.serve.process import ServerProcess, wait_for
from test_serve import AUTH, KEY, PROMPT, Server, latent_of

SETTINGS = {"i2v": dict(size="80x48", num_frames=9, num_inference_steps=2, seed=4),
            "ti2v": dict(size="96x64", num_frames=9, num_inference_steps=2, seed=4)}


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def generated(root, image_path, kind: str, out) -> torch.Tensor:
    from safetensors.torch import load_file

    from paradit.generate import main
    s = SETTINGS[kind]
    assert main(["--model", str(root), "--image", str(image_path), "--prompt", PROMPT, "--size", s["size"],
                 "--frames", str(s["num_frames"]), "--steps", str(s["num_inference_steps"]), "--seed",
                 str(s["seed"]), "--save-latents", "--no-progress", "--out", str(out)]) == 0
    return load_file(out.with_suffix(".latent.safetensors"))["latent"]


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_first_frame_in_the_request(kind, tmp_path):
    root = write_checkpoint(tmp_path / kind, {"i2v": TINY_I2V, "ti2v": TINY_TI2V}[kind])
    image = sample_image()
    image.save(tmp_path / "first.png")
    proc = ServerProcess(["--model", str(root), "--api-key", KEY, "--save-latents"],
                         state_dir=tmp_path / "state").launch()
    with proc, httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as client:
        served = Server(kind, proc.wait_ready(), client, proc.state_dir)
        ref = generated(root, tmp_path / "first.png", kind, tmp_path / "ref.mp4")
        fields = {"prompt": PROMPT, **SETTINGS[kind]}
        if kind == "i2v":   # a multipart upload, as OpenAI's client sends it
            r = client.post("/v1/videos", data={k: str(v) for k, v in fields.items()},
                            files={"input_reference": ("first.png", png_bytes(image), "image/png")})
        else:               # base64 in JSON, as a data URL
            r = client.post("/v1/videos", json=fields | {"input_reference": data_url(image)})
        assert r.status_code == 200, r.text
        v = served.finished(r.json()["id"])
        assert v["status"] == "completed", v
        assert torch.equal(latent_of(served.state_dir, v["id"]), ref)   # one process: the same arithmetic
        inputs = served.state_dir / "inputs"
        wait_for(lambda: not any(inputs.iterdir()), 10, what="the completed job's first frame deleted")
        assert client.get(f"/v1/videos/{v['id']}").json()["status"] == "completed"   # its record stays
        if kind == "i2v":
            check_inputs_deleted(client, served, fields | {"input_reference": data_url(image)})
        check_refusals(client, kind)


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def check_inputs_deleted(client: httpx.Client, served: Server, body: dict) -> None:
    """Two jobs with a first frame each (the same image: a file each); the second deleted at once, queued
    or running: both files are gone once both jobs have ended, and the first job's record stays."""
    first, second = (client.post("/v1/videos", json=body).json()["id"] for _ in range(2))
    assert len(list((served.state_dir / "inputs").iterdir())) >= 1
    assert client.delete(f"/v1/videos/{second}").json()["deleted"] is True
    assert served.finished(first)["status"] == "completed"
    wait_for(lambda: client.get(f"/v1/videos/{second}").status_code == 404, 30, what="the deleted job gone")
    wait_for(lambda: not any((served.state_dir / "inputs").iterdir()), 10, what="both first frames deleted")
    assert client.get(f"/v1/videos/{first}").json()["status"] == "completed"


def check_refusals(client: httpx.Client, kind: str) -> None:
    def refused(status: int, **body):
        r = client.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 2} | body)
        assert r.status_code == status and r.json()["error"]["param"] == "input_reference", r.text
        return r.json()["error"]["message"]
    assert "not a readable image" in refused(400, input_reference=base64.b64encode(b"plain text").decode())
    assert "not valid base64" in refused(400, input_reference="@@@")
    assert "at least" in refused(400, input_reference=base64.b64encode(png_bytes(sample_image(8, 8))).decode())
    gif = io.BytesIO()
    sample_image().save(gif, format="GIF")
    assert "GIF" in refused(400, input_reference=base64.b64encode(gif.getvalue()).decode())
    if kind == "i2v":
        assert "required" in refused(400)
    big = client.post("/v1/videos", json={"prompt": PROMPT, "negative_prompt": "x" * 70_000})
    assert big.status_code in (400, 413) and big.json()["error"]["param"] in ("body", "negative_prompt"), big.text
