"""Several processes train as one: after one step every rank holds the same LoRA weights, equal to one
process accumulating the same global batch. Both families, 2 CPU ranks over gloo, launched with
`accelerate launch --config_file configs/accelerate/ddp.yaml` (what `train --accelerate-config FILE` runs,
test_llm_train.test_launch_commands; here with the shipped file), each rank training both families in turn.

The ranks run in a subprocess (forking ranks from a pytest process whose OpenMP pool is
already running can hang), the one-process reference in the test's own process; both on the CPU
(ACCELERATE_USE_CPU=1, also where a GPU is visible, so the reference computes as the ranks do).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file


def trained_state(family: str, args: list[str]) -> dict[str, torch.Tensor]:
    """Train with `args`; what was trained, and the next draws of the torch generator (the dropout stream)."""
    from lora_scripts.config_file import load_config
    from lora_scripts.train.checkpoint import trainable_state

    cfg = load_config(None, args)
    if family == "llm":
        from lora_scripts.train.llm import train_llm
        model = train_llm(cfg, progress=False).model
    else:
        from lora_scripts.train.sd import train_sd
        m = train_sd(cfg, progress=False).trained_model
        model = torch.nn.ModuleDict({"unet": m.unet, **{f"te{i}": te for i, te in enumerate(m.text_encoders)}})
    return {**trainable_state(model), "next_draws": torch.rand(8)}


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from safetensors.torch import save_file
    from test_ddp import trained_state
    out, runs = sys.argv[1], json.loads(open(sys.argv[2]).read())
    for family, args in runs.items():  # both families in the same ranks: one launch, one set of imports
        save_file(trained_state(family, args), f"{out}/{family}-rank{os.environ['RANK']}.safetensors")
""")


def run_two_ranks(tmp_path, runs: dict[str, list[str]]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Two CPU ranks under `accelerate launch` with the shipped ddp.yaml, each training every family in
    `runs` in turn; what each rank trained, by family and rank."""
    folder = tmp_path / "ranks"
    folder.mkdir()
    script = folder / "rank.py"
    script.write_text(RANK_SCRIPT)
    (folder / "runs.json").write_text(json.dumps(runs))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(ACCELERATE_USE_CPU="1", LORA_SCRIPTS_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    shipped = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(shipped),
                           str(script), str(folder), str(folder / "runs.json")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {family: [load_file(folder / f"{family}-rank{r}.safetensors") for r in range(2)] for family in runs}


def one_process(monkeypatch, tmp_path, family: str, args: list[str]) -> dict[str, torch.Tensor]:
    """The reference in this process, on the CPU as the ranks are."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("LORA_SCRIPTS_CACHE", str(tmp_path / "cache"))
    return trained_state(family, args)


def assert_same_step(ranks, single: dict[str, torch.Tensor]) -> None:
    r0, r1 = ranks
    assert not torch.equal(r0.pop("next_draws"), r1.pop("next_draws"))  # each rank its own dropout stream
    single.pop("next_draws")
    # what starts at zero: LoRA's B; AdaLoRA's singular values E (its A and B start random)
    zero_init = [n for n in single if "lora_E" in n] or [n for n in single if "lora_B" in n]
    assert r0.keys() == r1.keys() == single.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # DDP: every rank applied the same averaged gradient
        assert float((r0[name] - single[name]).abs().max()) <= 1e-6, name
    assert any(bool(single[n].any()) for n in zero_init)  # the step changed something


def test_two_ranks_equal_one_process_over_the_same_global_batch(tiny_llama, pairs_csv, tiny_sd15, style_images,
                                                               tmp_path, monkeypatch):
    """The LLM with AdaLoRA, so the rank allocation, which reads the gradients after the optimizer step, is
    checked too: step 1 scores and masks, step 2 fixes the ranks; every rank must cut the same triplets.
    SD with its text encoder trained as well."""
    ckpt, cfg_dir = tiny_sd15

    def llm(out, **kw):
        return [f"{k}={v}" for k, v in {
            "base_model": tiny_llama, "metadata_path": pairs_csv, "output_dir": out, "batch_size": 4,
            "max_train_steps": 2, "learning_rate": 5e-3, "mixed_precision": "no", "seed": 5,
            "lora_type": "adalora", "lora_rank": 4, **kw}.items()]

    def sd(out, **kw):
        return [f"{k}={v}" for k, v in {
            "base_model": ckpt, "model_config_dir": cfg_dir, "model_type": "sd15", "train_data_dir": style_images,
            "output_dir": out, "resolution": 64, "batch_size": 1, "repeats": 1, "max_train_steps": 1,
            "lora_rank": 4, "learning_rate": 1e-3, "text_encoder_lr": 1e-3, "mixed_precision": "no",
            "sample_every_n_epochs": "null", "seed": 5, **kw}.items()]

    ranks = run_two_ranks(tmp_path, {"llm": llm(tmp_path / "ddp-llm"), "sd": sd(tmp_path / "ddp-sd")})
    events = [json.loads(line) for line in (tmp_path / "ddp-llm" / "events.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["event"] == "start")["processes"] == 2  # one log, by rank 0
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    # one process, the two ranks' batches as two accumulated micro-batches (rank r's batch = micro-batch r)
    single = one_process(monkeypatch, tmp_path, "llm", llm(tmp_path / "one-llm", gradient_accumulation_steps=2))
    masked = [n for n, e in single.items() if "lora_E" in n and bool((e == 0).any())]
    assert masked and all(torch.equal(ranks["llm"][0][n] == 0, single[n] == 0) for n in masked)  # the same cut
    assert_same_step(ranks["llm"], single)

    single = one_process(monkeypatch, tmp_path, "sd", sd(tmp_path / "one-sd", gradient_accumulation_steps=2))
    assert any(n.startswith("te0.") and "lora_B" in n for n in single)  # the text-encoder LoRA is trained too
    assert_same_step(ranks["sd"], single)
