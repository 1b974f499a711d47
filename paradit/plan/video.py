"""A request's time to video: the start-up of a fresh process, and every phase after the denoising.

Pure Python, no torch. For the slowest rank (the request's first, which holds the most: its experts,
the text encoder and the VAE), in seconds:
    weights        its checkpoint bytes / weights_gbps (warm page cache to the GPU)
    LoRA merge     the bytes of the experts LoRAs merge into / lora_merge_gbps: each weight merged on
                   the GPU as it is read, an offloaded expert's on its way into host memory alike
    offload set-up the bytes it keeps in pinned host memory / offload_setup_gbps
    encode         encode_s (umT5 resident; the copy of an offloaded one is a host copy below)
    denoise        the steps, and the host copies the offload mode adds (Candidate.latency_s)
    decode         decode_s_per_gpix x pixel-frames x the share of the video each rank of the decode
                   group decodes: column tiles of W / N pixels plus the 64-pixel blend
    write          write_s_per_gpix x pixel-frames (H.264 on the output rank)

The host-link copies an offload mode adds per request are costs.py's (its docstring derives them).
"""
from __future__ import annotations

from paradit.plan.hardware import GB
from paradit.plan.memory import pinned_gb
from paradit.plan.model import decode_share, param_count, param_parts, text_encoder_gb, vae_gb
from paradit.plan.results import VideoTime
from paradit.residency import offloads_experts, offloads_text_encoder, streams_layers


def host_copy_s(p, mode: str, experts: int, text: bool, step_s: float) -> float:
    """Seconds per request a rank waits for host-link copies under an offload mode (module docstring)."""
    bw = p.gpu.host_link_gbps * 1e9 * p.calibration.host_link_efficiency
    seconds = text_encoder_gb(p.model) * GB / bw if text and offloads_text_encoder(mode) else 0.0
    if offloads_experts(mode) and experts > 1:
        parts = param_parts(p.model)
        first = (parts["embed"] + parts["block"]) * 2 / bw
        seconds += 2 * (first + max(0.0, param_count(p.model) * 2 / bw - step_s))
    return seconds


def offload_note(p, mode: str, experts: int, text: bool) -> str:
    """What an offload mode does on this layout, with the host memory it pins."""
    what = (["text encoder on the GPU only to encode"] if offloads_text_encoder(mode) and text else []) + \
        (["one expert on the GPU at a time"] if offloads_experts(mode) and experts > 1 else []) + \
        (["experts streamed from host memory block by block"] if streams_layers(mode) else [])
    return f"offload {mode}: {', '.join(what)}; {pinned_gb(p, mode, experts, text):.1f} GB pinned host memory" \
        if what else ""


def video_time(p, mode: str, experts: int, decoders: int, denoise_s: float) -> VideoTime:
    """The time to video of a layout whose first rank holds `experts` experts and the text encoder,
    decoded over `decoders` ranks, denoising in `denoise_s` (host copies included)."""
    m, cal = p.model, p.calibration
    expert_gb = param_count(m) * 2 / GB
    vae = vae_gb(m, p.width, p.height)
    read_gb = experts * expert_gb + text_encoder_gb(m) + vae["weights"]
    merge_s = experts * expert_gb / cal.lora_merge_gbps if p.loras else 0.0
    gpix = p.width * p.height * p.frames / 1e9
    share = decode_share(p.width, decoders)
    return VideoTime(weights=read_gb / cal.weights_gbps, lora_merge=merge_s,
                     offload_setup=pinned_gb(p, mode, experts, True) / cal.offload_setup_gbps,
                     encode=cal.encode_s, denoise=denoise_s, decode=cal.decode_s_per_gpix * gpix * share,
                     write=cal.write_s_per_gpix * gpix)
