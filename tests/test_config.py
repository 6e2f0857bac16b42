from pathlib import Path

import pytest

from lora_scripts.config import ConfigError, TrainConfig
from lora_scripts.config_file import load_config
from lora_scripts.config_rules import describe_keys

REPO = Path(__file__).resolve().parents[1]

SEED_CONFIG = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "./models/v1-5-pruned.safetensors"
lora_rank: 8
lora_alpha: 16
batch_size: 4
epochs: 15
learning_rate: 2e-4
optimizer: "AdamW"
scheduler: "cosine"
output_dir: "./output/my_style_lora"
save_steps: 100
logging_dir: "./logs"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_seed_keys_load_exactly_as_named(tmp_path):
    cfg = load_config(write(tmp_path, SEED_CONFIG))
    assert cfg.lora_rank == 8 and cfg.alpha == 16.0 and cfg.batch_size == 4 and cfg.epochs == 15
    # PyYAML reads `2e-4` (no dot) as a string; it must still become the float 0.0002.
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert cfg.optimizer == "adamw" and cfg.scheduler == "cosine" and cfg.save_steps == 100
    assert cfg.train_data_dir == Path("./data/style_train") and cfg.log_dir == Path("./logs")
    assert cfg.output_dir == Path("./output/my_style_lora") and cfg.name == "my_style_lora"


def test_misspelt_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "base_model: x\nlora_rnak: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:2: lora_rnak: unknown key; did you mean lora_rank?"


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "base_model: x\nbatch_size: four\nepochs: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:2: batch_size:") and "'four'" in lines[0]
    assert lines[1].startswith(f"{path}:3: epochs:") and "greater than or equal to 1" in lines[1]


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="base_model: required key is missing"):
        load_config(write(tmp_path, "lora_rank: 4\n"))


def test_command_line_overrides_and_fp16_alias(tmp_path):
    cfg = load_config(write(tmp_path, SEED_CONFIG), ["learning_rate=1e-4", "lora_rank=16", "sample_prompts=[a, b]"],
                      mixed_precision="fp16")
    assert cfg.learning_rate == 1e-4 and cfg.lora_rank == 16 and cfg.alpha == 16.0
    assert cfg.sample_prompts == ["a", "b"] and cfg.mixed_precision == "fp16"
    with pytest.raises(ConfigError, match="command line: lora_rnak: unknown key; did you mean lora_rank"):
        load_config(write(tmp_path, SEED_CONFIG), ["lora_rnak=4"])


def test_contradictions_raise():
    with pytest.raises(ValueError, match="warmup_ratio and warmup_steps are both set"):
        TrainConfig(base_model="x", warmup_ratio=0.1, warmup_steps=10)
    with pytest.raises(ValueError, match="constant_with_warmup"):
        TrainConfig(base_model="x", scheduler="constant", warmup_steps=5)


def test_defaults_and_derived_values():
    cfg = TrainConfig(base_model="x", lora_rank=4, output_dir="out/run1", warmup_ratio=0.1)
    assert cfg.alpha == 8.0  # alpha defaults to 2 x rank
    assert cfg.log_dir == Path("out/run1/logs")
    assert cfg.warmup_for(200) == 20
    assert TrainConfig(base_model="x", target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]
    assert TrainConfig(base_model="x", target_modules="all-linear").target_modules == "all-linear"


def test_every_key_is_documented():
    for name, field in TrainConfig.model_fields.items():
        assert field.description and len(field.description) > 20, f"{name} has no documentation"
    text = describe_keys()
    assert "lora_rank  (default 8)" in text and "base_model  (required)" in text
    assert "noise_offset  (default 0.0; image runs)" in text and "max_seq_length  (default 512; LLM runs)" in text


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, SEED_CONFIG))
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg.model_copy(update={"lora_alpha": cfg.alpha})


TRAINING_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    cfg = load_config(path)
    assert cfg.base_model


def test_the_readme_lists_each_key_under_the_family_that_reads_it():
    from lora_scripts.config_rules import IMAGE_ONLY_KEYS, LLM_ONLY_KEYS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = {line.rsplit("|", 2)[-2].strip(): line for line in readme.splitlines()
            if line.startswith("| `") and line.rstrip().endswith(("| both |", "| LLM runs |", "| image (SD) runs |"))}

    def keys(row: str) -> set[str]:
        return {k.strip().split(" ")[0] for k in rows[row].split("`")[1].split(",")}

    assert keys("LLM runs") == set(LLM_ONLY_KEYS) and keys("image (SD) runs") == set(IMAGE_ONLY_KEYS)
    described = {"train_data_dir", "metadata_path", "base_model", "lora_rank", "lora_alpha", "batch_size", "epochs",
                 "learning_rate", "optimizer", "scheduler", "output_dir", "save_steps", "logging_dir"}
    assert keys("both") == set(TrainConfig.model_fields) - set(LLM_ONLY_KEYS) - set(IMAGE_ONLY_KEYS) - described
