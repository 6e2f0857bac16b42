"""The UI's file routes: browsing the root (the pickers: no native file dialog, so a headless server works),
downloads, config files read and written as the form's mapping, an LLM dataset as a table, image uploads.

Every path goes through `inside` (ui/paths.py): nothing outside the root is listed, read or written. Uploads are
size-limited and decoded as images before anything is saved; a file that PIL cannot open is refused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from lora_scripts.atomic import write_text_atomic
from lora_scripts.ui.paths import inside

UPLOAD_LIMIT = 32 * 1024 * 1024  # bytes per image: a 4096 px PNG is ~25 MB
TABLE_LIMIT = 500  # rows of an LLM dataset sent to the page
HIDDEN = (".lora-scripts-ui", ".git", "__pycache__", ".venv")


class ConfigValues(BaseModel):
    values: dict[str, Any]
    path: str = ""  # where to save (relative to the root); "" to only check


def add_file_routes(app: FastAPI, root: Path) -> None:
    from lora_scripts.config_file import check_values
    from lora_scripts.ui.config_form import ConfigFileError, read_values, values_yaml

    @app.get("/api/files")
    def files(path: str = ".") -> dict:
        """A folder's entries, folders first: what the path pickers show."""
        folder = inside(root, path)
        if not folder.is_dir():
            raise HTTPException(404, f"{path}: no such folder")
        entries = sorted((p for p in folder.iterdir() if p.name not in HIDDEN),
                         key=lambda p: (not p.is_dir(), p.name.lower()))
        return {"path": str(folder.relative_to(root)), "entries": [
            {"name": p.name, "path": str(p.relative_to(root)), "dir": p.is_dir(),
             "size": p.stat().st_size if p.is_file() else None} for p in entries]}

    @app.get("/api/file")
    def download(path: str):
        file = inside(root, path)
        if not file.is_file():
            raise HTTPException(404, f"{path}: no such file")
        return FileResponse(file, filename=file.name)

    @app.get("/api/config/file")
    def config_file(path: str) -> dict:
        file = inside(root, path)
        if not file.is_file():
            raise HTTPException(404, f"{path}: no such config file")
        try:
            values = read_values(file)
        except ConfigFileError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"path": path, "values": values, "errors": _errors(check_values(values))}

    @app.post("/api/config/check")
    def check(req: ConfigValues) -> dict:
        """Each key's problems (the config's own messages, "did you mean" included); with `path`, the values
        are saved there as YAML too, problems or not, so no edit is ever lost (training refuses a bad one)."""
        errors = _errors(check_values(req.values))
        if req.path:
            file = inside(root, req.path)
            if file.suffix not in (".yaml", ".yml"):
                raise HTTPException(422, f"{req.path}: a config file ends in .yaml or .yml")
            file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(file, values_yaml(req.values))
        return {"errors": errors, "saved": req.path or None}

    @app.get("/api/dataset/table")
    def table(path: str) -> dict:
        """An LLM dataset (CSV, JSONL, a folder of .txt) as the trainer reads it: one row per sample."""
        from lora_scripts.data.text import DataError, load_samples

        try:
            samples = load_samples(inside(root, path))
        except DataError as exc:
            raise HTTPException(422, str(exc)) from None
        rows = [{"origin": s.origin.rsplit("/", 1)[-1], "messages": s.messages, "text": s.text}
                for s in samples[:TABLE_LIMIT]]
        return {"rows": rows, "total": len(samples)}

    @app.post("/api/dataset/upload")
    async def upload(folder: str, name: str, request: Request) -> dict:
        """One image, the request body as is; decoded before it is saved, never over an existing file."""
        from PIL import Image, UnidentifiedImageError

        from lora_scripts.ui.app import IMAGE_TYPES

        target = inside(root, folder)
        file = inside(root, str(Path(folder) / Path(name).name))
        if not target.is_dir():
            raise HTTPException(404, f"{folder}: no such folder")
        if file.suffix.lower() not in IMAGE_TYPES:
            raise HTTPException(422, f"{name}: not an image name ({', '.join(IMAGE_TYPES)})")
        if file.exists():
            raise HTTPException(409, f"{file.name} is already in {folder}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > UPLOAD_LIMIT:
                raise HTTPException(413, f"{name}: larger than {UPLOAD_LIMIT // 2**20} MB")
        try:
            with Image.open(io.BytesIO(body)) as image:
                image.load()  # decodes every pixel: a truncated or forged file fails here, not in training
                size = image.size
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise HTTPException(422, f"{name}: not a readable image ({exc})") from None
        partial = file.with_name(f".{file.name}.part")
        partial.write_bytes(body)
        partial.replace(file)
        return {"saved": str(file.relative_to(root)), "width": size[0], "height": size[1]}


def _errors(found: list[tuple[str, str]]) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for key, message in found:
        errors.setdefault(key, []).append(message)
    return errors
