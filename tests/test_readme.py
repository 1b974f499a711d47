"""The README's snippets run as written: every fenced ```python block (under torchrun with the
process count its first line names, gloo on CPU) and every command line of an indented block
(`python -m paradit...`, `torchrun ... -m paradit...`), each in a fresh folder, in a subprocess, as
a user would type it. Commands that need what CI lacks are listed in NOT_HERE with the reason, and
still have to parse; a snippet that is neither run nor listed fails the test."""
import re
import shlex
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs" / "serve.md"
# Commands that cannot run on a CI machine, with the reason; each must still be accepted by the
# CLI's argument parser.
NOT_HERE = {
    "--model /ckpt/Wan2.2-T2V-A14B-Diffusers": "needs the real A14B checkpoint and 8 GPUs",
}
TIMEOUT_S = 240


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def command_lines(text: str) -> list[str]:
    """Indented (4-space) lines that run paradit, with backslash continuations joined."""
    text = re.sub(r"```.*?```", "", text, flags=re.S).replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.startswith("    ")]
    return [re.sub(r"\s+#.*$", "", line) for line in lines
            if re.match(r"(\S*python\S* -m paradit|torchrun .*-m paradit)", line) and "paradit.serve" not in line]


def service_session(text: str) -> tuple[str, str]:
    """The service's quick start: the server command (the first indented block that starts
    paradit.serve), and the client's lines (the indented block after it) as one shell script."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    blocks = [b for b in re.split(r"\n\s*\n", text)
              if b.strip() and all(line.startswith("    ") for line in b.splitlines() if line.strip())]
    at = next(i for i, b in enumerate(blocks) if "-m paradit.serve" in b)
    return re.sub(r"\s+#.*$", "", blocks[at].strip().splitlines()[0]), textwrap.dedent(blocks[at + 1])


def as_argv(command: str) -> list[str]:
    """The user's interpreter and launcher are this test's: python -> sys.executable, torchrun -> its module."""
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return [sys.executable, *argv[1:]]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_the_readme_has_snippets():
    text = README.read_text()
    assert len(python_blocks(text)) >= 1 and len(command_lines(text)) >= 4


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_python_snippet_runs_as_written(index, tmp_path):
    code = python_blocks(README.read_text())[index]
    m = re.match(r"# torchrun --nproc-per-node (\d+)\n", code)
    script = tmp_path / "example.py"
    script.write_text(code)
    argv = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             m.group(1), str(script)] if m else [sys.executable, str(script)])
    res = run(argv, tmp_path)
    assert res.returncode == 0, f"README snippet {index} failed:\n{res.stdout}\n{res.stderr}"


@pytest.mark.parametrize("command", command_lines(README.read_text()))
def test_command_runs_as_written(command, tmp_path):
    reason = next((why for key, why in NOT_HERE.items() if key in command), None)
    argv = as_argv(command)
    if reason is not None:  # cannot run here: the flags must still be the CLI's
        at = next(i for i, a in enumerate(argv) if a.startswith("paradit.") and argv[i - 1] == "-m")
        module, flags = argv[at], argv[at + 1:]
        parse = __import__(module, fromlist=["parse_args"]).parse_args
        parse(flags)
        return
    res = run(argv, tmp_path)
    assert res.returncode == 0, f"{command}\nfailed:\n{res.stdout}\n{res.stderr}"
    for out in re.findall(r"--out (\S+)", command):
        assert (tmp_path / out).stat().st_size > 0, f"{command} wrote no {out}"


def test_service_quick_start_runs_as_written(tmp_path):
    """The server line as written, then its client lines as written, in bash: a job posted, polled
    until it has finished, its mp4 fetched with curl -f; the mp4 plays (its frames decode).
    docs/serve.md shows the same client lines."""
    server, client = service_session(README.read_text())
    assert service_session(DOCS.read_text())[1] == client, "docs/serve.md's service snippet differs from the README's"
    port = int(re.search(r"--port (\d+)", server).group(1))
    proc = subprocess.Popen(as_argv(server), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not health(port):
            assert proc.poll() is None and time.monotonic() < deadline, f"{server} did not come up:\n" + (
                proc.stdout.read() if proc.poll() is not None else "still starting")
            time.sleep(0.5)
        res = subprocess.run(["bash", "-c", client], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert res.returncode == 0, f"{client}\nfailed:\n{res.stdout}\n{res.stderr}"
        import imageio.v3 as iio
        frames = iio.imread(tmp_path / "video.mp4", extension=".mp4")   # (F, H, W, 3)
        assert frames.ndim == 4 and frames.shape[0] >= 1 and frames.shape[-1] == 3, frames.shape
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def health(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
    except OSError:
        return False


def test_a_newcomer_is_told_the_environment_and_starts_on_the_demo_model():
    """The first command line ran --model tiny (random weights: grey noise) with a bare `python`
    while setup makes .venv: the README says how to use the environment, starts on the demo model
    and says what tiny is."""
    text = README.read_text()
    assert ". .venv/bin/activate" in text
    cli = text[text.index("## Command line"):]
    first = command_lines(cli)[0]
    assert "-m paradit.generate" in first and "--model" not in first or "--model demo" in first, first
    assert re.search(r"`tiny` \(the same kind of model with random weights", text)


def test_the_readme_lists_only_models_generate_runs():
    """It listed wan2.2-t2v-a14b as a --model preset, which generate refuses without a folder."""
    from paradit.runspec import RUNNABLE_PRESETS, check_build
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `--model` |"))
    runnable = row.split("The Wan names")[0]
    names = re.findall(r"`([\w.-]+)`", runnable.split("|")[2])
    assert names and set(names) <= set(RUNNABLE_PRESETS), names
    for name in names:
        check_build(name, 0, None, None)   # what refuses an architecture without weights


DOCUMENTS = [README, *README.parent.glob("docs/*.md"), README.parent / "bench" / "README.md"]
UNREACHABLE = r"PEERS\.md|DESIGN\.md|CHORDS\.md|WAN_SPEC|/work/|\b[Ii]ssues? \d+|\b[Ii]tems? \d+ of issue"


def test_the_docs_point_only_at_what_a_reader_can_open():
    """Docs, docstrings and the shipped calibration (whose notes the planner prints) named notes outside
    the repository (PEERS.md, DESIGN.md, CHORDS.md, WAN_SPEC.md, a /work/ path) and issue numbers of a
    tracker no reader has; relative links must resolve."""
    sources = [*DOCUMENTS, *README.parent.glob("paradit/**/*.py"), *README.parent.glob("paradit/**/*.json")]
    found = [f"{path.name}: {m.group(0)}" for path in sources for m in re.finditer(UNREACHABLE, path.read_text())]
    assert found == [], found
    for doc in DOCUMENTS:
        for link in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / link).exists(), f"{doc.name} links to {link}, which does not exist"
