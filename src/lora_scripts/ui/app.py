"""The UI server's API (FastAPI): jobs, their logs and live events, the config's keys and its validation.

Every path a request names is taken relative to the root the server was started with and refused when it
resolves outside it (`..`, absolute paths, symlinks out). Jobs live in `<root>/.lora-scripts-ui/jobs`
(ui/jobs.py): the server holds no state of its own, so a restart finds them all again. With a token (needed
to listen on anything but loopback) every request carries it: `Authorization: Bearer <token>`, or
`?token=` for the browser's EventSource and images, which cannot set headers. The page itself and its
static files carry no data and load without it; the page then asks for the token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from lora_scripts.config import ConfigError
from lora_scripts.ui.commands import add_command_routes
from lora_scripts.ui.config_form import config_keys
from lora_scripts.ui.files import add_file_routes
from lora_scripts.ui.jobs import FINAL, JobError, JobStore
from lora_scripts.ui.paths import inside, rooted

REFRESH_SECONDS = 1.0  # how often the server brings job records up to date (the queue moves on this tick)
KEEP_ALIVE_SECONDS = 15.0  # an event stream with nothing new sends a comment this often: proxies keep it open
STATIC = Path(__file__).parent / "static"
# Requests run in a thread pool. The preflight and inspect import torch / transformers on first use, and
# two threads importing transformers' lazy modules at once can fail ("cannot import name CLIPTextConfig",
# seen here): they run one at a time.
ONE_AT_A_TIME = threading.Lock()


class JobRequest(BaseModel):
    config: str  # a training config, relative to the root
    overrides: list[str] = []


class CaptionEdit(BaseModel):
    folder: str  # an image folder, relative to the root
    captions: dict[str, str] = {}  # image key (as in metadata.csv) -> caption
    find: str = ""
    replace: str = ""
    trigger: str = ""


async def event_stream(store: JobStore, job_id: str, since: int = 0):
    """The run's events.jsonl as server-sent events, from line `since` on, as they are written (each with its
    line number as id, so a page that reconnects asks for the rest); a last `job` event with the job's record
    once it has ended and every line was sent. The file is read on from where the last read stopped; a line
    still being written waits for its newline."""
    events = Path(store.get(job_id).output_dir) / "events.jsonl"
    offset, number, partial, quiet = 0, 0, b"", 0.0
    while True:
        ended = store.get(job_id).state in FINAL  # read before the file: nothing written after it is missed
        if events.exists():
            with open(events, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                if number >= since and line.strip():
                    yield f"id: {number}\ndata: {line.decode('utf-8')}\n\n"
                    quiet = 0.0
                number += 1
        if ended:
            yield f"event: job\ndata: {json.dumps(asdict(store.get(job_id)))}\n\n"
            return
        if quiet >= KEEP_ALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await asyncio.sleep(0.5)
        quiet += 0.5


IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".bmp": "image/bmp"}


def add_dataset_routes(app: FastAPI, root: Path) -> None:
    """The dataset page's API: an image folder's captions (ui/dataset.py), their edits, the images."""
    from lora_scripts.data.images import CaptionFileError
    from lora_scripts.ui.dataset import (
        CaptionEditError,
        image_captions,
        prepend_trigger,
        replace_in_captions,
        save_captions,
    )

    def folder_of(relative: str) -> Path:
        folder = inside(root, relative)
        if not folder.is_dir():
            raise HTTPException(404, f"{relative}: no such folder")
        return folder

    @app.get("/api/dataset")
    def dataset(folder: str) -> dict:
        try:
            images, problems = image_captions(folder_of(folder))
        except CaptionFileError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"images": images, "problems": problems}

    @app.post("/api/dataset/captions")
    def edit_captions(edit: CaptionEdit) -> dict:
        """One of: `captions` saved; `find` replaced by `replace` in all; `trigger` put in front of all."""
        folder = folder_of(edit.folder)
        try:
            if edit.find:
                changed = replace_in_captions(folder, edit.find, edit.replace)
            elif edit.trigger:
                changed = prepend_trigger(folder, edit.trigger)
            else:
                changed = save_captions(folder, edit.captions)
        except (CaptionEditError, CaptionFileError) as exc:
            raise HTTPException(422, str(exc)) from None
        return {"changed": changed}

    @app.get("/api/image")
    def image(path: str):
        file = inside(root, path)
        if file.suffix.lower() not in IMAGE_TYPES or not file.is_file():
            raise HTTPException(404, f"{path}: not an image")
        return FileResponse(file, media_type=IMAGE_TYPES[file.suffix.lower()])


def add_job_routes(app: FastAPI, root: Path, store: JobStore) -> None:
    """Jobs (submit, list, stop, resume, log, live events) and the config's keys and preflight."""
    def job_or_404(job_id: str):
        try:
            return store.get(job_id)
        except JobError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/jobs")
    def list_jobs() -> list[dict]:
        return [asdict(j) for j in store.jobs()]

    @app.post("/api/jobs")
    def submit(req: JobRequest) -> dict:
        from lora_scripts.config_file import load_config

        config = inside(root, req.config)
        if not config.is_file():
            raise HTTPException(404, f"{req.config}: no such config file")
        try:
            output_dir = Path(load_config(config, req.overrides).output_dir)
            # relative paths in a config are the trainer's, run from the root: the outputs must stay inside
            inside(root, str(output_dir))
            return asdict(store.submit(config, req.overrides, cwd=root))
        except ConfigError as exc:
            raise HTTPException(422, str(exc).splitlines()) from None

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return asdict(job_or_404(job_id))

    def act(job_id: str, action) -> dict:  # 404 for an unknown job, 409 for an action that does not apply
        job_or_404(job_id)
        try:
            return asdict(action(job_id))
        except JobError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/api/jobs/{job_id}/stop")
    def stop_job(job_id: str) -> dict:
        return act(job_id, store.stop)

    @app.post("/api/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> dict:
        return act(job_id, store.resume)

    @app.get("/api/jobs/{job_id}/log", response_class=PlainTextResponse)
    def job_log(job_id: str, tail: int = 200) -> str:
        job_or_404(job_id)
        log = store.log_path(job_id)
        return "\n".join(log.read_text(errors="replace").splitlines()[-tail:]) if log.exists() else ""

    @app.get("/api/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, since: int = 0):
        job_or_404(job_id)
        last = request.headers.get("last-event-id", "")  # the browser's reconnect: go on after the last one
        since = int(last) + 1 if last.isdigit() else since
        return StreamingResponse(event_stream(store, job_id, since), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/config/keys")
    def keys() -> list[dict]:
        return config_keys()

    @app.post("/api/config/validate")
    def validate(req: JobRequest) -> dict:
        """The preflight on a config file: its findings, or the config's errors (file:line, did you mean)."""
        from lora_scripts.config_file import load_config
        from lora_scripts.preflight import run_preflight

        config = inside(root, req.config)
        try:
            cfg = load_config(config, req.overrides)
        except ConfigError as exc:
            return {"ok": False, "errors": str(exc).splitlines(), "findings": []}
        with ONE_AT_A_TIME:
            report = run_preflight(rooted(cfg, root))
        return {"ok": report.ok, "errors": report.errors,
                "findings": [{"level": f.level, "message": f.message} for f in report.findings]}


def create_app(root: Path, token: str | None = None, refresh: bool = True) -> FastAPI:
    """The app over `root`. `refresh`: a background thread moves jobs along (off in tests that tick by hand)."""
    root = Path(root).resolve()
    store = JobStore(root / ".lora-scripts-ui" / "jobs")
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(REFRESH_SECONDS):
            store.refresh()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=tick, daemon=True) if refresh else None
        if thread:
            thread.start()
        yield
        stop.set()

    app = FastAPI(title="lora-scripts", lifespan=lifespan)
    app.state.store, app.state.root = store, root
    add_dataset_routes(app, root)
    add_file_routes(app, root)
    add_command_routes(app, root, store)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/about")
    def about() -> dict:
        """What the page shows in its header: the folder served and whether a token guards it."""
        return {"root": str(root), "token": token is not None}

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is not None and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ") or request.query_params.get("token", "")
            if not secrets.compare_digest(given, token):
                return JSONResponse({"detail": "this UI needs its token (Authorization: Bearer ...)"}, status_code=401)
        return await call_next(request)

    add_job_routes(app, root, store)
    return app
