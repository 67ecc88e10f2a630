"""The HTTP API the pages use and scripts can call (docs/ui.md), and the app that serves it with
the pages. Every route goes through the guard; every path through the workspace's checks."""
from __future__ import annotations

import asyncio
import json
import shlex
import signal
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.formparsers import MultiPartException

from ..config.loading import preset_names
from ..io.errors import ConfigError, LoraBoothError
from ..results import report
from . import datasets, generating, pages, progress, run_request
from .guard import Guard, harden
from .memory_plan import memory_plan
from .store import FINAL, RunStore
from .worker import Workers
from .workspace import OutsideWorkspace, Workspace, inside

EVENT_POLL_S = 0.5
MAX_COMPARED = 6
KEEPALIVE_S = 15.0


class Studio:
    """What the routes share: the workspace, the queue and its workers."""

    def __init__(self, workspace: Path, devices: list[str | None] | None = None) -> None:
        self.workspace = Workspace(workspace)
        self.store = RunStore(self.workspace.database)
        self.workers = Workers(self.workspace, self.store, devices)

    def run_or_404(self, run_id: int):
        run = self.store.get(run_id)
        if run is None:
            raise NotFound(f"no run {run_id}")
        return run


class NotFound(LoraBoothError):
    pass


def error_response(error: LoraBoothError) -> JSONResponse:
    status = 404 if isinstance(error, (NotFound, OutsideWorkspace)) else 422 if isinstance(error, ConfigError) else 400
    return JSONResponse({"detail": str(error), "problems": run_request.first_lines(error)}, status)


def create_app(workspace: Path, host: str = "127.0.0.1", token: str = "", start_workers: bool = True,
               devices: list[str | None] | None = None) -> FastAPI:
    studio = Studio(workspace, devices)
    guard = Guard(host, token)

    @asynccontextmanager
    async def lifespan(app):
        if start_workers:
            studio.workers.start()
        yield
        if start_workers:
            await run_in_threadpool(studio.workers.shutdown)

    app = FastAPI(title="lora-booth studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio

    @app.middleware("http")
    async def guarded(request: Request, call_next):
        refused = guard.refusal(request)
        if refused is not None:
            return harden(refused, page=False)
        response = await call_next(request)
        files = request.url.path.startswith("/files/") or \
            (request.url.path.startswith("/api/runs/") and "/files/" in request.url.path)
        return harden(response, page=not files)

    @app.exception_handler(LoraBoothError)
    async def ours(request: Request, error: LoraBoothError):
        return error_response(error)

    # ------------------------------------------------------------------------------------ runs

    @app.get("/api/runs")
    def list_runs():
        return [{k: v for k, v in progress.snapshot(studio.workspace, run, 0).items() if k not in ("losses", "log")}
                for run in studio.store.all()]

    @app.post("/api/runs", status_code=201)
    async def new_run(request: Request):
        keys = await json_body(request)
        checked = await run_in_threadpool(run_request.check, studio.workspace, keys)
        return {"id": studio.store.add(keys, checked.max_steps), "max_steps": checked.max_steps}

    @app.post("/api/validate")
    async def validate(request: Request):
        body = await json_body(request)
        try:
            fields = body.get("keys") or {}
            if not isinstance(fields, dict):
                raise ConfigError("keys", "must be a JSON object of train keys")
            keys = run_request.merged_keys(fields, str(body.get("yaml") or ""))
            checked = await run_in_threadpool(run_request.check, studio.workspace, keys, True)
        except LoraBoothError as error:
            return {"ok": False, "problems": run_request.first_lines(error)}
        words = run_request.command(studio.workspace, 0, checked.arguments, False)
        return {"ok": True, "keys": keys, "max_steps": checked.max_steps, "summary": checked.summary,
                "trigger": checked.trigger,
                "command": "lora-booth " + shlex.join(words).replace("run-0", "run-<id>")}

    @app.post("/api/plan")
    async def memory(request: Request):
        keys = await json_body(request)
        checked = await run_in_threadpool(run_request.check, studio.workspace, keys)
        return await run_in_threadpool(memory_plan, checked, str(studio.workspace.runs / "run-new"))

    @app.get("/api/runs/{run_id}")
    def get_run(run_id: int):
        return progress.snapshot(studio.workspace, studio.run_or_404(run_id))

    @app.post("/api/runs/{run_id}/stop")
    def stop_run(run_id: int):
        studio.run_or_404(run_id)
        return {"status": studio.store.request_stop(run_id)}

    @app.post("/api/runs/{run_id}/save-now")
    def save_now(run_id: int):
        return {"asked": ask_running(studio.run_or_404(run_id), signal.SIGUSR1, "save-now")}

    @app.post("/api/runs/{run_id}/sample-now")
    def sample_now(run_id: int):
        return {"asked": ask_running(studio.run_or_404(run_id), signal.SIGUSR2, "sample-now")}

    def ask_running(run, signum, what: str) -> bool:
        """Save now / sample now: train answers at its next step boundary and goes on."""
        if run.status != "running":
            raise ConfigError(what, f"run {run.id} is {run.status}; only a running run can be asked")
        if progress.snapshot(studio.workspace, run, log_lines=0)["step"] < 1:
            raise ConfigError(what, f"run {run.id} has not trained a step yet (it is loading, caching or drawing "
                              "class images)", "ask again once its first step is logged")
        checked = run_request.check(studio.workspace, run.request, with_trigger=False)
        if checked.processes > 1:
            raise ConfigError(what, f"run {run.id} trains in {checked.processes} processes, which the studio does not "
                              "signal one by one", "stop it (it saves a checkpoint), or wait for its next checkpoint")
        if what == "sample-now" and not checked.draws_samples:
            raise ConfigError(what, f"run {run.id} draws no sample grids (sample.num=0)",
                              "start the run with sample.num=1 or more")
        if not studio.workers.ask(run.id, signum):
            raise ConfigError(what, f"run {run.id} has no training process in this server yet; try again in a moment")
        return True

    @app.post("/api/runs/{run_id}/resume")
    def resume_run(run_id: int):
        run = studio.run_or_404(run_id)
        if not studio.store.requeue(run_id):
            raise ConfigError("resume", f"run {run_id} is {run.status}; only a stopped or failed run resumes")
        return {"status": "queued"}

    @app.post("/api/runs/{run_id}/move")
    async def move_run(run_id: int, request: Request):
        body = await json_body(request)
        before = body.get("before")
        if before is not None and not isinstance(before, int):
            raise ConfigError("before", "must be the id of a queued run, or null for the end of the queue")
        if not studio.store.move(run_id, before):
            raise ConfigError("move", "only a queued run moves, and only before another queued run")
        return {"ok": True}

    @app.post("/api/runs/{run_id}/generate")
    async def generate(run_id: int, request: Request):
        run = studio.run_or_404(run_id)
        body = await json_body(request)
        busy = [other.id for other in studio.store.all() if other.status == "running"]
        images = await run_in_threadpool(generating.generate, studio.workspace, run, body, busy)
        return {"images": images}

    @app.get("/api/runs/{run_id}/generated/{name:path}")
    def generated_file(run_id: int, name: str):
        studio.run_or_404(run_id)
        path = inside(generating.folder(studio.workspace, run_id), name, "file")
        if not path.is_file() or path.suffix != ".png":
            raise NotFound(f"run {run_id} has no generated image {name[:200]}")
        return FileResponse(path)

    @app.get("/api/runs/{run_id}/files/{name:path}")
    def run_file(run_id: int, name: str):
        studio.run_or_404(run_id)
        path = inside(studio.workspace.run_dir(run_id), name, "file")
        if not path.is_file():
            raise NotFound(f"run {run_id} has no file {name[:200]}")
        download = path.suffix == ".safetensors"
        return FileResponse(path, filename=path.name if download else None)

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: int, request: Request):
        studio.run_or_404(run_id)

        async def stream():
            last, quiet = None, 0.0
            while not await request.is_disconnected():
                run = await run_in_threadpool(studio.store.get, run_id)
                state = await run_in_threadpool(progress.snapshot, studio.workspace, run)
                text = json.dumps(state)
                if text != last:
                    last, quiet = text, 0.0
                    yield f"data: {text}\n\n"
                    if run.status in FINAL:
                        return
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(EVENT_POLL_S)
                quiet += EVENT_POLL_S

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.post("/api/compare")
    async def compare(request: Request):
        """The runs side by side: `lora-booth report` of their folders, one comparison page."""
        ids = (await json_body(request)).get("runs")
        if not isinstance(ids, list) or not 2 <= len(ids) <= MAX_COMPARED or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError("runs", f"must list 2 to {MAX_COMPARED} run ids, e.g. [1, 2]")
        for run_id in ids:
            studio.run_or_404(run_id)
        page = studio.workspace.runs / f"compare-{'-'.join(map(str, ids))}.html"
        await run_in_threadpool(report.write, [studio.workspace.run_dir(i) for i in ids], page, True)
        return {"url": f"/files/runs/{page.name}"}

    @app.get("/files/runs/{name:path}")
    def runs_file(name: str):
        """A comparison page and the run files it links to (relative to runs/)."""
        path = inside(studio.workspace.runs, name, "file")
        if not path.is_file():
            raise NotFound(f"no file {name[:200]}")
        return FileResponse(path)

    @app.get("/api/presets")
    def list_presets():
        return preset_names()

    # -------------------------------------------------------------------------------- datasets

    @app.get("/api/datasets")
    def list_datasets():
        return [{"name": name, "photos": len(datasets.photos(studio.workspace, name))}
                for name in datasets.names(studio.workspace)]

    @app.post("/api/datasets", status_code=201)
    async def new_dataset(request: Request):
        body = await json_body(request)
        datasets.create(studio.workspace, str(body.get("name", "")))
        return {"name": body["name"]}

    @app.get("/api/datasets/{name}")
    def get_dataset(name: str):
        return {"name": name, "path": f"datasets/{name}", "photos": datasets.photos(studio.workspace, name)}

    @app.post("/api/datasets/{name}/files")
    async def upload(name: str, request: Request):
        datasets.existing(studio.workspace, name)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return JSONResponse({"detail": "an upload must state its size (Content-Length)"}, 411)
        if int(length) > datasets.MAX_UPLOAD_BYTES:
            return JSONResponse({"detail": f"an upload is at most {datasets.MAX_UPLOAD_BYTES // 2**20} MiB; "
                                           "send the photos in several parts"}, 413)
        try:
            form = await request.form(max_files=datasets.MAX_FILES_PER_UPLOAD, max_fields=10)
        except MultiPartException as error:
            return JSONResponse({"detail": f"the upload was refused: {error.message}"}, 400)
        stored, refused = [], []
        for item in form.getlist("files"):
            if isinstance(item, str):
                continue
            raw = item.filename or ""
            data = await item.read(datasets.MAX_FILE_BYTES + 1)
            try:
                stored.append(await run_in_threadpool(datasets.store, studio.workspace, name, raw, data))
            except LoraBoothError as error:
                refused.append({"name": raw[:200], "reason": str(error)})
        await form.close()
        return {"stored": stored, "refused": refused}

    @app.put("/api/datasets/{name}/captions/{photo}")
    async def caption(name: str, photo: str, request: Request):
        body = await json_body(request)
        await run_in_threadpool(datasets.set_caption, studio.workspace, name, photo, str(body.get("caption", "")))
        return {"ok": True}

    @app.get("/api/datasets/{name}/thumbnails/{photo}")
    def thumbnail(name: str, photo: str):
        return Response(datasets.thumbnail(studio.workspace, name, photo), media_type="image/png",
                        headers={"Cache-Control": "no-cache"})

    # ----------------------------------------------------------------------------- pages, files

    @app.get("/static/{name}")
    def static(name: str):
        if name not in ("studio.js", "studio.css"):
            raise NotFound(f"no file {name[:100]}")
        text = (resources.files("lora_booth.studio") / "static" / name).read_text(encoding="utf-8")
        return Response(text, media_type="text/javascript" if name.endswith(".js") else "text/css")

    pages.add_routes(app, studio)
    return app


JSON_CAP = 2**20  # bytes of a JSON request body


async def json_body(request: Request) -> dict:
    length = request.headers.get("content-length") or "0"
    if not length.isdigit() or int(length) > JSON_CAP:
        raise ConfigError("request", "is over 1 MiB of JSON")
    raw = bytearray()
    async for chunk in request.stream():  # counted as it comes: a chunked body states no length
        raw += chunk
        if len(raw) > JSON_CAP:
            raise ConfigError("request", "is over 1 MiB of JSON")
    try:
        body = json.loads(bytes(raw) or b"{}")
    except ValueError as error:
        raise ConfigError("request", f"is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise ConfigError("request", "must be a JSON object")
    return body
