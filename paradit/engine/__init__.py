"""The denoising drivers: sequential, CHORDS, split expert stages, and the compile warm-up.

Each driver is a function of an explicit Request (settings, prompt embeddings, image condition,
record) and a Denoiser (the experts under the runtime's layout); none of them knows the Pipeline,
which encodes before and decodes after (paradit.pipeline). docs/architecture.md has the picture.
"""
from paradit.engine.denoiser import Denoiser
from paradit.engine.request import Request, RunRecord, Stopped, TokenSpace

__all__ = ["Denoiser", "Request", "RunRecord", "Stopped", "TokenSpace"]
