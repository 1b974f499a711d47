"""One front door: the same argv resolves to the same RunSpec in generate and in the service; the
service runs what the spec says (a server-wide LoRA, CHORDS), through a real HTTP client, with
generate's latent; what cannot run is refused with the reason before any weight is read."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import save_file

from paradit.config import WanConfig
from paradit.serve.process import ServerProcess
from test_lora import random_lora
from test_serve import AUTH, KEY, PROMPT, Server, latent_of


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory):
    tensors, metadata = random_lora(WanConfig.preset("demo"), "kohya", seed=3)
    path = tmp_path_factory.mktemp("lora") / "demo_lora.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def argvs(lora) -> list[list[str]]:
    return [["--model", "tiny"], ["--model", "demo", "--lora", f"{lora}:0.2", "--chords", "2"],
            ["--model", "tiny", "--offload", "text-encoder", "--chords", "3", "--chords-stop", "none"],
            ["--model", "demo", "--lora-high", f"{lora}:0.5", "--lora-low", str(lora), "--check-finite"]]


def test_the_same_argv_resolves_to_the_same_spec(demo_lora):
    from paradit.cli.spec import parse_args, resolve
    from paradit.launch import init_distributed
    from paradit.serve.cli import parse_args as serve_args
    info = init_distributed("cpu")
    specs = [resolve(parse_args(argv), info) for argv in argvs(demo_lora)]
    assert [resolve(serve_args(argv), info) for argv in argvs(demo_lora)] == specs
    assert len(set(map(repr, specs))) == len(specs)          # the argvs differ, and so do their specs
    assert specs[1].chords.cores == 2 and specs[1].loras[0].scale == 0.2 and specs[1].build.cfg.name == "demo"


def test_blank_prompts_are_refused_naming_the_flag_or_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n&nbsp; \t\n")
    for argv, words in ((["--prompt", " \u00a0 "], "--prompt"), (["--prompts-file", str(prompts)], "line 2")):
        run = subprocess.run([sys.executable, "-m", "paradit.generate", "--model", "tiny", *argv, "--out",
                              str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, run.stderr[-2000:]
        assert words in run.stderr and "empty after removing whitespace" in run.stderr, run.stderr[-2000:]
    assert not list(tmp_path.glob("*.mp4"))


def test_fp8_is_refused_on_cpu_with_the_reason(tmp_path):
    run = subprocess.run([sys.executable, "-m", "paradit.serve", "--model", "tiny", "--quant", "fp8", "--device",
                          "cpu", "--port", "0", "--state-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "--quant fp8" in run.stderr and "GPU" in run.stderr, run.stderr[-2000:]
    assert "loading the models" not in run.stdout


def generate_latent(argv: list[str], out) -> torch.Tensor:
    from safetensors.torch import load_file

    from paradit.generate import main
    assert main([*argv, "--prompt", PROMPT, "--seed", "4", "--steps", "6", "--save-latents", "--no-progress",
                 "--out", str(out)]) == 0
    return load_file(out.with_suffix(".latent.safetensors"))["latent"]


def test_a_server_wide_lora_and_chords_job_gives_generates_latent(demo_lora, tmp_path):
    """--lora and --chords reach the served pipeline: the job's latent is generate's with the same
    flags, bit for bit (one process, the same arithmetic), and not generate's without them."""
    flags = ["--model", "demo", "--lora", f"{demo_lora}:0.2", "--chords", "2"]
    proc = ServerProcess([*flags, "--api-key", KEY, "--save-latents"], state_dir=tmp_path / "state").launch()
    with proc, httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as client:
        served = Server("lora-chords", proc.wait_ready(), client, proc.state_dir)
        with_flags = generate_latent(flags, tmp_path / "with.mp4")
        without = generate_latent(["--model", "demo"], tmp_path / "without.mp4")
        v = served.finished(served.submit(seed=4, num_inference_steps=6)["id"])
        assert v["status"] == "completed", v
        latent = latent_of(served.state_dir, v["id"])
        assert torch.equal(latent, with_flags)
        assert not torch.allclose(latent, without, atol=1e-3)
        bad = client.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_inference_steps", bad.text


def test_a_chords_service_takes_the_step_counts_whose_experts_its_ranks_loaded():
    """A CHORDS service's ranks load the experts their core runs at the server's --steps; a request is
    taken when every rank holds the experts its core runs at the request's steps (those a server at
    those --steps would load), refused otherwise naming num_inference_steps and the fix. The tiny
    model over 2 core groups: --steps 3 loads both experts on both cores, --steps 2 only the high-noise
    one, the model's default 8 steps the high on core 0 and both on core 1; the check read the default,
    so it refused a 3-step request at --steps 3 and took an 8-step one at --steps 2, which then failed
    on core 1, mid-job."""
    from paradit.cli.spec import resolve
    from paradit.launch import DistInfo
    from paradit.models.text_encoder import word_tokenizer
    from paradit.serve.cli import parse_args as serve_args
    from paradit.serve.schema import ApiError, Checker, Limits, VideoRequest

    def specs(steps: int) -> list:   # each rank's spec of `paradit.serve --chords 2 --steps N`, 2 processes
        flags = serve_args(["--model", "tiny", "--chords", "2", "--steps", str(steps)])
        return [resolve(flags, DistInfo(rank, 2, rank, torch.device("cpu"), "gloo")) for rank in range(2)]
    loaded = {n: [spec.build.experts_needed for spec in specs(n)] for n in range(2, 10)}
    assert loaded[3] == [{0, 1}, {0, 1}] and loaded[2] == [{0}, {0}] and loaded[8] == [{0}, {0, 1}]
    outcomes = set()
    for served in (2, 3, 8):
        spec = specs(served)[0]   # rank 0's, which builds the checker, as paradit.serve.cli.run does
        checker = Checker(spec.cfg, "tiny", word_tokenizer(), Limits(50, 10**6), spec.settings, None, spec.chords,
                          spec.layout)
        for n in range(2, 10):
            body = VideoRequest(prompt=PROMPT, num_inference_steps=n)
            taken = all(need <= have for need, have in zip(loaded[n], loaded[served]))
            outcomes.add((served, n, taken))
            if taken:
                assert checker.resolve(body)["steps"] == n
                continue
            with pytest.raises(ApiError) as refused:
                checker.resolve(body)
            assert refused.value.param == "num_inference_steps", (served, n)
            assert f"--steps {served}); give {served} or leave num_inference_steps out, or serve with --steps {n}" \
                in refused.value.message, refused.value.message
    assert checker.resolve(VideoRequest(prompt=PROMPT))["steps"] == 8   # the server's --steps by default
    assert {(3, 3, True), (2, 8, False), (8, 2, True), (8, 3, False)} <= outcomes   # both ways, each served


def test_a_build_option_is_its_field_and_its_use(monkeypatch, demo_lora):
    """A build option is declared once (a BuildSpec field made with runspec.option): declared here at
    run time, with no other edit, it is a flag of generate and of the service, a keyword of
    Pipeline.from_pretrained, checked the same at every door (the CLI's refusal naming its flag), and
    it reaches the BuildSpec that Pipeline.from_spec builds. Today's build options are declared so."""
    import dataclasses

    from paradit import runspec
    from paradit.cli.flags import FLAGS, PARAM_FLAGS, UsageError, spec_flags
    from paradit.cli.spec import parse_args, resolve
    from paradit.errors import ParameterError
    from paradit.launch import init_distributed
    from paradit.pipeline import Pipeline
    from paradit.serve.cli import parse_args as serve_args
    from paradit.settings import check_int
    extended = dataclasses.make_dataclass("BuildSpec", [
        ("warp_factor", int, runspec.option(1, dict(parse=int, help="a stand-in build option", metavar="N"),
                                            check=lambda v: check_int("warp_factor", v, 1, 9))),
        ("warp_mode", str, runspec.option("off", dict(parse=str, choices=("off", "on"), help="another")))],
        bases=(runspec.BuildSpec,), frozen=True)
    monkeypatch.setattr(runspec, "BuildSpec", extended)
    info = init_distributed("cpu")
    argv = ["--model", "tiny", "--warp-factor", "7", "--warp-mode", "on"]
    spec, served = resolve(parse_args(argv), info), resolve(serve_args(argv), info)
    assert (spec.build.warp_factor, spec.build.warp_mode) == (7, "on") and served == spec
    assert resolve(parse_args(["--model", "tiny"]), info).build.warp_factor == 1
    for parse in (parse_args, serve_args):
        with pytest.raises(UsageError, match="^--warp-factor 10: must be an integer from 1 to 9"):
            resolve(parse(["--model", "tiny", "--warp-factor", "10"]), info)
        with pytest.raises(UsageError, match="--warp-mode invalid choice: 'of'"):
            parse(["--model", "tiny", "--warp-mode", "of"])

    class Probe(Pipeline):   # from_pretrained's spec, before anything is built
        from_spec = classmethod(lambda cls, spec: spec)
    assert Probe.from_pretrained("tiny", warp_factor=7, warp_mode="on") == spec.build  # the CLI's, field for field
    with pytest.raises(ParameterError, match="^warp_factor=10: must be an integer from 1 to 9"):
        Probe.from_pretrained("tiny", warp_factor=10)
    with pytest.raises(ParameterError, match="^warp_mode='of': choose one of off, on"):
        Probe.from_pretrained("tiny", warp_mode="of")
    with pytest.raises(ParameterError, match="^warp=7: not a build option"):
        Probe.from_pretrained("tiny", warp=7)
    # no build option has a second declaration: not in FLAGS, not in PARAM_FLAGS
    declared = {f.name for f in spec_flags()}
    assert {"--warp-factor", "--model", "--lora-high", "--quant", "--offload"} <= declared
    assert not declared & {f.name for f in FLAGS} and not declared & set(PARAM_FLAGS.values())
