"""AdaLoRA while training: the rank budget, its penalty, and its place in checkpoints.

peft's AdaLoraModel holds the RankAllocator that scores every singular triplet and masks the weakest
until the average rank reaches the target. Two of its duties fall to the training loop, which peft leaves
to whoever drives it: `update_and_allocate` after each optimizer step (not each micro-batch) and before
the gradients are zeroed, since the scores are |weight x gradient|; and the orthogonality penalty, which
peft adds only to a model output's `.loss`, and neither loop here has one (the LLM takes its loss chunk by
chunk off the hidden states, SD from the UNet's prediction).
"""

from __future__ import annotations

import torch

SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the allocator's per-weight sensitivity and its two averages


class RankBudget:
    """The rank schedule of one AdaLoRA adapter (`tuner`: peft's AdaLoraModel, e.g. PeftModel.base_model).

    A step hook of TrainingRun: `after_update` per optimizer step; its state_dict goes into each
    checkpoint as `<state_file>.safetensors`."""

    state_file = "adalora_budget"

    def __init__(self, tuner):
        self.tuner = tuner
        self.adapter = tuner.trainable_adapter_name
        self.config = tuner.peft_config[self.adapter]
        # (is A, weight): peft's penalty pushes every A (r x in) towards orthonormal rows, every B (out x r)
        # towards orthonormal columns, so the triplets stay the singular vectors the scores assume
        self.matrices = [("lora_A" in n, p) for n, p in tuner.model.named_parameters()
                         if ("lora_A" in n or "lora_B" in n) and self.adapter in n]

    @property
    def final_step(self) -> int:
        """The step at which the ranks are fixed for good (peft: total_step - tfinal)."""
        return self.config.total_step - self.config.tfinal

    def penalty(self) -> torch.Tensor:
        """orth_reg_weight x the mean over A and B matrices of ||A Aᵀ - I||_F (||Bᵀ B - I||_F), in fp32."""
        device = self.matrices[0][1].device
        with torch.autocast(device.type, enabled=False):
            norms = []
            for is_a, p in self.matrices:
                gram = p @ p.T if is_a else p.T @ p
                eye = torch.eye(gram.shape[0], device=device, dtype=gram.dtype)
                norms.append(torch.linalg.matrix_norm(gram - eye))
            return self.config.orth_reg_weight * torch.stack(norms).mean()

    def after_update(self, step: int, applied: bool) -> None:
        """After optimizer step `step` (1-based), before zero-grad. A step whose update was skipped (NaN or an
        fp16 overflow) has gradients that are not finite: they must not enter the scores. The step that
        fixes the ranks and those after it use no gradient, so they always run."""
        if applied or step >= self.final_step:
            self.tuner.update_and_allocate(step)

    def ranks(self) -> dict[str, int]:
        """Module path (in the tuned model) -> the rank it keeps now: the masked triplets left out."""
        pattern = self.config.rank_pattern or {}
        ranks = {}
        for name, p in self.tuner.model.named_parameters():
            if f"lora_E.{self.adapter}" in name:
                kept = pattern.get(name, pattern.get(name.replace(f".{self.adapter}", "")))
                ranks[name.split(".lora_E.")[0]] = int(sum(kept)) if kept is not None else p.shape[0]
        return ranks

    def summary(self) -> str:
        ranks = list(self.ranks().values())
        init_r = self.config.init_r
        return (f"AdaLoRA ranks: mean {sum(ranks) / len(ranks):.2f} (target {self.config.target_r}, from {init_r}) "
                f"over {len(ranks)} modules; min {min(ranks)}, max {max(ranks)}, "
                f"{sum(r == 0 for r in ranks)} at 0, {sum(r == init_r for r in ranks)} kept at {init_r}")

    # ---- checkpoints: the scores and the rank pattern, so a resumed run allocates as an unbroken one -----

    def state_dict(self) -> dict[str, torch.Tensor]:
        alloc = self.tuner.rankallocator
        state = {f"{kind}/{n}": t.detach().cpu().contiguous()
                 for kind in SCORES for n, t in getattr(alloc, kind).items()}
        for name, kept in (self.config.rank_pattern or {}).items():
            state[f"rank_pattern/{name}"] = torch.tensor(kept, dtype=torch.bool)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        alloc = self.tuner.rankallocator
        device = self.matrices[0][1].device
        for kind in SCORES:
            setattr(alloc, kind, {k.split("/", 1)[1]: t.to(device) for k, t in state.items()
                                  if k.startswith(f"{kind}/")})
        pattern = {k.split("/", 1)[1]: t.tolist() for k, t in state.items() if k.startswith("rank_pattern/")}
        self.config.rank_pattern = pattern or None
