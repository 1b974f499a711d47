"""ParameterError: a value a library call cannot take, named in the caller's terms.

The library speaks of its parameters (`steps=0`, `ulysses=3`); the CLI (paradit.cli.flags.flag_terms) catches
the same error and names the flag the user typed instead (`--steps 0`). Pure Python, no torch.
"""
from __future__ import annotations


class ParameterError(ValueError):
    """param=value is refused: why, and what to pass instead.

    alternatives: values of one or more parameters that would work, each a dict
    (e.g. {"ulysses": 2} or {"width": 96, "height": 64}), so that a caller can show them its way.
    """

    def __init__(self, param: str, value, reason: str, fix: str = "", alternatives: tuple[dict, ...] = ()):
        self.param, self.value, self.reason, self.fix = param, value, reason, fix
        self.alternatives = tuple(alternatives)
        super().__init__(self.render(lambda p, v: f"{p}={v!r}", lambda alt: ", ".join(
            f"{k}={v!r}" for k, v in alt.items())))

    def render(self, name, alternative) -> str:
        """The message with name(param, value) for the refused value and alternative(dict) for each
        alternative: how a caller that is not the library (the CLI) words it in its own terms."""
        text = f"{name(self.param, self.value)}: {self.reason}"
        if self.fix:
            text += f"; {self.fix}"
        if self.alternatives:
            text += ": " + "; ".join(alternative(a) for a in self.alternatives)
        return text


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or not the model it claims to be."""
