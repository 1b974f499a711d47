"""The HTTP API on rank 0 (FastAPI under uvicorn): the OpenAI-style Videos API, /health, /metrics, /.

Every request first passes paradit.serve.guard (its Host, its key, its body's size and time).
Handlers only read and write the job store and wake the scheduler; they never wait for the
engine, so a slow or vanished client cannot hold up any rank. Endpoints are plain functions, run
in the server's thread pool, because SQLite calls block.
"""
from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from paradit.serve import images
from paradit.serve.body import parse_body, validate_data, validation_error
from paradit.serve.guard import MAX_BODY, Guard
from paradit.serve.jobs import MIN_FREE, JobStore, disk_full
from paradit.serve.metrics import Metrics
from paradit.serve.schema import ApiError, VideoRequest, video_object

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class Service:
    """What the handlers share. checker and scheduler are set once the models are loaded."""
    model: str
    jobs: JobStore
    api_key: str | None
    max_queue: int
    layout: str = ""
    defaults: dict = field(default_factory=dict)   # the model's default settings, for the page
    request_timeout_s: float = 10.0                # --request-timeout: for the body (paradit.serve.guard)
    takes_images: bool = False                     # an I2V / TI2V model: POST /v1/videos may carry a first frame
    metrics: Metrics = field(default_factory=Metrics)
    checker: object = None
    scheduler: object = None
    accept_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        """An ApiError to raise, counted in the metrics."""
        self.metrics.rejected.labels(str(status)).inc()
        return ApiError(status, message, param, kind)

    def check_ready(self) -> None:
        if not self.ready:
            raise self.error(503, "the models are still loading; try again in a few seconds",
                             kind="service_unavailable")

    def find(self, video_id: str):
        job = self.jobs.get(video_id)
        if job is None:
            raise self.error(404, f"no video with id {video_id!r}", "video_id", kind="not_found_error")
        return job

    def obj(self, job) -> dict:
        return video_object(job, self.scheduler.progress(job) if job.status == "in_progress" else 0)

    def accept(self, request: dict):
        """Commit a job (the answer comes after), unless the queue is full or the state directory is."""
        free = self.jobs.free_bytes()
        if free < MIN_FREE:
            raise self.error(507, f"the state directory {self.jobs.dir} has {free // 2**20} MiB free, under the "
                                  f"{MIN_FREE // 2**20} MiB a job's files need: free space there; the jobs accepted "
                                  f"so far are kept", kind="insufficient_storage")
        with self.accept_lock:                # the depth check and the insert, together
            depth = self.scheduler.queue_depth()
            if depth >= self.max_queue:
                raise self.error(429, f"the queue is full ({depth} jobs waiting, --max-queue {self.max_queue}); "
                                      f"retry later", kind="rate_limit_error")
            try:
                job = self.jobs.add(self.model, request)  # committed before the answer
            except sqlite3.Error as err:
                full, db = disk_full(err), self.jobs.dir / "jobs.sqlite3"
                raise self.error(507 if full else 503, f"the job could not be stored in {db} ({err})"
                                 f"{': free space there' if full else ''}; the jobs accepted so far are kept",
                                 kind="insufficient_storage" if full else "service_unavailable") from None
        self.scheduler.wake.set()
        return job


async def video_request(request: Request) -> VideoRequest:
    """POST /v1/videos's body (read whole by paradit.serve.guard already): JSON (paradit.serve.schema) or
    a multipart form with the first frame (paradit.serve.images). A body over the plain limit must
    be carrying an image: the guard let it through only up to the image bound."""
    raw, content_type = await request.body(), request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body = validate_data(images.multipart_fields(raw, content_type))
    else:
        body = parse_body(raw, content_type)
    if body.input_reference is None and len(raw) > MAX_BODY:
        raise ApiError(413, f"the body is {len(raw)} bytes; at most {MAX_BODY} are taken without an "
                            f"input_reference", "body")
    return body


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="paradit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=service.api_key, timeout_s=service.request_timeout_s,
                       refused=lambda status: service.metrics.rejected.labels(str(status)).inc(),
                       image_body=images.MAX_IMAGE_BODY if service.takes_images else 0)
    add_error_handlers(app, service)
    add_video_routes(app, service)
    add_delete_route(app, service)
    add_service_routes(app, service)
    return app


def add_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(ApiError)
    def api_error(request: Request, err: ApiError):
        headers = {"Retry-After": "5"} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    def bad_query(request: Request, exc: RequestValidationError):
        err = validation_error(exc.errors())
        return api_error(request, service.error(422, err.message, err.param))

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException):
        return api_error(request, service.error(exc.status_code, str(exc.detail), kind="not_found_error"
                                                if exc.status_code == 404 else "invalid_request_error"))


def add_video_routes(app: FastAPI, service: Service) -> None:
    """The Videos API. Plain functions, run in the server's thread pool: SQLite calls block."""
    jobs, error, find, obj, ready = service.jobs, service.error, service.find, service.obj, service.check_ready

    @app.post("/v1/videos")
    def create_video(body: VideoRequest = Depends(video_request)):
        ready()
        image = None if body.input_reference is None else images.open_image(
            images.decode_base64(body.input_reference))
        request = service.checker.resolve(body, image)  # ApiError(400) names the field
        if image is not None:   # stored where every rank of the job reads it, before the job is
            request["image"] = images.store_image(image, jobs.dir)
        try:
            return obj(service.accept(request))
        except ApiError:        # refused (a full queue or disk): no job will read it
            jobs.drop_input(request)
            raise

    @app.get("/v1/videos")
    def list_videos(limit: int = Query(20, ge=1, le=100), order: str = Query("desc", pattern="^(asc|desc)$"),
                    after: str | None = None):
        ready()
        start = find(after) if after is not None else None
        page = jobs.list(limit + 1, order, start)
        data = [obj(j) for j in page[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(page) > limit}

    @app.get("/v1/videos/{video_id}")
    def get_video(video_id: str):
        ready()
        return obj(find(video_id))

    @app.get("/v1/videos/{video_id}/content")
    def get_content(video_id: str, variant: str = "video"):
        ready()
        job = find(video_id)
        if variant != "video":
            raise error(400, f"variant {variant!r}: only 'video' (the mp4) is offered", "variant")
        if job.status != "completed":
            raise error(409, f"video {video_id} is {job.status}" + (f": {job.error}" if job.error else
                             "; its content is there once it is completed"), "video_id")
        path = jobs.dir / job.file
        if not path.is_file():
            raise error(404, f"the video file of {video_id} is missing from the state directory", "video_id",
                        kind="not_found_error")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")


def add_delete_route(app: FastAPI, service: Service) -> None:
    jobs, error, find, ready = service.jobs, service.error, service.find, service.check_ready

    @app.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str):
        ready()
        job = find(video_id)
        if job.status == "queued" and jobs.delete(job, ("queued",)):
            return {"id": video_id, "object": "video.deleted", "deleted": True}
        job = find(video_id)  # re-read: the scheduler may have just taken it
        if job.status == "in_progress":   # stopped at its next step boundary, then deleted
            why = service.scheduler.cancel(job)
            if why is None:
                return {"id": video_id, "object": "video.deleted", "deleted": True}
            job = find(video_id)
            if job.status == "in_progress":
                raise error(409, f"video {video_id} is running and cannot be cancelled: {why}; delete it once "
                                 f"it has finished", "video_id")
        if jobs.delete(job, ("completed", "failed")):
            video = jobs.dir / job.video_file
            for f in (video, video.with_suffix(".json"), video.with_suffix(".latent.safetensors")):
                f.unlink(missing_ok=True)
        return {"id": video_id, "object": "video.deleted", "deleted": True}


def add_service_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    def health():
        if not service.ready:
            return JSONResponse({"status": "loading", "model": service.model}, status_code=503)
        return {"status": "ok", "model": service.model, "layout": service.layout, "defaults": service.defaults}

    @app.get("/metrics")
    def metrics():
        return Response(service.metrics.render(service.jobs.counts()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text())
