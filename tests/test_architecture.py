"""How the package hangs together: the planner and the layout are plain Python, runnable on their own."""
import subprocess
import sys

# planning a machine, CHORDS and split experts included, and every pure placement question
NO_TORCH = """
import sys
import paradit.plan, paradit.plan.cli, paradit.settings
from paradit.plan import ParallelConfig, plan, rank_roles
p = plan("wan2.2-t2v-a14b", 8, "h200", max_chords=8)
assert p.choice is not None and p.explain()
rank_roles(ParallelConfig(experts="split", stages=((1, 1, 1), (1, 1, 1))), 1)
assert 'torch' not in sys.modules, 'torch was imported'
"""


def test_planning_imports_no_torch():
    # the planner, the layout and the schedule are plain Python: the CLI checks stay fast
    run = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_planner_module_runs():
    run = subprocess.run([sys.executable, "-m", "paradit.plan", "--model", "wan2.2-t2v-a14b", "--gpus", "8",
                          "--size", "1280x720", "--frames", "81"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Choice:" in run.stdout and "Why not the next best:" in run.stdout
