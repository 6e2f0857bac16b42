"""Atomic checkpoints: a partial write is never taken for a checkpoint; corruption is detected."""

import torch

from lora_scripts.config import TrainConfig
from lora_scripts.train.checkpoint import (
    Position,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from lora_scripts.train.common import build_optimizer, build_scheduler
from lora_scripts.train.plan import plan_steps, share_batches


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    cfg = TrainConfig(base_model="x", learning_rate=0.1, warmup_steps=2, scheduler="cosine")
    opt = build_optimizer(cfg, [{"params": list(model.parameters())}])
    sched = build_scheduler(cfg, opt, total_steps=10)
    return cfg, model, opt, sched


def step(model, opt, sched):
    model(torch.randn(2, 4)).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_save_load_restores_weights_optimizer_schedule_and_rng(tmp_path):
    cfg, model, opt, sched = tiny_setup()
    for _ in range(3):
        step(model, opt, sched)
    path = save_checkpoint(tmp_path, Position(3, 1, 2), model, opt, sched, cfg)
    assert path.name == "checkpoint-000003" and verify_checkpoint(path) is None
    expected_next = torch.rand(3)
    step(model, opt, sched)
    after_one_more = model.weight.detach().clone()

    _, model2, opt2, sched2 = tiny_setup(seed=99)  # different init: everything must come from the checkpoint
    pos = load_checkpoint(path, model2, opt2, sched2)
    assert pos == Position(3, 1, 2)
    assert torch.equal(torch.rand(3), expected_next)  # the RNG continues exactly where it was
    step(model2, opt2, sched2)  # same random batch, same Adam moments, same learning rate
    assert torch.equal(model2.weight, after_one_more)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"] == 4


def test_partial_write_is_ignored_and_corruption_detected(tmp_path):
    cfg, model, opt, sched = tiny_setup()
    good = save_checkpoint(tmp_path, Position(2), model, opt, sched, cfg)
    newer = save_checkpoint(tmp_path, Position(4), model, opt, sched, cfg)
    # a kill during a write leaves a hidden temp folder, and a folder without COMPLETE.json
    (tmp_path / ".tmp-checkpoint-000006-123").mkdir()
    (tmp_path / "checkpoint-000008").mkdir()
    assert list_checkpoints(tmp_path) == [good, newer]
    assert find_resume_checkpoint("latest", tmp_path) == newer
    # flip one byte of the newest: it is refused and the older one is used
    f = newer / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "does not match its checksum" in verify_checkpoint(newer)
    assert find_resume_checkpoint("latest", tmp_path) == good


def test_rotation_keeps_newest(tmp_path):
    cfg, model, opt, sched = tiny_setup()
    for s in range(1, 6):
        save_checkpoint(tmp_path, Position(s), model, opt, sched, cfg, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000004", "checkpoint-000005"]


def test_plan_steps():
    cfg = TrainConfig(base_model="x", batch_size=4, gradient_accumulation_steps=2, epochs=3)
    p = plan_steps(30, cfg)  # 8 batches (last one partial) -> 4 steps per epoch
    assert (p.batches_per_rank, p.steps_per_epoch, p.total_steps, p.epochs) == (8, 4, 12, 3)
    p = plan_steps(30, cfg, world=2)  # 7 full batches -> 3 per rank -> 2 steps per epoch
    assert (p.batches_per_rank, p.steps_per_epoch, p.total_steps) == (3, 2, 6)
    p = plan_steps(30, cfg.model_copy(update={"max_train_steps": 5}))
    assert (p.total_steps, p.epochs) == (5, 2)


def test_image_batches_are_all_run_on_any_number_of_processes():
    cfg = TrainConfig(base_model="x", batch_size=2)
    batches = [[0, 1], [2], [3, 4], [5]]  # two buckets of 3 views: each has a partial last batch
    assert plan_steps(6, cfg, n_batches=4).batches_per_rank == 4  # not ceil(6 / 2) = 3
    for world in (1, 2, 3):
        per_rank = plan_steps(6, cfg, world, n_batches=4).batches_per_rank
        shares = [share_batches(batches, per_rank, world, rank) for rank in range(world)]
        assert {len(s) for s in shares} == {per_rank}  # DDP: every process runs the same count
        seen = sorted(i for share in shares for batch in share for i in batch)
        assert set(seen) == set(range(6)), world  # no view dropped; padding repeats the first batches


def test_every_optimizer_and_schedule_builds_and_steps():
    import pytest

    for name in ["adamw", "adafactor"]:
        model = torch.nn.Linear(4, 3)
        cfg = TrainConfig(base_model="x", optimizer=name, learning_rate=0.01)
        opt = build_optimizer(cfg, [{"params": list(model.parameters())}])
        before = model.weight.detach().clone()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert not torch.equal(before, model.weight), name
    for sched_name in ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts"]:
        model = torch.nn.Linear(2, 2)
        cfg = TrainConfig(base_model="x", scheduler=sched_name, learning_rate=1.0, warmup_steps=2, num_cycles=2)
        opt = build_optimizer(cfg, [{"params": list(model.parameters())}])
        sched = build_scheduler(cfg, opt, total_steps=20)
        lrs = []
        for _ in range(20):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0), sched_name  # linear warmup over 2 steps
        if sched_name != "constant_with_warmup":
            assert lrs[-1] < 0.2, sched_name
        if sched_name == "cosine_with_restarts":
            assert any(b > a + 0.3 for a, b in zip(lrs[3:], lrs[4:]))  # the restart jumps back up


def test_each_rank_gets_its_own_generator_back(tmp_path):
    from safetensors.torch import save_file

    from lora_scripts.train.checkpoint import load_rng_state, save_rng_state

    states = []
    for seed in (1, 2):  # what two ranks would hold
        torch.manual_seed(seed)
        states.append({"torch": torch.get_rng_state()})
    draws = [torch.manual_seed(s) and torch.rand(4) for s in (1, 2)]
    save_rng_state(tmp_path, states)
    for rank, expected in [(0, draws[0]), (1, draws[1]), (2, draws[0])]:  # a rank it has no state for: rank 0's
        load_rng_state(tmp_path, rank)
        assert torch.equal(torch.rand(4), expected), rank
    # a checkpoint written before per-rank states ("torch" alone) still resumes
    torch.manual_seed(3)
    save_file({"torch": torch.get_rng_state()}, str(tmp_path / "rng.safetensors"))
    expected = torch.rand(4)
    load_rng_state(tmp_path, 0)
    assert torch.equal(torch.rand(4), expected)


def test_a_resumed_runs_history_goes_on_from_its_checkpoint(tmp_path):
    """The loss curve of a run that was killed and resumed: one line through both parts, without what the
    killed part logged after its last checkpoint (those steps were trained again)."""
    import json

    from lora_scripts.train.events import plot_loss_curve, whole_run

    events = [{"event": "start", "step": 0}] + [{"event": "step", "step": s, "loss": 5.0 - s} for s in range(1, 6)]
    events += [{"event": "checkpoint", "step": 3}, {"event": "info", "message": "killed at 5"}]
    events += [{"event": "start", "step": 3}] + [{"event": "step", "step": s, "loss": 9.0 - s} for s in range(4, 8)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    history = whole_run(tmp_path / "events.jsonl")
    assert [(e["step"], e["loss"]) for e in history if e["event"] == "step"] == [
        (1, 4.0), (2, 3.0), (3, 2.0), (4, 5.0), (5, 4.0), (6, 3.0), (7, 2.0)]
    assert any(e["event"] == "info" for e in history)  # events without a step are kept
    assert plot_loss_curve(history, tmp_path / "curve.png", "t").stat().st_size > 10_000
