"""The HTTP API on rank 0 (FastAPI under uvicorn): the OpenAI-style Videos API, /health, /metrics, /.

Handlers only read and write the job store and wake the scheduler; they never wait for the
engine, so a slow or vanished client cannot hold up any rank. Endpoints are plain functions, run
in the server's thread pool, because SQLite calls block.
"""
from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from paradit.serve.jobs import JobStore
from paradit.serve.metrics import Metrics
from paradit.serve.schema import ApiError, VideoRequest, validation_error, video_object

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024  # bytes: a request is a prompt and a few numbers


@dataclass
class Service:
    """What the handlers share. checker and scheduler are set once the models are loaded."""
    model: str
    jobs: JobStore
    api_key: str | None
    max_queue: int
    layout: str = ""
    defaults: dict = field(default_factory=dict)   # the model's default settings, for the page
    metrics: Metrics = field(default_factory=Metrics)
    checker: object = None
    scheduler: object = None
    accept_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.scheduler is not None


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="paradit serve", docs_url=None, redoc_url=None, openapi_url=None)
    jobs = service.jobs

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        service.metrics.rejected.labels(str(status)).inc()
        return ApiError(status, message, param, kind)

    @app.exception_handler(ApiError)
    def api_error(request: Request, err: ApiError):
        headers = {"Retry-After": "5"} if err.status in (429, 503) else None
        if err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    def bad_body(request: Request, exc: RequestValidationError):
        err = validation_error(exc.errors(), request.headers.get("content-type", ""))
        return api_error(request, error(422, err.message, err.param))

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException):
        return api_error(request, error(exc.status_code, str(exc.detail), kind="not_found_error"
                                        if exc.status_code == 404 else "invalid_request_error"))

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        """Every /v1 request needs `Authorization: Bearer KEY` when the service has a key; before
        the body is even read, so a wrong key never learns whether its body was valid. Bodies
        larger than MAX_BODY are refused before they are read."""
        if service.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {service.api_key}".encode()):
                err = error(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                            kind="authentication_error")
                return JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            err = error(413, f"the body is {length} bytes; at most {MAX_BODY} are taken", "body")
            return JSONResponse(err.body(), status_code=413)
        return await call_next(request)

    def ready() -> None:
        if not service.ready:
            raise error(503, "the models are still loading; try again in a few seconds", kind="service_unavailable")

    def find(video_id: str):
        job = jobs.get(video_id)
        if job is None:
            raise error(404, f"no video with id {video_id!r}", "video_id", kind="not_found_error")
        return job

    def obj(job) -> dict:
        return video_object(job, service.scheduler.progress(job) if job.status == "in_progress" else 0)

    # ------------------------------------------------------------------ the Videos API
    @app.post("/v1/videos")
    def create_video(body: VideoRequest):
        ready()
        request = service.checker.resolve(body)  # ApiError(400) names the field
        with service.accept_lock:                # the depth check and the insert, together
            depth = service.scheduler.queue_depth()
            if depth >= service.max_queue:
                raise error(429, f"the queue is full ({depth} jobs waiting, --max-queue {service.max_queue}); "
                                 f"retry later", kind="rate_limit_error")
            job = jobs.add(service.model, request)  # committed before the answer
        service.scheduler.wake.set()
        return obj(job)

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

    @app.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str):
        ready()
        job = find(video_id)
        if job.status == "queued" and jobs.delete(job, ("queued",)):
            return {"id": video_id, "object": "video.deleted", "deleted": True}
        job = find(video_id)  # re-read: the scheduler may have just taken it
        if job.status == "in_progress":
            raise error(409, f"video {video_id} is running and cannot be cancelled; delete it once it has "
                             f"finished", "video_id")
        if jobs.delete(job, ("completed", "failed")):
            video = jobs.dir / job.video_file
            for f in (video, video.with_suffix(".json"), video.with_suffix(".latent.safetensors")):
                f.unlink(missing_ok=True)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    # ------------------------------------------------------------------ service endpoints
    @app.get("/health")
    def health():
        if not service.ready:
            return JSONResponse({"status": "loading", "model": service.model}, status_code=503)
        return {"status": "ok", "model": service.model, "layout": service.layout, "defaults": service.defaults}

    @app.get("/metrics")
    def metrics():
        return Response(service.metrics.render(jobs.counts()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text())

    return app
