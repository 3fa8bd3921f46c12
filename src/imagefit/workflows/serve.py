"""imagefit serve: a FastAPI app under uvicorn. ``POST /predict`` (images as multipart)
answers JSON per image (top classes, labels over the threshold, or values; Grad-CAM overlays
on request), ``GET /health``, ``GET /model``, and at ``/`` a page to drop images on. Uploads
are limited in bytes, count and pixels, and every bad one is answered 4xx with a message;
the images of concurrent requests share forward passes (``evaluation.serving.Batcher``)."""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, whose
# classes are imported inside create_app (fastapi is an optional extra).
import asyncio
import base64
import socket
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import ServeOptions, merge_options
from ..errors import ImagefitError
from ..evaluation.serving import Batcher, ServedModel, UploadError
from ..report.overlays import overlay_png
from ..report.serve_page import serve_page

MISSING = ("serve needs fastapi, uvicorn and python-multipart: pip install 'imagefit[serve]' "
           "(or pip install fastapi uvicorn python-multipart)")
REQUEST_SLACK = 1 << 20  # a request's bytes beyond its files: form headers and fields


def require_serve() -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  reads the uploads
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImagefitError(MISSING) from None


class _BodyLimit:
    """Refuses (413) a request whose body is over ``limit`` bytes: at once when it says its
    length, else as soon as more has arrived, before it is all read."""

    def __init__(self, app, limit: int, counts: dict) -> None:
        self.app, self.limit, self.counts = app, limit, counts

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (f"the request is over the limit of {self.limit / 1e6:.1f} MB: send fewer "
                   "or smaller images per request")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            status = 413 if length.isdigit() else 400
            detail = message if status == 413 else "the Content-Length header is not a number"
            self.counts["refused"] += 1
            return await JSONResponse({"detail": detail}, status)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, message)
            return event

        return await self.app(scope, limited, send)


class _RequestLimit:
    """Answers 503 to a request while ``limit`` others are in progress. It counts requests,
    not connections: a connection waiting for a request costs nothing here (uvicorn's
    ``limit_concurrency`` counted those, and silent connections starved every request)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit, self.running = app, limit, 0

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.running >= self.limit:
            busy = JSONResponse({"detail": f"the server is busy with {self.limit} requests: "
                                           "try again in a moment"}, 503,
                                headers={"Retry-After": "1"})
            return await busy(scope, receive, send)
        self.running += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.running -= 1


def create_app(served: ServedModel, options: ServeOptions | None = None):
    """The FastAPI app serving ``served``; its batcher stops with the app."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse

    options = options or ServeOptions()
    batcher = Batcher(served.predict, options.max_batch, options.batch_wait_ms / 1000.0)
    max_file = int(options.max_file_mb * 1e6)
    limits = {"max_files": options.max_files, "max_file_mb": options.max_file_mb,
              "max_pixels": options.max_pixels,
              "max_request_mb": round((options.max_files * max_file + REQUEST_SLACK) / 1e6, 2)}
    counts = {"requests": 0, "images": 0, "refused": 0, "failed": 0}
    started = time.time()
    page = serve_page(served.describe(), limits)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="imagefit", summary=f"serving {served.name}", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=options.max_files * max_file + REQUEST_SLACK,
                       counts=counts)
    app.add_middleware(_RequestLimit, limit=options.max_connections)  # outermost: first

    _answer_errors(app, counts)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "uptime_s": round(time.time() - started, 1), **counts,
                "forward_passes": batcher.batches, "batched_images": batcher.images}

    @app.get("/model")
    def model() -> dict:
        return {**served.describe(), "limits": limits,
                "batching": {"max_batch": options.max_batch,
                             "wait_ms": options.batch_wait_ms}}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = options.top_k, saliency: bool = False):
        """Images as multipart files (any field name, usually ``files``): per image its top
        ``top_k`` classes with probabilities (``label``, or ``labels`` over the threshold
        for multi-label) or its ``values`` (regression); ``saliency=true`` adds a Grad-CAM
        overlay as a PNG data URL."""
        if top_k < 1:
            raise UploadError(422, "top_k must be 1 or more")
        names, images = await _read_uploads(request, served, options)
        batch = torch.stack(images)
        activated = await asyncio.wrap_future(batcher.submit(batch))
        answers = [{"file": name, **served.answer(row, top_k)}
                   for name, row in zip(names, activated)]
        if saliency and served.explainer is not None:
            targets = torch.tensor([answer["target"] for answer in answers])
            maps = await run_in_threadpool(served.explain, batch, targets)
            for answer, image, found in zip(answers, batch, maps):
                answer["saliency"] = "data:image/png;base64," + base64.b64encode(
                    overlay_png(image, found)).decode("ascii")
                answer["explained"] = served.task.names[answer["target"]]
        counts["requests"] += 1
        counts["images"] += len(answers)
        return {"predictions": answers}

    return app


def _answer_errors(app, counts: dict) -> None:
    """Every error as JSON ``{"detail": ...}`` with its status, counted: the client's
    (refused) and the server's own (failed)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(UploadError)
    async def refused(request: Request, error: UploadError):
        counts["refused"] += 1
        return JSONResponse({"detail": error.message}, error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        counts["refused"] += 400 <= error.status_code < 500
        return JSONResponse({"detail": error.detail}, error.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):  # ours, not the client's
        counts["failed"] += 1
        return JSONResponse({"detail": f"the server failed on this request "
                                       f"({type(error).__name__}: {str(error)[:200]})"}, 500)


async def _read_uploads(request, served: ServedModel,
                        options: ServeOptions) -> tuple[list[str], list[torch.Tensor]]:
    """The request's image files, each checked against --max-file-mb and decoded (checked
    against --max-pixels) off the event loop: their names and uint8 (C, S, S) tensors."""
    from fastapi.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    max_file = int(options.max_file_mb * 1e6)
    form = await _read_form(request, options.max_files)
    try:
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise UploadError(400, "no images in the request: send image files as "
                                   "multipart/form-data (e.g. curl -F files=@cat.jpg)")
        names, images = [], []
        for upload in uploads:
            name = (upload.filename or "upload")[:120]
            data = await upload.read(max_file + 1)
            if len(data) > max_file:
                raise UploadError(413, f"{name} is over the limit of "
                                       f"{options.max_file_mb:g} MB: send a smaller file")
            images.append(await run_in_threadpool(served.decode, data, name,
                                                  options.max_pixels))
            names.append(name)
    finally:
        await form.close()
    return names, images


async def _read_form(request, max_files: int):
    """The request's multipart form, at most ``max_files`` files; a form that cannot be read
    is the client's error (4xx), never the server's."""
    from starlette.exceptions import HTTPException

    try:
        return await request.form(max_files=max_files, max_fields=max_files + 16)
    except HTTPException as error:
        if error.status_code == 413:
            raise
        if "Too many files" in str(error.detail):
            raise UploadError(413, f"too many files: at most {max_files} images per request; "
                                   "send the rest in another request") from None
        raise UploadError(400, f"the request body is not a readable multipart form "
                               f"({error.detail})") from None
    except Exception as error:  # the multipart parser's own kinds of failure
        raise UploadError(400, f"the request body is not a readable multipart form "
                               f"({type(error).__name__})") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port), or one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says TCP; else every keep-alive response waits 40 ms for the
    # client's delayed ACK (measured: /health 44 ms against 1 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ImagefitError(f"cannot listen on {host}:{port} ({error.strerror}): choose "
                            "another --port (0: any free port) or --host") from None
    sock.listen(2048)
    return sock


def serve(source: str | Path, options: ServeOptions | None = None, **overrides: Any) -> None:
    """Serve the model of ``source`` (a run, a CV directory or an exported ONNX file) until
    interrupted (Ctrl-C or SIGTERM), printing its address first."""
    options = merge_options(ServeOptions, options, overrides)
    require_serve()
    import uvicorn

    from .serve_connections import IdleClosingProtocol, IdleConnections

    if options.max_pixels > Image.MAX_IMAGE_PIXELS:
        raise ImagefitError(f"--max-pixels {options.max_pixels:,} is over the "
                            f"{Image.MAX_IMAGE_PIXELS:,} pixels PIL opens (its decompression-"
                            "bomb limit): give at most that")
    served = ServedModel.load(source, options.device, options.precision, options.saliency)
    app = create_app(served, options)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    idle = IdleConnections(options.idle_timeout, options.max_connections)
    config = uvicorn.Config(app, log_level="info" if options.log_requests else "warning",
                            access_log=options.log_requests, lifespan="on", ws="none",
                            http=partial(IdleClosingProtocol, idle=idle),
                            timeout_keep_alive=options.idle_timeout)
    print(f"serving {source} ({served.engine}, {served.task.kind}) at http://{shown}:{port}/ "
          "(Ctrl-C stops)", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the signal it caught
        pass
    finally:
        sock.close()
    print("stopped", flush=True)
