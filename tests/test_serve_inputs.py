"""A job's first frame (inputs/NAME.png) lives as long as the job may run (paradit.serve.jobs): the
job store's every ending, put-back and restart, on the store itself (the HTTP path, completion and
DELETE, is tests/test_serve_images.py's)."""
from __future__ import annotations

from ckpt_workers import sample_image
from paradit.serve.images import store_image
from paradit.serve.jobs import JobStore


def test_first_frames_go_when_their_job_ends_and_stay_while_it_may_run(tmp_path):
    store = JobStore(tmp_path)
    image = sample_image()

    def job_with_image():
        name = store_image(image, tmp_path)
        return store.add("m", {"prompt": "p", "image": name}), tmp_path / name

    done, done_file = job_with_image()
    failed, failed_file = job_with_image()
    back, back_file = job_with_image()
    deleted, deleted_file = job_with_image()
    assert done_file != failed_file and all(f.is_file() for f in (done_file, failed_file, back_file, deleted_file))
    for job in (done, failed, back):
        assert store.next_queued().seq == job.seq
    store.complete(done.seq, done.video_file, {})
    store.fail(failed.seq, "boom")
    store.requeue(back.seq)                                  # the service stopped: it runs again later
    assert not done_file.exists() and not failed_file.exists() and back_file.is_file()
    assert store.get(done.id).request["image"] == done_file.relative_to(tmp_path).as_posix()   # the record stays
    assert store.delete(deleted, ("queued",)) and not deleted_file.exists()

    # a restart: the queued job keeps its frame; a file no queued job names goes, a job failed at
    # recovery takes its own with it
    orphan = tmp_path / store_image(image, tmp_path)
    stale, stale_file = job_with_image()
    settled = store.recover("m", lambda request: "unrunnable" if request["image"] == stale.request["image"] else None)
    assert settled["inputs"] == 2 and settled["failed"] == 1
    assert back_file.is_file() and not orphan.exists() and not stale_file.exists()
    # a request's own name only: never a path outside inputs/
    outside = tmp_path / "videos" / "keep.png"
    outside.write_bytes(b"x")
    store.drop_input({"image": "videos/keep.png"})
    store.drop_input({"image": "inputs/../videos/keep.png"})
    assert outside.is_file()
    store.close()
