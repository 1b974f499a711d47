"""paradit serve over HTTP: every endpoint, status code and error, under one process and under
torchrun with 2 and 4 gloo processes (split experts, data parallel, Ulysses x CFG-parallel); the
videos equal paradit.generate's; a bounded load test; client disconnects. One server per layout
(module-scoped), bound to 127.0.0.1 on a free port, always killed at the end."""
from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from paradit.serve.jobs import JobStore
from paradit.serve.process import ServerProcess, wait_for

KEY = "test-key-7"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "a blue square moving up"
MAX_QUEUE = 6
COLLECTIVE_TIMEOUT_S = 4  # split experts: the ranks must idle longer than this without a collective timing out
LAYOUTS = {  # name: (processes, flags); each starts while the one before is tested
    "1proc": (1, []),
    "ulysses-cfg-4proc": (4, ["--ulysses", "2", "--cfg-par", "2"]),
    "split-2proc": (2, ["--experts", "split", "--timeout", str(COLLECTIVE_TIMEOUT_S)]),
    "dp-2proc": (2, ["--dp", "2"]),
}
JOB_TIMEOUT_S = 120
LONG = 24  # steps of the jobs that keep a lane busy while the test looks at the others
# ...and a pause of theirs (rank 0 runs the first lane's jobs, and the high-noise stage of split
# experts: 10 of the demo's 24 steps), so that a job seen running is still running when the test
# asks what it may do with it: without it a 24-step demo job can finish between two requests
SLOW_LONG = {"PARADIT_DELAY_AT": "0:step5:2"}


@dataclass
class Server:
    name: str
    proc: ServerProcess
    client: httpx.Client
    state_dir: Path

    def submit(self, **body) -> dict:
        r = self.client.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 2} | body)
        assert r.status_code == 200, r.text
        return r.json()

    def finished(self, video_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict:
        def done():
            v = self.client.get(f"/v1/videos/{video_id}").json()
            return v if v["status"] in ("completed", "failed") else None
        return wait_for(done, timeout_s, what=f"job {video_id} finishing ({self.name})")


@pytest.fixture(scope="module")
def launcher(request, tmp_path_factory):
    """Starts the servers of the selected layouts, each one while the one before is being tested;
    kills whatever is left at the end."""
    wanted = [name for name in LAYOUTS if any(getattr(item, "callspec", None) is not None and
                                              item.callspec.params.get("server") == name
                                              for item in request.session.items)]
    launched: dict[str, ServerProcess] = {}

    def launch(name: str) -> ServerProcess:
        nproc, flags = LAYOUTS[name]
        state = tmp_path_factory.mktemp(f"state-{name}")
        return ServerProcess([*flags, "--api-key", KEY, "--max-queue", str(MAX_QUEUE), "--save-latents"],
                             nproc=nproc, state_dir=state, env=SLOW_LONG).launch()

    def get(name: str) -> ServerProcess:
        proc = launched.pop(name, None) or launch(name)
        later = wanted[wanted.index(name) + 1:] if name in wanted else []
        if later and later[0] not in launched:
            launched[later[0]] = launch(later[0])
        return proc.wait_ready()
    yield get
    for proc in launched.values():
        proc.kill()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request, launcher):
    proc = launcher(request.param)
    with proc, httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as client:
        yield Server(request.param, proc, client, proc.state_dir)
        assert proc.proc.poll() is None, f"the server died:\n{proc.output[-3000:]}"


def error_of(r: httpx.Response, status: int, param: str | None, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], (w, err["message"])
    return err["message"]


# ----------------------------------------------------------------------------- every endpoint
def test_endpoints(server):
    c = server.client
    health = httpx.get(server.proc.url + "/health")           # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["defaults"]["num_frames"] == 9
    page = httpx.get(server.proc.url + "/")
    assert page.status_code == 200 and "<form" in page.text and "/v1/videos" in page.text

    # two long jobs (one per replica with --dp 2; its progress is watched), then short ones behind
    # them: the last stays queued (lanes hold at most 3 jobs: split experts)
    long = server.submit(num_inference_steps=LONG, seed=1)
    assert long["object"] == "video" and long["id"].startswith("video_") and long["status"] in ("queued", "in_progress")
    assert long["progress"] == 0 and long["completed_at"] is None and long["error"] is None
    assert (long["model"], long["size"], long["num_frames"], long["seed"]) == ("demo", "16x16", 9, 1)
    assert isinstance(long["created_at"], int)
    long2 = server.submit(num_inference_steps=LONG, seed=6)
    behind = [server.submit(seed=s) for s in range(2, 6)]
    queued = behind[-1]
    assert c.get(f"/v1/videos/{queued['id']}").json()["status"] == "queued"
    assert c.get(f"/v1/videos/{queued['id']}/content").status_code == 409
    r = c.delete(f"/v1/videos/{queued['id']}")                 # cancel a queued job
    assert r.status_code == 200 and r.json() == {"id": queued["id"], "object": "video.deleted", "deleted": True}
    assert c.get(f"/v1/videos/{queued['id']}").status_code == 404

    seen = set()
    def running():
        v = c.get(f"/v1/videos/{long['id']}").json()
        seen.add(v["progress"])
        return v if v["status"] == "in_progress" and 0 < v["progress"] < 100 else None
    wait_for(running, JOB_TIMEOUT_S, interval_s=0.02, what="progress of the long job")
    error_of(c.get(f"/v1/videos/{long['id']}/content"), 409, "video_id", "in_progress")
    done = server.finished(long["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"] >= done["created_at"]
    assert len(seen - {0, 100}) >= 1, seen                    # progress followed the steps

    r = c.get(f"/v1/videos/{long['id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"
    import imageio.v3 as iio
    assert iio.imread(r.content, extension=".mp4").shape == (9, 128, 128, 3)  # 9 frames, 16 px shown at 128
    assert c.get(f"/v1/videos/{long['id']}/content", params={"variant": "thumbnail"}).status_code == 400

    for v in [long2] + behind[:-1]:
        assert server.finished(v["id"])["status"] == "completed"
    listed = c.get("/v1/videos").json()
    assert listed["object"] == "list"
    mine = [v["id"] for v in [long, long2] + behind[:-1]]
    ids = [v["id"] for v in listed["data"]]
    assert ids[ids.index(mine[-1]):][:5] == mine[::-1]  # newest first
    asc = [v["id"] for v in c.get("/v1/videos", params={"limit": 100, "order": "asc"}).json()["data"]]
    page1 = c.get("/v1/videos", params={"limit": 2, "order": "asc"}).json()
    page2 = c.get("/v1/videos", params={"limit": 2, "order": "asc", "after": page1["last_id"]}).json()
    assert page1["has_more"] and [v["id"] for v in page1["data"] + page2["data"]] == asc[:4]

    metrics = httpx.get(server.proc.url + "/metrics")          # Prometheus text, no key needed
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert "paradit_queue_depth 0.0" in text and 'paradit_jobs{status="completed"}' in text
    assert 'paradit_step_seconds_count{stage="0"}' in text and "paradit_request_seconds_count" in text
    assert 'paradit_gpu_memory_bytes{kind="peak",rank="0"}' in text
    step_count = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("paradit_step_seconds_count"))
    assert step_count >= 2 * LONG + 3 * 2  # the long jobs' steps and the short ones' (on the reporting ranks)

    # delete a finished job: its row and its files go
    video = next(server.state_dir.glob("videos/*.json"))
    victim = json.loads(video.read_text())["id"]
    assert c.delete(f"/v1/videos/{victim}").json()["deleted"] is True
    assert not video.exists() and not video.with_suffix(".mp4").exists()
    assert c.get(f"/v1/videos/{victim}/content").status_code == 404


# ----------------------------------------------------------------------------- every error
BAD_BODIES = [  # (body, status, param, words in the message)
    ({"prompt": PROMPT, "foo": 1}, 422, "foo", "unknown field"),
    ({"prompt": PROMPT, "input_reference": "x.png"}, 400, "input_reference", "not valid base64"),
    ({}, 422, "prompt", "required"),
    ({"prompt": 3}, 422, "prompt", "valid string"),
    ({"prompt": PROMPT, "num_frames": "9"}, 422, "num_frames", "valid integer"),
    ({"prompt": PROMPT, "num_frames": 9.0}, 422, "num_frames", "valid integer"),
    ({"prompt": PROMPT, "seed": -1}, 422, "seed", "greater than or equal to 0"),
    ({"prompt": PROMPT, "seed": True}, 422, "seed", "valid integer"),
    ({"prompt": PROMPT, "guidance_scale": [1.0]}, 422, "guidance_scale", "list of two"),
    ({"prompt": PROMPT, "guidance_scale": "4"}, 422, "guidance_scale", "one number"),
    ({"prompt": PROMPT, "sampler": "ddim"}, 422, "sampler", "unipc, euler"),
    ({"prompt": PROMPT, "size": "17x16"}, 400, "size", "size 17x16 (width 17)", "multiples of 2"),
    ({"prompt": PROMPT, "size": "16 by 16"}, 400, "size", "WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "size": "64x64"}, 400, "size", "at most 512"),
    ({"prompt": PROMPT, "size": "5000x16"}, 400, "size", "width 5000", "to 4096"),
    ({"prompt": PROMPT, "guidance_scale": [4.0, 200]}, 400, "guidance_scale", "[0, 100]"),
    ({"prompt": PROMPT, "num_frames": 8}, 400, "num_frames", "num_frames 8", "8k+1", "nearest allowed: 9"),
    ({"prompt": PROMPT, "num_frames": 1}, 400, "num_frames", "8k+1", "from 9"),
    ({"prompt": PROMPT, "num_frames": 9, "seconds": 1}, 400, "seconds", "not both"),
    ({"prompt": PROMPT, "seconds": "soon"}, 400, "seconds", "number of seconds"),
    ({"prompt": PROMPT, "seconds": -1}, 400, "seconds", "positive"),
    ({"prompt": PROMPT, "num_inference_steps": 0}, 400, "num_inference_steps", "1 to 200", "--max-steps"),
    ({"prompt": PROMPT, "num_inference_steps": 201}, 400, "num_inference_steps", "1 to 200"),
    ({"prompt": " ".join(["red"] * 16)}, 400, "prompt", "17 tokens", "at most 16"),
    ({"prompt": PROMPT, "negative_prompt": " ".join(["red"] * 20)}, 400, "negative_prompt", "at most 16"),
    ({"prompt": "   "}, 400, "prompt", "empty"),
    ({"prompt": PROMPT, "guidance_scale": -1}, 400, "guidance_scale", "guidance_scale -1", "[0, 100]"),
    ({"prompt": PROMPT, "model": "sora-2"}, 400, "model", "'demo'"),
]


@pytest.mark.parametrize("body,status,param,words", [(b, s, p, w) for b, s, p, *w in BAD_BODIES],
                         ids=[f"{p}-{s}-{i}" for i, (_, s, p, *_) in enumerate(BAD_BODIES)])
def test_bad_bodies(server, body, status, param, words):
    error_of(server.client.post("/v1/videos", json=body), status, param, *words)


def test_errors(server):
    url, c = server.proc.url, server.client
    before = c.get("/v1/videos", params={"limit": 100}).json()["data"]
    # 401 on every /v1 route without the key, or with a wrong one; even before the body is read
    for method, path in [("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/x"),
                         ("GET", "/v1/videos/x/content"), ("DELETE", "/v1/videos/x")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, url + path, headers=headers, content=b"{not json")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
            assert "Authorization: Bearer" in r.json()["error"]["message"]
    # opaque ids: unknown ones (paths included) are 404, never a file
    for bad in ("video_0", "..", "..%2F..%2Fjobs.sqlite3", "%2Fetc%2Fpasswd", "1"):
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            r = c.request(method, f"/v1/videos/{bad}{suffix}")
            assert r.status_code == 404 and r.headers["content-type"] == "application/json", (bad, suffix, r.text)
    error_of(c.get("/v1/videos", params={"after": "video_nope"}), 404, "video_id", "no video")
    error_of(c.get("/v1/videos", params={"limit": 0}), 422, "limit")
    assert c.get("/v2/nothing").status_code == 404
    # not JSON
    error_of(c.post("/v1/videos", content=b"{", headers={"Content-Type": "application/json"}),
             422, "body", "not valid JSON")
    error_of(c.post("/v1/videos", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"}),
             422, "body", "Content-Type: application/json")
    error_of(c.post("/v1/videos", json=[PROMPT]), 422, "body", "JSON object")
    error_of(c.post("/v1/videos", json={"prompt": "red " * 40_000}), 413, "body", "at most 65536")
    # nothing above was accepted
    assert c.get("/v1/videos", params={"limit": 100}).json()["data"] == before


def test_full_queue_answers_429(server):
    c = server.client
    first = server.submit(num_inference_steps=LONG)
    accepted, refused = [first], None
    for _ in range(MAX_QUEUE + 8):  # at most the lanes' depth (3) can leave the queue meanwhile
        r = c.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 2})
        if r.status_code == 429:
            refused = r
            break
        assert r.status_code == 200, r.text
        accepted.append(r.json())
    assert refused is not None, "the queue never filled"
    error_of(refused, 429, None, "queue is full", f"--max-queue {MAX_QUEUE}")
    assert int(refused.headers["retry-after"]) > 0
    for v in accepted:
        assert server.finished(v["id"])["status"] == "completed"


# ----------------------------------------------------------------------------- the same video as generate
SAME = [dict(seed=5, num_inference_steps=6), dict(seed=2, num_inference_steps=1, guidance_scale=1.0)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """paradit.generate's latents for SAME, in this process (the CLI's own main)."""
    from safetensors.torch import load_file

    from paradit.generate import main
    out = []
    for i, s in enumerate(SAME):
        path = tmp_path_factory.mktemp("generate") / f"ref{i}.mp4"
        argv = ["--model", "demo", "--prompt", PROMPT, "--seed", str(s["seed"]), "--steps",
                str(s["num_inference_steps"]), "--save-latents", "--no-progress", "--out", str(path)]
        if "guidance_scale" in s:
            argv += ["--guidance", str(s["guidance_scale"])]
        assert main(argv) == 0
        out.append(load_file(path.with_suffix(".latent.safetensors"))["latent"])
    return out


def test_same_latent_as_generate(server, generated):
    for settings, ref in zip(SAME, generated):
        v = server.finished(server.submit(**settings)["id"])
        assert v["status"] == "completed", v
        latent = latent_of(server.state_dir, v["id"])
        if server.name == "1proc":
            assert torch.equal(latent, ref)  # the same process layout: the same arithmetic, bit for bit
        else:  # fp32, other reduction orders (split attention, CFG on two ranks, re-sharding): rounding only
            torch.testing.assert_close(latent, ref, rtol=1e-5, atol=1e-5)


def latent_of(state_dir: Path, video_id: str) -> torch.Tensor:
    from safetensors.torch import load_file
    for sidecar in state_dir.glob("videos/*.json"):
        if json.loads(sidecar.read_text())["id"] == video_id:
            return load_file(sidecar.with_suffix(".latent.safetensors"))["latent"]
    raise AssertionError(f"no latent for {video_id}")


# ----------------------------------------------------------------------------- load
CLIENTS, JOBS = 8, 32


def test_load_every_job_completed_or_refused(server):
    """8 clients on loopback send 32 jobs at once: each is accepted and completed, or refused with
    429; none is lost. With split experts the stages overlap (request N+1's high-noise steps run
    while request N's low-noise steps do); bench/serve_load.py measures the throughput."""
    accepted, refused, lock = [], [], threading.Lock()

    def client(k):
        with httpx.Client(base_url=server.proc.url, headers=AUTH, timeout=30) as c:
            for j in range(JOBS // CLIENTS):
                r = c.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 4, "seed": 100 * k + j})
                with lock:
                    (accepted if r.status_code == 200 else refused).append(r)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(accepted) + len(refused) == JOBS, (len(accepted), len(refused))
    assert all(r.status_code == 429 for r in refused), [r.text for r in refused if r.status_code != 429]
    videos = [server.finished(r.json()["id"]) for r in accepted]
    assert all(v["status"] == "completed" for v in videos), [v for v in videos if v["status"] != "completed"]
    listed = {v["id"] for v in server.client.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert {v["id"] for v in videos} <= listed
    if server.name.startswith("split"):
        assert pipelined(videos) >= 1, [v["timings"] for v in videos]


def pipelined(videos: list[dict]) -> int:
    """How many jobs ran high-noise steps while the low-noise stage ran an earlier job's."""
    spans = sorted((v["timings"]["stages"] for v in videos), key=lambda st: st[0]["start"])
    return sum(any(high["start"] < low["end"] and low["start"] < high["end"] for _, low in spans[:k])
               for k, (high, _) in enumerate(spans))


@pytest.mark.parametrize("server", ["split-2proc"], indirect=True)
def test_idle_longer_than_the_collective_timeout(server):
    """Idle ranks poll the store, never wait in a collective: after idling past --timeout, jobs run."""
    import time
    time.sleep(COLLECTIVE_TIMEOUT_S + 1.5)
    assert server.finished(server.submit(num_inference_steps=4)["id"])["status"] == "completed"
    assert server.proc.proc.poll() is None


# ----------------------------------------------------------------------------- disconnects
def test_client_disconnects_never_stall_the_ranks(server):
    host, port = server.proc.url.removeprefix("http://").split(":")
    # a client that sends half a body and vanishes
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"prompt\": ")
    # a client that submits a job, then drops a download half-way
    v = server.finished(server.submit(num_inference_steps=4)["id"])
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET /v1/videos/{v['id']}/content HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
        assert s.recv(64).startswith(b"HTTP/1.1 200")
    # a client that submits and never comes back: its job still runs, and so do the next ones
    with socket.create_connection((host, int(port)), timeout=5) as s:
        body = json.dumps({"prompt": PROMPT, "num_inference_steps": 3}).encode()
        s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    after = [server.submit(num_inference_steps=2, seed=s) for s in range(2)]
    assert all(server.finished(a["id"], timeout_s=60)["status"] == "completed" for a in after)
    prompts3 = [x for x in server.client.get("/v1/videos", params={"limit": 100}).json()["data"]
                if x["num_inference_steps"] == 3]
    assert all(server.finished(x["id"])["status"] == "completed" for x in prompts3)  # if it was accepted


# ----------------------------------------------------------------------------- flags and start-up
def test_bad_flags_are_named():
    from paradit.serve.cli import check_args, parse_args
    cases = [(["--host", "0.0.0.0"], "--api-key KEY"), (["--port", "70000"], "0-65535"),
             (["--max-queue", "0"], "--max-queue 0"), (["--max-video-tokens", "-5"], ">= 1"),
             (["--request-timeout", "0"], "--request-timeout 0"),
             (["--state-dir", ""], "--state-dir '': an empty path"),      # was the current folder
             (["--lora-dir", ""], "--lora-dir '': an empty path"),
             # curl sends 'Bearer kéy' as UTF-8, the server read the header as Latin-1: no client could match it
             (["--api-key", "kéy"], r"^--api-key \(or PARADIT_API_KEY\): its character 2 is a space or not "
                                   r"printable ASCII"),
             (["--api-key", "key "], r"its character 4 is a space")]
    for argv, words in cases:
        with pytest.raises(ValueError, match=words):
            check_args(parse_args(argv))
    check_args(parse_args(["--host", "0.0.0.0", "--api-key", "k"]))      # with a key it may listen widely
    check_args(parse_args(["--host", "0.0.0.0", "--insecure"]))
    for loopback in ("::1", "localhost", "127.0.0.2"):                  # IPv6's loopback too
        check_args(parse_args(["--host", loopback]))


def test_a_default_request_beyond_the_service_s_own_limits_is_refused_at_start():
    """serve --steps 300 (above --max-steps 200), or --size 256x256 --frames 101 (above the limit of 4x the
    model's default video), started, then refused every request that left the field out, blaming the
    client: 'num_inference_steps 300 is out of range'."""
    import torch

    from paradit.cli.spec import resolve
    from paradit.config import WanConfig
    from paradit.launch import DistInfo
    from paradit.serve.cli import limits_of, parse_args
    info = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")

    def limits(*argv):
        flags = parse_args(["--model", "tiny", *argv])
        return limits_of(flags, resolve(flags, info))
    with pytest.raises(ValueError, match=r"^--steps 300: above --max-steps 200, so every request that gives no "
                                         r"num_inference_steps would be refused; lower --steps or raise --max-steps$"):
        limits("--steps", "300")
    with pytest.raises(ValueError, match=r"^the default video \(256x256, 101 frames\) is 6656 tokens, above "
                                         r"--max-video-tokens 1000, .*; make it smaller or raise --max-video-tokens$"):
        limits("--size", "256x256", "--frames", "101", "--max-video-tokens", "1000")
    assert limits("--size", "256x256", "--frames", "101").max_video_tokens == 4 * 6656   # 4x the served default
    assert limits().max_video_tokens == 4 * WanConfig.preset("tiny").num_tokens(64, 64, 9)


def test_one_service_per_state_dir(tmp_path):
    from paradit.serve.cli import lock_state_dir
    held = lock_state_dir(tmp_path)
    with pytest.raises(ValueError, match=f"in use by another paradit serve \\(pid {os.getpid()}\\)"):
        lock_state_dir(tmp_path)
    held.close()
    lock_state_dir(tmp_path).close()  # free again once the holder is gone


def test_a_state_dir_that_cannot_be_a_folder_is_named(tmp_path):
    """A file given as --state-dir ended the service with 'FileExistsError: [Errno 17] File exists', exit 1."""
    from paradit.serve.cli import lock_state_dir
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"^--state-dir .*afile: it is a file; name a folder the service may write"):
        lock_state_dir(tmp_path / "afile")
    with pytest.raises(ValueError, match=r"^--state-dir .*afile/sub: cannot create it \(Not a directory\)"):
        lock_state_dir(tmp_path / "afile" / "sub")
    assert (tmp_path / "afile").read_text() == "x"


def test_a_taken_port_stops_the_cli_with_the_reason(tmp_path):
    """The CLI's error path, as a user meets it: exit 2, the reason on stderr, before any model loads."""
    import subprocess
    import sys
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "paradit.serve", "--port", str(port), "--state-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"paradit: error (rank 0): --host 127.0.0.1 --port {port}: cannot listen there" in proc.stderr
    assert "loading the models" not in proc.stdout


def test_a_bad_lora_dir_stops_the_cli_before_any_model_loads(tmp_path):
    """--lora-dir's files were checked only after the models were built (a whole checkpoint read, the
    port open, then an error), and named as --lora."""
    import subprocess
    import sys
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "empty.safetensors").write_bytes(b"")
    for folder, words in ((loras, f"--lora-dir {loras}: every .safetensors file in it must be a LoRA of demo"),
                          (tmp_path / "missing", f"--lora-dir {tmp_path / 'missing'}: no such folder")):
        proc = subprocess.run([sys.executable, "-m", "paradit.serve", "--port", "0", "--state-dir", str(tmp_path),
                               "--lora-dir", str(folder)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"paradit: error (rank 0): {words}" in proc.stderr, proc.stderr[-2000:]
        assert "loading the models" not in proc.stdout and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- the job store alone
def test_recovery_rules(tmp_path):
    store = JobStore(tmp_path)
    req = {"prompt": PROMPT, "steps": 2}
    queued, once, twice, done, other = (store.add("demo", req) for _ in range(5))
    store._run("UPDATE jobs SET model = 'tiny' WHERE seq = ?", (other.seq,))
    for job, attempts in ((once, 1), (twice, 2)):
        store._run("UPDATE jobs SET status = 'in_progress', attempts = ? WHERE seq = ?", (attempts, job.seq))
    store.complete(done.seq, done.video_file, {})          # its video never made it to disk
    settled = store.recover("demo", lambda request: None)
    assert settled == {"requeued": 1, "failed": 2, "missing": 1, "temporaries": 0, "inputs": 0}
    status = {j.id: (j.status, j.error) for j in store.list(10)}
    assert status[queued.id] == ("queued", None) and status[once.id] == ("queued", None)
    assert status[twice.id][0] == "failed" and "2 times" in status[twice.id][1]
    assert status[other.id][0] == "failed" and "'tiny'" in status[other.id][1]
    assert status[done.id][0] == "failed" and "missing" in status[done.id][1]
    assert store.next_queued().id == queued.id and store.next_queued().id == once.id  # arrival order
    assert store.next_queued() is None
    store.requeue(once.seq)                                # a clean stop does not count the attempt
    assert store.get(once.id).attempts == 1 and store.get(once.id).status == "queued"
    # a request the model no longer takes fails at recovery, with the reason
    assert store.recover("demo", lambda request: "too large now") == {"requeued": 0, "failed": 2, "missing": 0,
                                                                      "temporaries": 0, "inputs": 0}
    assert store.get(queued.id).error == "too large now"


# ----------------------------------------------------------------------------- the page, in a browser
PAGE_PROMPTS = ["a green circle moving right", "a red square moving down", "a cyan triangle moving left"]


def browser():
    """(chromium, chromedriver) from the system's packages, or None."""
    import shutil
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.mark.parametrize("server", ["1proc"], indirect=True)
def test_page_submits_and_plays(server):
    """Headless Chromium: type the key and prompts into the page, submit, watch the videos play.
    PARADIT_SERVE_SCREENSHOT=docs/serve-page.png also saves a screenshot of the page."""
    import os
    found = browser()
    if found is None:
        message = "no chromium + chromedriver: apt-get install chromium chromium-driver (make test does, as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
                "--window-size=1000,900", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    drv = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    try:
        drv.set_page_load_timeout(30)
        drv.get(server.proc.url + "/")
        WebDriverWait(drv, 30).until(lambda d: "model demo" in d.find_element(By.ID, "model").text)
        drv.find_element(By.ID, "key").send_keys(KEY)
        for k, prompt in enumerate(PAGE_PROMPTS):
            for field, value in (("prompt", prompt), ("num_inference_steps", "8"), ("seed", str(k))):
                box = drv.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            drv.find_element(By.ID, "submit").click()
            WebDriverWait(drv, 10).until(lambda d, n=k + 1: len(d.find_elements(By.CSS_SELECTOR, ".job")) >= n)
        assert drv.find_element(By.ID, "error").text == ""
        playing = """
            const cards = [...document.querySelectorAll('.job')].filter(c => arguments[0].includes(
                c.querySelector('.prompt').textContent));
            return cards.length === arguments[0].length && cards.every(c => {
                const v = c.querySelector('video');
                return v && v.readyState >= 2 && v.currentTime > 0 && v.played.length > 0 && !v.paused; });"""
        WebDriverWait(drv, 90, poll_frequency=0.2).until(lambda d: d.execute_script(playing, PAGE_PROMPTS))
        state = drv.execute_script("const v = document.querySelector('.job video');"
                                   "return [v.videoWidth, v.videoHeight, v.duration];")
        assert state[:2] == [128, 128] and state[2] > 0, state
        if os.environ.get("PARADIT_SERVE_SCREENSHOT"):
            drv.save_screenshot(os.environ["PARADIT_SERVE_SCREENSHOT"])
        # a bad value comes back from the API into the page, named
        box = drv.find_element(By.ID, "num_frames")
        box.clear()
        box.send_keys("8")
        drv.find_element(By.ID, "submit").click()
        WebDriverWait(drv, 10).until(lambda d: "8k+1" in d.find_element(By.ID, "error").text)
    finally:
        drv.quit()
