"""Image conditioning of Wan2.2 I2V-A14B and TI2V-5B, as the original code does it, in token space.

I2V-A14B (36 input channels = noise 16 | mask 4 | image latent 16). The video [image, 0, 0, ...]
(frames long) is VAE-encoded into y_lat (16, F, H, W). The mask has one channel per frame of the
VAE's temporal stride: pixel-frame mask m = [1, 0, 0, ...] with the first frame repeated stride
times (the causal VAE packs frame 0 alone into latent frame 0), folded as (F, stride) and
transposed: so mask[c, f] = 1 exactly on latent frame 0. y = [mask | y_lat] (20, F, H, W). The
model sees cat([x, y]) on channels; in token space, with P = pt*ph*pw values per channel in a
token, x tokens (L, P*16) and y tokens (L, P*20) are (L, P, 16) and (L, P, 20) and join on the
last dim into (L, P*36), which is patchify(cat([x, y])).

TI2V-5B (48 channels, no extra input): the image's latent z (48, 1, H, W) replaces latent frame 0
before the first step and again after every step, and the tokens of frame 0 get timestep 0 while
the others get t (per-token timesteps). Without an image TI2V-5B is a plain text-to-video model.

Image preprocessing and the default output size follow wan/image2video.py (bicubic resize of the
[-1, 1] image, size from the image's aspect ratio and the preset's area) and wan/textimage2video.py
(LANCZOS resize to cover, centre crop, size from best_output_size).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.models.transformer import patchify
from paradit.settings import MAX_SIDE, check_size

log = logging.getLogger("paradit")
Tensor = torch.Tensor
MASK_CHANNELS = 4  # = the Wan VAE's temporal stride
MIN_IMAGE_SIDE = 16  # pixels: a smaller image (a 1x1 one, say) carries no first frame worth the name


# ----------------------------------------------------------------------------- checks and sizes
def check_task(cfg: WanConfig, image) -> None:
    """An image for a text-only model, or none for I2V, is a user error that names the evidence."""
    evidence = cfg.extra.get("evidence", f"preset {cfg.name}")
    if image is not None and cfg.task == "t2v":
        raise ParameterError("image", str(image) if isinstance(image, (str, Path)) else "a PIL image",
                             f"{cfg.name} is a text-to-video model ({evidence}); image conditioning needs an "
                             f"I2V-A14B checkpoint (in_channels 36) or TI2V-5B (in_channels 48)", "leave it out")
    if image is None and cfg.task == "i2v":
        raise ParameterError("image", None, f"{cfg.name} is an image-to-video model ({evidence})",
                             "give the first frame")


def load_image(path):
    """The image (a path, or a PIL image) as a PIL RGB image, checked for its size (check_image_size)
    before it is decoded; a clear error naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    if hasattr(path, "convert"):  # a PIL image already
        check_image_size(path.width, path.height)
        return path.convert("RGB")
    path = Path(path)
    if not path.is_file():
        raise ParameterError("image", str(path), "a folder" if path.is_dir() else "no such file",
                             "name an image file" if path.is_dir() else "")
    try:
        with warnings.catch_warnings():  # PIL's warning for a large image: check_image_size refuses it in words
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check_image_size(img.width, img.height)  # from the header: a decompression bomb is never decoded
            return img.convert("RGB")
    except Image.DecompressionBombError as err:  # PIL's own guard, in formats whose size shows late
        raise ParameterError("image", str(path), f"refused by PIL as a decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ParameterError("image", str(path), f"not a readable image ({err})",
                             "give a PNG, JPEG or WebP file") from None


def check_image_size(width: int, height: int) -> None:
    """An image too small to carry a first frame, or over PIL's decompression-bomb limit."""
    from PIL import Image

    if min(width, height) < MIN_IMAGE_SIDE:
        raise ParameterError("image", f"{width}x{height}", f"the image is {width}x{height} pixels; a first frame "
                             f"needs at least {MIN_IMAGE_SIDE} a side (it is resized to the video's size, hundreds "
                             f"of pixels)", "give a larger image")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ParameterError("image", f"{width}x{height}", f"the image has {width * height:,} pixels, above PIL's "
                             f"decompression-bomb limit of {limit:,}", "give a smaller image (the video is at most "
                             f"{MAX_SIDE} pixels a side)")


def video_size_for_image(cfg: WanConfig, image_w: int, image_h: int) -> tuple[int, int]:
    """size_for_image, checked: an image so wide or tall that the video it implies is outside the
    sizes the model takes is refused as the image's fault (no size was given)."""
    try:
        width, height = size_for_image(cfg, image_w, image_h)
        check_size(cfg, width, height)
    except (ParameterError, ZeroDivisionError):
        m = cfg.size_multiple
        raise ParameterError("image", f"{image_w}x{image_h}", f"at {cfg.name}'s area ({cfg.size[0] * cfg.size[1]:,} "
                             f"pixels) an image of this shape makes a video outside the sizes it takes (multiples "
                             f"of {m}, from {m} to {MAX_SIDE // m * m} a side)", "crop the image to a less extreme "
                             "shape, or give the video's size") from None
    log.info("image %dx%d: the video is %dx%d (the image's shape at %s's area)", image_w, image_h, width, height,
             cfg.name)
    return width, height


def size_for_image(cfg: WanConfig, image_w: int, image_h: int, max_area: int | None = None) -> tuple[int, int]:
    """(width, height) the original picks for an image of this size: the preset's area, the image's shape."""
    max_area = max_area or cfg.size[0] * cfg.size[1]
    s, p = cfg.vae_stride[1], cfg.patch[1]
    if cfg.task == "ti2v":
        return best_output_size(image_w, image_h, s * p, s * p, max_area)
    ratio = image_h / image_w                               # wan/image2video.py
    lat_h = round(math.sqrt(max_area * ratio) // s // p * p)
    lat_w = round(math.sqrt(max_area / ratio) // s // p * p)
    return lat_w * s, lat_h * s


def best_output_size(w: int, h: int, dw: int, dh: int, area: int) -> tuple[int, int]:
    """The multiple-of-(dw, dh) size of at most `area` pixels whose aspect ratio is closest to w/h."""
    ratio = w / h
    ow, oh = (area * ratio) ** 0.5, area / (area * ratio) ** 0.5
    ow1 = int(ow // dw * dw)                                # width first
    oh1 = int(area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)                                # height first
    ow2 = int(area / oh2 // dw * dw)
    r1, r2 = ow1 / oh1, ow2 / oh2
    return (ow1, oh1) if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio) else (ow2, oh2)


def image_pixels(img, width: int, height: int, task: str) -> Tensor:
    """PIL image -> (3, height, width) fp32 in [-1, 1], resized as the original does for `task`."""
    from PIL import Image

    if task == "ti2v":                                      # cover, then centre crop
        scale = max(width / img.width, height / img.height)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        x0, y0 = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((x0, y0, x0 + width, y0 + height))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W) in [0, 1]
    x = (x - 0.5) / 0.5
    if task != "ti2v":                                      # bicubic on the [-1, 1] tensor, no crop
        x = F.interpolate(x[None], size=(height, width), mode="bicubic")[0]
    return x


# ----------------------------------------------------------------------------- latent conditions
def i2v_mask(frames: int, lat_hw: tuple[int, int], t_stride: int = MASK_CHANNELS) -> Tensor:
    """(t_stride, F_lat, H, W): 1 on the latent frame that holds the given first frame, else 0."""
    h, w = lat_hw
    m = torch.zeros(frames, h, w)
    m[0] = 1                                                          # pixel frame 0 is given
    m = torch.cat([m[:1].repeat(t_stride, 1, 1), m[1:]])              # (frames - 1 + t_stride, H, W)
    return m.view(-1, t_stride, h, w).transpose(0, 1)                 # (t_stride, F_lat, H, W)


def condition_shape(cfg: WanConfig, width: int, height: int, frames: int) -> tuple[int, ...]:
    """Shape of the latent-space condition: y (4 + z, F, H, W) for I2V, z (z, 1, H, W) for TI2V."""
    c, f, h, w = cfg.latent_shape(width, height, frames)
    return (MASK_CHANNELS + c, f, h, w) if cfg.task == "i2v" else (c, 1, h, w)


def encode_condition(cfg: WanConfig, vae, img, width: int, height: int, frames: int) -> Tensor:
    """The latent-space condition of a PIL image (see condition_shape); runs the VAE encoder."""
    return condition_from_pixels(cfg, vae, image_pixels(img, width, height, cfg.task), frames)


@torch.no_grad()
def condition_from_pixels(cfg: WanConfig, vae, pixels: Tensor, frames: int) -> Tensor:
    """pixels (3, H, W) in [-1, 1] -> y (20, F, H', W') for I2V, z (z, 1, H', W') for TI2V."""
    height, width = pixels.shape[-2:]
    if cfg.task == "ti2v":
        return vae.encode_pixels(pixels[:, None])                     # (z, 1, H_lat, W_lat)
    video = torch.cat([pixels[:, None], pixels.new_zeros(3, frames - 1, height, width)], dim=1)
    y_lat = vae.encode_pixels(video)                                  # (16, F_lat, H_lat, W_lat)
    assert cfg.vae_stride[0] == MASK_CHANNELS, cfg.vae_stride
    return torch.cat([i2v_mask(frames, y_lat.shape[-2:]), y_lat])     # (20, F_lat, H_lat, W_lat)


# ----------------------------------------------------------------------------- token space
@dataclass
class Condition:
    """This rank's token shard of a condition: y for I2V; z and keep for TI2V."""
    y: Tensor | None = None     # (L_me, P*20) I2V: mask and image latent, patchified
    z: Tensor | None = None     # (L_me, P*C)  TI2V: the image latent in frame 0's tokens
    keep: Tensor | None = None  # (L_me,) bool TI2V: True where the token is generated (not frame 0)
    patch_numel: int = 4        # P = pt*ph*pw


def shard_condition(cfg: WanConfig, latent_cond: Tensor, latent_shape, start: int, end: int, device) -> Condition:
    """Patchify the condition for the latent grid and keep tokens [start, end) (this rank's shard)."""
    patch = cfg.patch
    if cfg.task == "i2v":
        y = patchify(latent_cond[None].float(), patch)[0]                        # (L, P*20)
        return Condition(y=y[start:end].to(device), patch_numel=math.prod(patch))
    assert patch[0] == 1, "frame-0 tokens must hold frame 0 alone (temporal patch 1, as in every Wan model)"
    c, f, h, w = latent_shape
    full = torch.zeros(c, f, h, w)
    full[:, :1] = latent_cond.float()
    z = patchify(full[None], patch)[0]                                           # (L, P*C)
    per_frame = (h // patch[1]) * (w // patch[2])
    keep = torch.arange(z.shape[0]) >= per_frame                                 # (L,)
    return Condition(z=z[start:end].to(device), keep=keep[start:end].to(device), patch_numel=math.prod(patch))


def model_input(x: Tensor, c: Condition | None) -> Tensor:
    """I2V: x (L, P*16) and y (L, P*20) -> (L, P*36), each patch element's channels [x | y]; else x."""
    if c is None or c.y is None:
        return x
    n, p = x.shape[0], c.patch_numel
    xy = torch.cat([x.view(n, p, -1), c.y.view(n, p, -1).to(x.dtype)], dim=-1)  # (L, P, 36)
    return xy.view(n, -1)                                                        # (L, P*36)


def timesteps(t: Tensor, c: Condition | None) -> Tensor:
    """TI2V with an image: per-token timesteps (L_me,), 0 on frame 0's tokens; else t unchanged."""
    if c is None or c.keep is None:
        return t
    return t * c.keep.to(t.dtype)


def after_step(x: Tensor, c: Condition | None) -> Tensor:
    """TI2V with an image: frame 0's tokens reset to the image latent (also before the first step)."""
    if c is None or c.keep is None:
        return x
    return torch.where(c.keep[:, None], x, c.z.to(x.dtype))
