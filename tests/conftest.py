"""Session set-up: spawn()'s gloo ranks fork from one server process that imported paradit once,
instead of each rank starting a fresh interpreter (seconds of imports a rank, ~100 ranks a run)."""
from paradit import launch

launch.use_forkserver(["paradit.pipeline", "paradit.checkpoint", "paradit.models.loading"])
