"""Several processes train as one: after one step every rank holds the same LoRA weights, equal to one
process accumulating the same global batch. Both families, 2 CPU ranks over gloo under torchrun.

Every run is a subprocess on the CPU (ACCELERATE_USE_CPU=1, also where a GPU is visible, so the
reference computes as the ranks do); forking ranks from a pytest process whose OpenMP pool is already
running can hang.
"""

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from safetensors.torch import save_file
    from lora_scripts.config import load_config
    from lora_scripts.train.checkpoint import trainable_state
    family, out = sys.argv[1], sys.argv[2]
    cfg = load_config(None, sys.argv[3:])
    if family == "llm":
        from lora_scripts.train.llm import train_llm
        model = train_llm(cfg, progress=False).model
    else:
        from lora_scripts.train.sd import train_sd
        m = train_sd(cfg, progress=False).trained_model
        model = torch.nn.ModuleDict({"unet": m.unet, **{f"te{i}": te for i, te in enumerate(m.text_encoders)}})
    rank = os.environ.get("RANK", "0")
    # what this rank trained, and the next draws of its torch generator (its dropout stream)
    save_file({**trainable_state(model), "next_draws": torch.rand(8)}, f"{out}/rank{rank}.safetensors")
""")


def run_ranks(tmp_path, n: int, family: str, args: list[str]) -> list[dict[str, torch.Tensor]]:
    """n processes (torchrun for 2, a plain process for 1); what each rank trained, by rank."""
    folder = tmp_path / f"ranks{n}"
    folder.mkdir()
    script = folder / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(ACCELERATE_USE_CPU="1", LORA_SCRIPTS_CACHE=str(tmp_path / "cache"))
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
    proc = subprocess.run([sys.executable, *launch, str(script), family, str(folder), *args], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_file(folder / f"rank{r}.safetensors") for r in range(n)]


def assert_same_step(ranks, single: dict[str, torch.Tensor]) -> None:
    r0, r1 = ranks
    assert not torch.equal(r0.pop("next_draws"), r1.pop("next_draws"))  # each rank its own dropout stream
    single.pop("next_draws")
    before = {n: torch.zeros_like(t) if "lora_B" in n else t for n, t in single.items()}  # B starts at zero
    assert r0.keys() == r1.keys() == single.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # DDP: every rank applied the same averaged gradient
        assert float((r0[name] - single[name]).abs().max()) <= 1e-6, name
    assert any(not torch.equal(single[n], before[n]) for n in single)  # the step changed something


def test_llm_two_ranks_equal_one_process_over_the_same_global_batch(tiny_llama, pairs_csv, tmp_path):
    def args(out, **kw):
        return [f"{k}={v}" for k, v in {
            "base_model": tiny_llama, "metadata_path": pairs_csv, "output_dir": out, "batch_size": 4,
            "max_train_steps": 1, "learning_rate": 5e-3, "mixed_precision": "no", "seed": 5, **kw}.items()]

    ranks = run_ranks(tmp_path, 2, "llm", args(tmp_path / "ddp"))
    # one process, the two ranks' batches as two accumulated micro-batches (rank r's batch = micro-batch r)
    [single] = run_ranks(tmp_path, 1, "llm", args(tmp_path / "one", gradient_accumulation_steps=2))
    assert_same_step(ranks, single)


def test_sd_two_ranks_equal_one_process_over_the_same_global_batch(tiny_sd15, style_images, tmp_path):
    ckpt, cfg_dir = tiny_sd15

    def args(out, **kw):
        return [f"{k}={v}" for k, v in {
            "base_model": ckpt, "model_config_dir": cfg_dir, "model_type": "sd15", "train_data_dir": style_images,
            "output_dir": out, "resolution": 64, "batch_size": 1, "repeats": 1, "max_train_steps": 1,
            "lora_rank": 4, "learning_rate": 1e-3, "text_encoder_lr": 1e-3, "mixed_precision": "no",
            "sample_every_n_epochs": "null", "seed": 5, **kw}.items()]

    ranks = run_ranks(tmp_path, 2, "sd", args(tmp_path / "ddp"))
    [single] = run_ranks(tmp_path, 1, "sd", args(tmp_path / "one", gradient_accumulation_steps=2))
    assert any(n.startswith("te0.") and "lora_B" in n for n in single)  # the text-encoder LoRA is trained too
    assert_same_step(ranks, single)
