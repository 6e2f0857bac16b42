"""The training configuration: one flat YAML file, loaded into a strict, documented pydantic model.

Every key a user may write is a field of `TrainConfig` below, documented where it is declared (the
docstring under each field is what `lora-scripts validate --keys` prints). Unknown keys and wrong types
are errors that name the file, the line and the closest valid key: a misspelt `lora_rnak` must stop the
run before an hour of training is spent with the default rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelType = Literal["sd15", "sd2", "sdxl", "llm"]


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem found, one per line."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # ---- what to train -------------------------------------------------------------------------
    base_model: str
    """The model to adapt: `smollm2-135m-instruct` (embedded, prepared by setup), a Hugging Face model
    folder, a `.gguf` file, or a Stable Diffusion single-file checkpoint (`.safetensors`/`.ckpt`) or
    diffusers folder."""

    model_type: ModelType | None = None
    """sd15 | sd2 | sdxl | llm. Sniffed from `base_model` when absent (checkpoint key layout, a folder's
    config.json or model_index.json, a .gguf file)."""

    # ---- data ------------------------------------------------------------------------------------
    train_data_dir: Path | None = None
    """Folder with the training samples: images (+ captions) for Stable Diffusion; for LLMs a folder of
    .txt files, or the folder holding `metadata.csv`."""

    metadata_path: Path | None = None
    """Captions / pairs file. Images: `metadata.csv` with `filename,prompt`. LLM: `metadata.csv` with
    `prompt,response`, or a `.jsonl` (Alpaca, chat `messages`, or `text`). Defaults to
    `<train_data_dir>/metadata.csv` when that file exists."""

    eval_data_path: Path | None = None
    """Held-out samples: for LLMs a file in the formats of `metadata_path`; for images a folder captioned
    like `train_data_dir` (or its metadata.csv). Their loss is logged after every epoch (and for the base
    model first): images at fixed noise and timesteps, so epochs compare."""

    val_ratio: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Fraction of the training samples (or images) held out for the eval loss when `eval_data_path` is not
    given; at least one."""

    resolution: int = Field(default=512, ge=64, le=4096)
    """Training resolution in pixels (Stable Diffusion). Buckets keep this pixel area."""

    max_seq_length: int = Field(default=512, ge=16)
    """Longest LLM sample in tokens; longer samples are truncated, with a warning that counts them."""

    # ---- images (Stable Diffusion) ---------------------------------------------------------------
    repeats: int | None = Field(default=None, ge=1)
    """How often each image is seen per epoch. Default: the N of kohya `N_name` sub-folders; for a flat
    folder, enough repeats that an epoch has about 100 image views (reported by the preflight)."""

    trigger_word: str | None = None
    """A word put in front of every caption (e.g. `cybrpnk_night`), so the style can be called up by name."""

    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of each caption every step (the first keep_tokens stay in place)."""

    keep_tokens: int = Field(default=0, ge=0)
    """Leading comma-separated tags never shuffled (the trigger word is always kept first)."""

    caption_dropout_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Probability of training a step with an empty caption (helps classifier-free guidance)."""

    flip_aug: bool = False
    """Random horizontal flips (off for subjects whose left/right matters: text, asymmetric logos)."""

    noise_offset: float = Field(default=0.0, ge=0.0, le=1.0)
    """Offset noise (0.05-0.1) lets the model learn very dark or very bright images."""

    min_snr_gamma: float | None = Field(default=None, gt=0)
    """Min-SNR-gamma loss weighting (5 is the paper's value): faster, steadier convergence."""

    v_parameterization: bool | None = None
    """v-prediction on (SD 2.x 768-v models) or off (SD 2.x 512-base, SD1.x, SDXL). Default: what the checkpoint
    declares (a diffusers scheduler config, `modelspec.prediction_type`, a `v_pred` key), else off; an SD 2.x
    single file that declares nothing must set it (the preflight says so)."""

    train_unet_conv: bool = False
    """LoCon: also put LoRA on the UNet's 3x3 convolutions (more capacity for textures, bigger file)."""

    cache_latents: bool = True
    """Encode each image with the VAE once and reuse the latents across epochs, runs and resumes."""

    model_config_dir: Path | None = None
    """A diffusers config folder for a single-file checkpoint of non-standard shape (default: the shipped
    SD1.5 / SD2 / SDXL configs)."""

    sample_every_n_epochs: int | None = Field(default=1, ge=1)
    """Sample the prompts in `sample_prompts` after every N epochs (null: only at the end)."""

    sample_steps: int = Field(default=20, ge=1)
    """Denoising steps for sample images."""

    sample_guidance: float = Field(default=7.0, ge=0.0)
    """Classifier-free guidance scale for sample images."""

    sample_negative_prompt: str = ""
    """Negative prompt for sample images."""

    save_precision: Literal["fp16", "fp32", "bf16"] = "fp16"
    """dtype of the exported image LoRA files (fp16 is what the WebUIs expect; fp32 for exact reloads)."""

    # ---- the adapter -----------------------------------------------------------------------------
    lora_type: Literal["lora", "dora", "rslora", "adalora"] = "lora"
    """lora: classic LoRA. dora: weight-decomposed LoRA (often better at low rank, ~2x slower).
    rslora: scale alpha/sqrt(rank) instead of alpha/rank, so high ranks keep learning.
    adalora: AdaLoRA, which starts every module at adalora_init_rank and moves the rank budget to the
    modules that matter during training, ending at an average of adalora_target_rank (LLMs; the UNet for
    images, whose text encoders, when trained, get plain LoRA). Exported as a plain LoRA with a rank per
    module, so it loads wherever LoRA files load."""

    lora_rank: int = Field(default=8, ge=1, le=1024)
    """Rank r of the update. 8-16 suits a style or a voice from 50-200 samples; 4 may under-fit and 64+
    mostly adds file size."""

    lora_alpha: float | None = Field(default=None, gt=0)
    """Scale of the update: delta W = (alpha / rank) * B A. Default 2 x rank. The value is written into
    the exported file as-is, so other tools apply the same scale. AdaLoRA (as peft) scales by
    alpha / adalora_init_rank whatever rank a module ends with; its default is 2 x adalora_init_rank."""

    lora_init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """How the adapter starts. default: peft's for LLMs (A random, B zero), kohya's gaussian for images.
    gaussian: A ~ N(0, 1/rank), B zero. pissa: A and B from the top singular vectors of each weight (PiSSA:
    the adapter trains the weight's principal part, often converging faster); olora: from its QR
    decomposition (OLoRA). Both take that part out of the frozen weights while training, so the export
    converts the adapter back (peft's conversion) to a plain LoRA of twice the rank against the original
    model, which loads anywhere a LoRA does. Images: the UNet's and text encoders' linear layers (peft
    cannot start convolutions so: not with train_unet_conv, nor SD1.5's all-linear, whose proj_in/out are
    1x1 convolutions)."""

    adalora_target_rank: int | None = Field(default=None, ge=1)
    """AdaLoRA: the average rank per module at the end of training. Default lora_rank."""

    adalora_init_rank: int | None = Field(default=None, ge=1)
    """AdaLoRA: every module's rank at the start, before the budget is cut. Default 1.5 x the target
    rank (peft's 12 for 8)."""

    adalora_tinit: int | None = Field(default=None, ge=0)
    """AdaLoRA: optimizer steps trained at the initial rank before the budget starts to shrink. Default
    10% of the run's steps (peft's worked example: 10, 20 of 100 steps)."""

    adalora_tfinal: int | None = Field(default=None, ge=0)
    """AdaLoRA: the last optimizer steps, trained with the final ranks fixed. Default 20% of the run's
    steps. The budget shrinks in between, so adalora_tinit + adalora_tfinal must leave steps for it."""

    adalora_delta_t: int = Field(default=1, ge=1)
    """AdaLoRA: optimizer steps between two rank reallocations while the budget shrinks (peft's deltaT)."""

    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input; 0.05-0.1 helps against over-fitting very small datasets."""

    target_modules: list[str] | str | None = None
    """Modules that get an adapter. Default: attention q/k/v/o projections for LLMs, to_q/to_k/to_v/
    to_out.0 for the SD UNet (q/k/v/out_proj in its text encoders). `all-linear`: every linear layer of an
    LLM; for SD, kohya's default network: every Linear and 1x1 conv of the UNet's transformer blocks
    (attention, proj_in/proj_out, feed-forward) and the text encoders' attention and MLP layers."""

    # ---- optimisation ----------------------------------------------------------------------------
    batch_size: int = Field(default=4, ge=1)
    """Samples per step on each process. Lower it (and raise gradient_accumulation_steps) if memory runs out."""

    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches whose gradients are summed before one optimizer step (effective batch =
    batch_size x gradient_accumulation_steps x processes)."""

    epochs: int = Field(default=10, ge=1)
    """Passes over the dataset. 10-20 for 50-200 samples; watch eval loss and samples for over-fitting."""

    max_train_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps, whatever `epochs` says."""

    learning_rate: float = Field(default=1e-4, gt=0)
    """Peak learning rate. 1e-4 for images, 1e-4..3e-4 for text."""

    text_encoder_lr: float | None = Field(default=None, gt=0)
    """Stable Diffusion only: train a text-encoder LoRA too, at this learning rate."""

    loraplus_lr_ratio: float | None = Field(default=None, gt=0)
    """LoRA+: the B (up) matrices learn at this many times the learning rate of the A (down) matrices,
    which keep learning_rate (text_encoder_lr for the text encoders). The LoRA+ paper uses 16 for LLMs;
    2-4 is a cautious start for images, where kohya calls it the same. null: one rate for both."""

    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    """adamw (default), adamw8bit (needs bitsandbytes and CUDA), adafactor (least memory)."""

    weight_decay: float = Field(default=0.0, ge=0.0)
    """Decoupled weight decay on the LoRA weights."""

    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"] = "cosine"
    """Learning-rate schedule after warmup."""

    num_cycles: int = Field(default=1, ge=1)
    """Restarts for `cosine_with_restarts`."""

    warmup_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Warmup as a fraction of total optimizer steps (0.1 = 10%). Give this or warmup_steps, not both."""

    warmup_steps: int | None = Field(default=None, ge=0)
    """Warmup in optimizer steps. Give this or warmup_ratio, not both."""

    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the gradient norm to this value; null disables clipping."""

    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto | no | fp16 | bf16. auto picks what is fast on this machine: bf16 on GPUs and CPUs with native
    bf16, fp16 on older GPUs, fp32 (no) on CPUs without bf16 units, where bf16 is emulated ~45x slower.
    The preflight prints the choice and why."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less memory, about 30% slower."""

    skip_nan_steps: int = Field(default=0, ge=0)
    """Skip up to this many steps whose loss or gradients are NaN/inf (the update is dropped) before
    stopping; 0 stops at the first one, with the step, likely causes and last good checkpoint."""

    seed: int = 42
    """Seeds data order, LoRA init and dropout; the same seed gives the same run."""

    # ---- outputs ---------------------------------------------------------------------------------
    output_dir: Path = Path("./output/lora")
    """Where the adapter, checkpoints, resolved config, samples and loss curve are written."""

    output_name: str | None = None
    """File/adapter name; defaults to the last part of output_dir. `<lora:NAME:0.8>` uses it."""

    logging_dir: Path | None = None
    """TensorBoard event files. Default `<output_dir>/logs`."""

    save_steps: int = Field(default=100, ge=1)
    """Write a resumable checkpoint every this many optimizer steps (and at the end)."""

    save_total_limit: int | None = Field(default=3, ge=1)
    """Keep only the newest N checkpoints; null keeps all."""

    resume_from: str | None = None
    """A checkpoint folder, or `latest` for the newest complete checkpoint in output_dir. The run must have
    the checkpoint's settings and data (epochs, max_train_steps, precision, saving, logging and sample
    settings may change); a difference is an error that names it."""

    resume_force: bool = False
    """Resume even though settings or data differ from the checkpoint's (each difference is warned about)."""

    # ---- evaluation and samples ------------------------------------------------------------------
    save_best: bool = False
    """Also keep the adapter of the evaluation with the lowest eval loss: `<name>-best.safetensors` (images)
    or the `best/` adapter folder (LLM). Needs eval data (`val_ratio` or `eval_data_path`)."""

    sample_prompts: list[str] = Field(default_factory=list)
    """Prompts sampled after every epoch (text for LLMs, images for SD) so you can watch the style appear."""

    max_new_tokens: int = Field(default=160, ge=1)
    """LLM samples: the most tokens generated per prompt."""

    drift_check: bool = True
    """LLM runs: the base model answers a few shipped general questions first (cached per base model), and
    after every epoch the tuned model's loss on those answers is logged as `retention` (rising = the answers
    drift toward the training data's topic); a warning names the knobs when it passes 2.2x the base's."""

    # ---------------------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _yaml_boolean_words(cls, data: Any) -> Any:
        # YAML 1.1 reads an unquoted no/off/false (and yes/on/true) as a boolean, so `mixed_precision: no`,
        # written the way accelerate's and kohya's configs write it, arrives here as False. Where a key's
        # valid words include such a word, the boolean means that word.
        if not isinstance(data, dict):
            return data
        fixed = dict(data)
        for key, value in data.items():
            words = _BOOLEAN_WORDS.get(key)
            if isinstance(value, bool) and words and words.get(value) is not None:
                fixed[key] = words[value]
        return fixed

    @field_validator("optimizer", mode="before")
    @classmethod
    def _lowercase_optimizer(cls, v: Any) -> Any:
        # The description writes `optimizer: "AdamW"`; accept any capitalisation of the known names.
        return v.lower() if isinstance(v, str) else v

    @field_validator("base_model", "train_data_dir", "metadata_path", "eval_data_path", "output_dir", "logging_dir",
                     "model_config_dir", mode="after")
    @classmethod
    def _expand_home(cls, v: Any) -> Any:
        # `~/models/x.safetensors` in YAML means the home folder, as it would in a shell
        if isinstance(v, Path):
            return v.expanduser()
        if isinstance(v, str) and v.startswith("~"):
            return str(Path(v).expanduser())
        return v

    @field_validator("output_name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v or "\\" in v or v in (".", "..")):
            raise ValueError("must be a plain file name (no folders), e.g. cyberpunk_night")
        return v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all-linear":
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @model_validator(mode="after")
    def _check_contradictions(self) -> TrainConfig:
        problems = []
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            problems.append("warmup_ratio and warmup_steps are both set; keep one of them")
        if self.scheduler == "constant" and (self.warmup_ratio or self.warmup_steps):
            problems.append("scheduler 'constant' has no warmup; use 'constant_with_warmup'")
        # set to a value of their own (a resolved config.yaml writes every key, at its default)
        if self.lora_init in ("pissa", "olora") and self.train_unet_conv:
            problems.append(f"lora_init: {self.lora_init} decomposes linear layers; peft cannot start the UNet's "
                            "convolutions (train_unet_conv) that way. Set train_unet_conv: false or lora_init: default")
        if self.lora_init in ("pissa", "olora") and self.lora_type in ("dora", "adalora"):
            problems.append(f"lora_init: {self.lora_init} starts a plain LoRA from the weights; lora_type "
                            f"{self.lora_type} has its own start. Use lora_type: lora (or rslora)")
        adalora_keys = sorted(k for k in self.model_fields_set if k.startswith("adalora_")
                              and getattr(self, k) != type(self).model_fields[k].default)
        if self.lora_type != "adalora" and adalora_keys:
            problems.append(f"{', '.join(adalora_keys)} set but lora_type is {self.lora_type!r}; "
                            "they apply to lora_type: adalora")
        if self.lora_type == "adalora" and self.adalora_ranks[1] > self.adalora_ranks[0]:
            problems.append(f"adalora_target_rank ({self.adalora_ranks[1]}) is above adalora_init_rank "
                            f"({self.adalora_ranks[0]}): AdaLoRA only takes rank away")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- derived values --------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        if self.lora_alpha is not None:
            return float(self.lora_alpha)
        return 2.0 * (self.adalora_ranks[0] if self.lora_type == "adalora" else self.lora_rank)

    @property
    def mutates_base(self) -> bool:
        """The adapter's start moves part of each frozen weight into it (PiSSA, OLoRA): the frozen weights in
        memory are not the model files' while training."""
        return self.lora_init in ("pissa", "olora")

    @property
    def adalora_ranks(self) -> tuple[int, int]:
        """AdaLoRA's (initial rank, target average rank), defaults filled in."""
        target = self.adalora_target_rank or self.lora_rank
        return self.adalora_init_rank or max(target, round(1.5 * target)), target

    def adalora_schedule(self, total_steps: int) -> tuple[int, int]:
        """AdaLoRA's (tinit, tfinal) for a run of `total_steps` optimizer steps, defaults filled in. The
        budget shrinks between them; the preflight checks that some steps are left for it."""
        tinit = self.adalora_tinit if self.adalora_tinit is not None else int(0.1 * total_steps)
        tfinal = self.adalora_tfinal if self.adalora_tfinal is not None else int(0.2 * total_steps)
        return tinit, tfinal

    @property
    def name(self) -> str:
        return self.output_name or Path(self.output_dir).name or "lora"

    @property
    def log_dir(self) -> Path:
        return Path(self.logging_dir) if self.logging_dir is not None else Path(self.output_dir) / "logs"

    def resolved_metadata_path(self) -> Path | None:
        if self.metadata_path is not None:
            return Path(self.metadata_path)
        if self.train_data_dir is not None:
            candidate = Path(self.train_data_dir) / "metadata.csv"
            if candidate.exists():
                return candidate
        return None

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_ratio is not None:
            return int(round(self.warmup_ratio * total_steps))
        return 0

    def to_yaml(self) -> str:
        data = json.loads(self.model_dump_json())
        data["lora_alpha"] = self.alpha
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# The words YAML 1.1 turns into booleans, and the keys whose valid values include one of them
_YAML_TRUE, _YAML_FALSE = ("yes", "on", "true"), ("no", "off", "false")


def literal_words(annotation: Any) -> tuple[str, ...]:
    if get_origin(annotation) is Literal:
        return tuple(a for a in get_args(annotation) if isinstance(a, str))
    return tuple(w for arg in get_args(annotation) for w in literal_words(arg))


def _boolean_words() -> dict[str, dict[bool, str | None]]:
    table = {}
    for key, field in TrainConfig.model_fields.items():
        words = literal_words(field.annotation)
        true = next((w for w in _YAML_TRUE if w in words), None)
        false = next((w for w in _YAML_FALSE if w in words), None)
        if true or false:
            table[key] = {True: true, False: false}
    return table


_BOOLEAN_WORDS = _boolean_words()
