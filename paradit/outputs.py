"""A run's outputs, written as one set: all of them or none, never a half-written file.

`Outputs` stages every file (video, latent, sidecar) as a temporary beside its target and, once the
whole run has succeeded, renames them over their targets together; if any rename fails, the
targets renamed so far get their earlier contents back. `discard()` (every failure path calls it,
from any thread) stops a running encoder and removes every temporary, and never raises: it runs
inside error handlers. Temporaries are named `.paradit-tmpPID-N` (short, whatever the target's name:
a temporary named after a 250-byte target would not fit the file system's 255); a run removes those
of dead processes (a SIGKILLed run) from its output folders.

The video encoder is ffmpeg (imageio-ffmpeg's binary) in a process of its own, fed raw RGB frames on
its stdin by a thread as they arrive (`video_stream`: the VAE decode hands over each run of frames as
it decodes it, so the mp4 is encoded while the decode runs), and bounded in time. Not imageio's
writer: that starts ffmpeg with a Python preexec_fn, which forks without exec in a process full of
threads (gloo's, the failure watcher's), and the child can then block forever on a lock another
thread held at the fork, with the run stuck in the write.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

MIN_SIDE = 128  # videos smaller than this are written enlarged, so that a player shows them
MAX_WRITTEN_SIDE = 16384  # libx264 (through ffmpeg's scaler) writes nothing wider: measured, 32768 fails


TEMP_PREFIX = ".paradit-"
NAME_MAX = 255  # bytes in a file name, where the file system does not say (os.pathconf)
_serial = itertools.count()


def temp_path(path: Path, tag: str = "tmp") -> Path:
    """A temporary in `path`'s folder (renamed over it atomically), never longer than 30 bytes."""
    return Path(path).with_name(f"{TEMP_PREFIX}{tag}{os.getpid()}-{next(_serial)}")


def enlargement(width: int, height: int, min_side: int = MIN_SIDE) -> int:
    """The smallest integer factor k that makes both sides >= min_side, but no more than keeps both
    within MAX_WRITTEN_SIDE (a 4096x16 video is written 16384x64, not 32768x128, which fails)."""
    return max(1, min(-(-min_side // min(width, height)), MAX_WRITTEN_SIDE // max(width, height)))


def enlarge(frames: np.ndarray, min_side: int = MIN_SIDE) -> tuple[np.ndarray, int]:
    """Frames (F, H, W, 3) enlarged by `enlargement` (nearest-neighbour, so the pixels themselves are
    unchanged); returns (frames, k)."""
    k = enlargement(frames.shape[2], frames.shape[1], min_side)
    return (frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames), k


def written_size(width: int, height: int, min_side: int = MIN_SIDE) -> tuple[int, int]:
    k = enlargement(width, height, min_side)
    return width * k, height * k


def encode_timeout_s(pixels: int) -> float:
    """Generous bound on one encode of `pixels` (frames x height x width): ffmpeg's libx264 does tens
    of megapixels a second on one core."""
    return 120.0 + 2.0 * pixels / 1e6


class WriteError(OSError):
    """An output that could not be written (the CLI reports it in one line)."""


class EncodeError(WriteError):
    pass


class Outputs:
    def __init__(self):
        self._lock = threading.Lock()
        self._staged: list[tuple[Path, Path]] = []   # (temporary, target), in commit order
        self._encoders: set[subprocess.Popen] = set()
        self._discarded = False

    # ------------------------------------------------------------------ staging
    def _temp(self, path: Path) -> Path:
        path = Path(path)
        with self._lock:
            if self._discarded:
                raise EncodeError(f"{path}: the run's outputs were discarded")
            tmp = temp_path(path)
            self._staged.append((tmp, path))
        path.parent.mkdir(parents=True, exist_ok=True)
        return tmp

    def video(self, path, frames, fps: int) -> int:
        """Stage uint8 frames (F, H, W, 3) as an H.264 mp4; returns the enlargement factor."""
        stream = self.video_stream(path, fps)
        stream(frames)
        return stream.close()

    def video_stream(self, path, fps: int) -> "VideoStream":
        """An mp4 staged as its frames arrive (the decode feeds it): call it with each run of uint8
        frames (f, H, W, 3), in time order, then close() (returns the enlargement factor)."""
        return VideoStream(self, self._temp(path), fps)

    def json(self, path, data: dict) -> None:
        self._temp(path).write_text(json.dumps(data, indent=1, default=str))

    def tensors(self, path, tensors: dict) -> None:
        from safetensors.torch import save_file
        tmp = self._temp(path)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        except Exception as err:  # safetensors' SafetensorError (a full disk, say) is not an OSError
            raise WriteError(f"could not write {path}: {str(err).splitlines()[0][:300]}") from None

    # ------------------------------------------------------------------ commit or discard
    def commit(self) -> list[Path]:
        """Rename every staged file over its target, all or none; returns the targets."""
        with self._lock:
            staged, self._staged = self._staged, []
        done, backups = [], {}
        try:
            for _, path in staged:
                if path.is_dir():
                    raise IsADirectoryError(f"{path} is a directory")
            for tmp, path in staged:
                if path.exists():                       # keep the earlier file until the set is in place
                    backups[path] = temp_path(path, "old")
                    try:
                        os.link(path, backups[path])
                    except OSError:                     # a file system without hard links
                        shutil.copy2(path, backups[path])
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in reversed(done):
                if path in backups:
                    os.replace(backups.pop(path), path)
                else:
                    path.unlink(missing_ok=True)
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            for b in backups.values():
                b.unlink(missing_ok=True)
        return [path for _, path in staged]

    def discard(self) -> None:
        """Stop any running encoder and remove every temporary; safe from any thread, more than once."""
        with self._lock:
            self._discarded = True
            encoders, staged, self._staged = list(self._encoders), self._staged, []
        for proc in encoders:
            try:
                proc.kill()
                proc.wait(timeout=10)
            except (OSError, subprocess.SubprocessError):  # gone already, or unkillable: nothing more to do
                pass
        for tmp, _ in staged:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # never raise from an error path; a dead run's temporary is removed next time
                pass


class VideoStream:
    """ffmpeg encoding one mp4 while its frames arrive, so that writing adds little after the decode.
    Each run of frames is queued (at most QUEUED runs) and written to ffmpeg's stdin by a thread, so
    the caller (the VAE decode) goes on at once; a run on the GPU is copied into page-locked memory
    without waiting, and the thread waits for that copy. ffmpeg starts at the first run (its size)."""
    QUEUED = 8
    STALL_S = 120.0        # a run not taken by ffmpeg within this: the encoder is stuck
    # x264 holds this many frames before it encodes one (40 at its default preset): what is left to
    # encode once the last frame is in. 10 on 49 noise frames at 640x360 (this 2-core machine): the
    # same file size, the wait after the last frame 19 s -> 8 s where the encoder could not keep up
    LOOKAHEAD = 10

    def __init__(self, outputs: Outputs, tmp: Path, fps: int):
        self.outputs, self.tmp, self.fps = outputs, tmp, fps
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.queue: queue.Queue = queue.Queue(self.QUEUED)
        self.frames, self.pixels, self.k, self.error = 0, 0, 1, None

    def __call__(self, frames) -> None:
        ready = None
        if isinstance(frames, np.ndarray):
            frames = np.ascontiguousarray(frames, dtype=np.uint8)
        elif frames.is_cuda:           # a torch tensor on the GPU: copied out without waiting here
            import torch
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            frames = host
        if self.proc is None:
            self._start(frames.shape)
        self.frames += frames.shape[0]
        self.pixels += frames.shape[0] * frames.shape[1] * frames.shape[2] * self.k ** 2
        try:
            self.queue.put((frames, ready), timeout=self.STALL_S)
        except queue.Full:
            raise EncodeError(f"ffmpeg took no frames for {self.STALL_S:.0f} s writing {self.tmp.name}") from None

    def _start(self, shape) -> None:
        from imageio_ffmpeg import get_ffmpeg_exe
        _, h, w, _ = shape
        self.k = enlargement(w, h)                                      # as enlarge() will
        cmd = [get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{w * self.k}x{h * self.k}", "-r", str(self.fps), "-i", "-", "-an", "-vcodec", "libx264",
               "-pix_fmt", "yuv420p", "-crf", "10", "-x264-params", f"rc-lookahead={self.LOOKAHEAD}",
               "-f", "mp4", str(self.tmp)]
        # process_group=0: ffmpeg leaves our process group, so a Ctrl-C reaches paradit, which stops
        # it; set in C between fork and exec, no Python code runs in the child
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     process_group=0)
        with self.outputs._lock:
            self.outputs._encoders.add(self.proc)
        self.thread = threading.Thread(target=self._feed, name="paradit-video", daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        while (item := self.queue.get()) is not None:
            frames, ready = item
            if self.error is not None:
                continue                                  # ffmpeg is gone: drain, close() reports it
            try:
                if ready is not None:
                    ready.synchronize()
                self.proc.stdin.write(enlarge(np.asarray(frames))[0].tobytes())
            except (OSError, ValueError) as err:          # a broken pipe: ffmpeg failed or was stopped
                self.error = err
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self) -> int:
        """Wait for ffmpeg to finish the file; returns the enlargement factor."""
        if self.proc is None:
            raise EncodeError(f"{self.tmp.name}: no frames to encode")
        timeout = encode_timeout_s(self.pixels)
        proc = self.proc
        try:
            self.queue.put(None, timeout=self.STALL_S)
            self.thread.join(timeout)
            if self.thread.is_alive():               # still writing: ffmpeg stopped reading its input
                raise queue.Full
            proc.stdin = None                        # closed by the thread: communicate() reads stderr only
            _, err = proc.communicate(timeout=timeout)
        except (subprocess.TimeoutExpired, queue.Full):
            raise EncodeError(f"ffmpeg did not finish encoding {self.tmp.name} within {timeout:.0f} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with self.outputs._lock:
                self.outputs._encoders.discard(proc)
        if proc.returncode != 0 or self.error is not None:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or [str(self.error or "no message")]
            raise EncodeError(f"ffmpeg failed writing {self.tmp} (exit {proc.returncode}): {tail[0]}")
        return self.k


def write_now(path, write, *args) -> Path:
    """One file written atomically on its own (CHORDS' streamed hits): stage it, commit it."""
    out = Outputs()
    try:
        getattr(out, write)(path, *args)
        out.commit()
    finally:
        out.discard()
    return Path(path)


def write_video(path, frames, fps: int) -> Path:
    return write_now(path, "video", frames, fps)


def write_json(path, data: dict) -> Path:
    return write_now(path, "json", data)


def write_tensor(path, tensors: dict) -> Path:
    return write_now(path, "tensors", tensors)


# ---------------------------------------------------------------------- checks before the run
def check_writable(path: Path) -> str | None:
    """Why `path` cannot be written (None if it can): a directory in its place, a parent that is a
    file, a name longer than the file system takes, a folder where no file can be created. Probes
    with a file it removes at once; creates no folder. Also removes temporaries of dead processes
    beside `path`."""
    path = Path(path)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    size, limit = len(os.fsencode(path.name)), name_max(folder)
    if size > limit:  # first: even a stat of such a name fails
        return f"its name is {size} bytes, and the file system takes names of at most {limit}; give a shorter --out"
    if path.is_dir():
        return f"{path} is a directory; name a file"
    probe = temp_path(folder / "probe")
    try:
        probe.touch()
    except OSError as err:
        return f"cannot create files in {folder} ({err.strerror})"
    finally:
        probe.unlink(missing_ok=True)
    if path.parent.is_dir():
        remove_stale_temps(path.parent)
    return None


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporaries of processes that are gone (a SIGKILLed run) from `folder`."""
    for tmp in Path(folder).glob(f"{TEMP_PREFIX}*"):
        pid = tmp.name[len(TEMP_PREFIX) + 3:].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
