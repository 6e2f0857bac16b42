"""The UI's actions beyond training, each the `lora-scripts` command a user would type, queued as a job
(ui/jobs.py) so it shows its log, survives a reload and waits for the device like training does:

- label:   `label --input FOLDER [--trigger WORD]` (CLIP auto-captions into metadata.csv)
- compare: `generate --compare --base B --lora ADAPTER --prompt P` (LLM: base and tuned replies)
- grid:    `generate --same-seed --lora-dir RUN --prompt "P <lora:NAME:S>" ...` (SD: strength x prompt)
- export:  `export --merge` (LLM: a merged transformers model) or `merge` (SD: a merged checkpoint)
- convert: `convert FILE OUT --to kohya|diffusers|peft`
and `inspect`, quick and device-free, answered at once. Arguments are lists, never shell strings; every
path is checked to lie inside the root.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from lora_scripts.atomic import write_text_atomic
from lora_scripts.ui.paths import inside, rooted


class LabelRequest(BaseModel):
    folder: str
    trigger: str = ""
    clip_model: str = ""  # a local CLIP folder under the root (default: the one in the Hugging Face cache)


class RunAction(BaseModel):
    job: str  # the training job whose result is used
    adapter: str = ""  # a checkpoint folder of the run instead of its final adapter (relative to the root)
    prompts: list[str] = Field(default_factory=list)
    strengths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])


class ConvertRequest(BaseModel):
    path: str
    to: str = Field(pattern="^(kohya|diffusers|peft)$")


def add_command_routes(app: FastAPI, root: Path, store) -> None:
    from lora_scripts.config import ConfigError
    from lora_scripts.config_file import load_config
    from lora_scripts.ui.jobs import JobError

    def queue(command: list[str], output_dir: Path) -> dict:
        return asdict(store.submit_command(command, output_dir, cwd=root))

    def trained(action: RunAction):
        """The training job's config and output folder; 404/409 when there is no result to use yet."""
        try:
            job = store.get(action.job)
        except JobError as exc:
            raise HTTPException(404, str(exc)) from None
        if job.kind != "train":
            raise HTTPException(409, f"job {job.id} is a {job.kind} command, not a training run")
        try:
            cfg = load_config(job.config, job.overrides)
        except ConfigError as exc:
            raise HTTPException(409, f"the run's config no longer loads: {exc}") from None
        return cfg, inside(root, job.output_dir)

    def sd_options(cfg) -> list[str]:
        options = ["--model-config-dir", str(cfg.model_config_dir)] if cfg.model_config_dir else []
        if cfg.v_parameterization is not None:
            options.append("--v-parameterization" if cfg.v_parameterization else "--no-v-parameterization")
        return options

    @app.get("/api/runs/{job_id}")
    def run(job_id: str) -> dict:
        """What the results page needs of a training run: its family, name, prompts and files so far."""
        from lora_scripts.models.detect import ModelTypeError, detect_model_type

        cfg, out = trained(RunAction(job=job_id))
        try:  # the model path as the job read it: relative to the root
            family = "llm" if (cfg.model_type or detect_model_type(rooted(cfg, root).base_model)) == "llm" else "image"
        except (ModelTypeError, OSError):
            family = "unknown"
        checkpoints = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())  # none while out is missing
        samples = sorted(str(p.relative_to(root)) for p in out.glob("samples/*.png"))
        grids = sorted((str(p.relative_to(root)) for p in out.glob("xy/*") if p.is_dir()), reverse=True)
        return {"family": family, "name": cfg.name, "output_dir": str(out.relative_to(root)),
                "sample_prompts": cfg.sample_prompts, "checkpoints": checkpoints, "samples": samples, "grids": grids}

    @app.post("/api/commands/label")
    def label(req: LabelRequest) -> dict:
        folder = inside(root, req.folder)
        if not folder.is_dir():
            raise HTTPException(404, f"{req.folder}: no such folder")
        options = ["--trigger", req.trigger] if req.trigger else []
        if req.clip_model:
            options += ["--clip-model", str(inside(root, req.clip_model))]
        return queue(["label", "--input", str(folder), *options], folder)

    @app.post("/api/commands/compare")
    def compare(action: RunAction) -> dict:
        cfg, out = trained(action)
        if cfg.model_type not in (None, "llm") or not action.prompts:
            raise HTTPException(422, "compare needs an LLM run and a prompt")
        adapter = inside(root, action.adapter) if action.adapter else out
        if not (adapter / "adapter_config.json").is_file():
            raise HTTPException(409, f"{adapter.relative_to(root)}: no adapter there yet (adapter_config.json)")
        prompts = [arg for p in action.prompts for arg in ("--prompt", p)]
        return queue(["generate", "--compare", "--base", cfg.base_model, "--lora", str(adapter),
                      "--max-new-tokens", str(cfg.max_new_tokens), *prompts], out)

    @app.post("/api/commands/grid")
    def grid(action: RunAction) -> dict:
        cfg, out = trained(action)
        lora_dir = inside(root, action.adapter) if action.adapter else out  # a checkpoint's, or the final one
        lora = lora_dir / f"{cfg.name}.safetensors"
        if not lora.is_file():
            raise HTTPException(409, f"{lora.relative_to(root)}: the run has written no LoRA file yet")
        prompts = action.prompts or cfg.sample_prompts
        if not prompts or not action.strengths:
            raise HTTPException(422, "a grid needs at least one prompt and one strength")
        folder = out / "xy" / (time.strftime("%Y%m%d-%H%M%S") + (f"-{lora_dir.name}" if action.adapter else ""))
        folder.mkdir(parents=True, exist_ok=True)  # grid.json says which image is which (the results page's table)
        write_text_atomic(folder / "grid.json", json.dumps({"prompts": prompts, "strengths": action.strengths,
                                                            "lora": str(lora.relative_to(root))}))
        cells = [arg for p in prompts for s in action.strengths for arg in ("--prompt", f"{p} <lora:{cfg.name}:{s:g}>")]
        return queue(["generate", "--base", cfg.base_model, "--lora-dir", str(lora_dir), "--same-seed", "--seed",
                      str(cfg.seed), "--steps", str(cfg.sample_steps), "--guidance", str(cfg.sample_guidance),
                      "--negative", cfg.sample_negative_prompt, "--width", str(cfg.resolution), "--height",
                      str(cfg.resolution), "--out", str(folder), *sd_options(cfg), *cells], folder)

    @app.post("/api/commands/export")
    def export(action: RunAction) -> dict:
        """LLM: base + adapter merged into `<run>/merged/`; SD: `<run>/<name>-merged.safetensors`."""
        cfg, out = trained(action)
        if cfg.model_type in (None, "llm") and (out / "adapter_config.json").is_file():
            return queue(["export", "--merge", "--base", cfg.base_model, "--lora", str(out), "--out",
                          str(out / "merged")], out)
        lora = out / f"{cfg.name}.safetensors"
        if not lora.is_file():
            raise HTTPException(409, f"{out.relative_to(root)}: the run has written no adapter yet")
        return queue(["merge", "--base", cfg.base_model, "--lora", str(lora), "--out",
                      str(out / f"{cfg.name}-merged.safetensors"), *sd_options(cfg)], out)

    @app.post("/api/commands/convert")
    def convert(req: ConvertRequest) -> dict:
        source = inside(root, req.path)
        if not source.exists():
            raise HTTPException(404, f"{req.path}: no such file or folder")
        target = source.with_name(f"{source.stem}-{req.to}" + (".safetensors" if req.to == "kohya" else ""))
        return queue(["convert", str(source), str(target), "--to", req.to], source.parent)

    @app.get("/api/inspect")
    def inspect(path: str) -> dict:
        from lora_scripts.export.lora_files import LoraFormatError
        from lora_scripts.tools.inspect_lora import describe
        from lora_scripts.ui.app import ONE_AT_A_TIME

        try:
            with ONE_AT_A_TIME:
                text, _ = describe(inside(root, path))
        except (LoraFormatError, FileNotFoundError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from None
        return {"text": text}
