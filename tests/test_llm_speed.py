"""The LLM speed work must not change the numbers: packed attention and bf16 frozen weights."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_scripts.data import text as td
from lora_scripts.models import packed_attention
from lora_scripts.models.llm import restore_frozen_linears, store_frozen_linears_in
from lora_scripts.train.llm import causal_lm_loss, make_batch


def packed_items(tok, lengths_in_words=(3, 40, 9)):
    samples = [td.Sample(messages=[{"role": "user", "content": " ".join(["word"] * n)},
                                   {"role": "assistant", "content": f"Reply with {n} words."}])
               for n in lengths_in_words]
    return [td.tokenize_sample(tok, s, 512) for s in samples]


def logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
    logits = model(**inputs, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach().float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_packed_attention_equals_the_block_diagonal_mask(tiny_llama, monkeypatch):
    """Same logits and gradients as transformers' masked SDPA over the packed row (GQA model: 4 heads, 2 kv),
    with all samples in one padded call and with each sample in a call of its own."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    batch = make_batch(packed_items(tok), True, tok.pad_token_id, "cpu")
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    masked, masked_grads = logits_and_grads(model, batch)
    model.set_attn_implementation(packed_attention.register())
    for call_cost, calls in ((10**12, 1), (0, 3)):
        monkeypatch.setattr(packed_attention, "CALL_COST_IN_PAIRS", call_cost)
        packed_attention.gather_plan.cache_clear()
        groups, _ = packed_attention.gather_plan(tuple(batch["cu_seq_lens_q"].tolist()), torch.device("cpu"))
        assert len(groups) == calls
        ours, our_grads = logits_and_grads(model, batch)
        torch.testing.assert_close(ours, masked, atol=1e-5, rtol=1e-5)
        assert len(our_grads) == len(masked_grads)
        for a, b in zip(our_grads, masked_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    packed_attention.gather_plan.cache_clear()

    # a padded batch (no boundaries) goes through transformers' own SDPA path unchanged
    padded = make_batch(packed_items(tok), False, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ours_padded = model(**{k: v for k, v in padded.items() if k != "shift_labels"}).logits
        model.set_attn_implementation("sdpa")
        theirs_padded = model(**{k: v for k, v in padded.items() if k != "shift_labels"}).logits
    assert torch.equal(ours_padded, theirs_padded)


def test_samples_of_very_different_lengths_attend_in_separate_calls():
    split = packed_attention.split_into_groups
    assert split([50, 90, 120, 400])[0] == [3]  # the long one alone: 4 x 400^2 pairs -> 400^2 + a few small
    assert split([120, 110, 130, 100]) == [[2, 0, 1, 3]]  # similar lengths: one call, longest first
    assert split([300, 20, 310, 25]) == [[2, 0], [3, 1]]
    assert sorted(i for g in split([7, 3, 500, 64, 64, 250]) for i in g) == list(range(6))


def test_packed_attention_under_bf16_autocast_is_no_less_accurate(tiny_llama):
    """On the CPU short samples attend in fp32 (faster there); long ones in bf16 like the masked path. Either
    way the result must be at least as close to an fp32 forward as transformers' masked bf16 path."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    for words in [(3, 40, 9), (5, packed_attention.CPU_FP32_UP_TO + 40)]:
        batch = make_batch(packed_items(tok, words), True, tok.pad_token_id, "cpu")
        inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            reference = model(**inputs, use_cache=False).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                masked = model(**inputs, use_cache=False).logits.float()
                model.set_attn_implementation(packed_attention.register())
                ours = model(**inputs, use_cache=False).logits.float()
        err_ours, err_masked = (ours - reference).abs().mean(), (masked - reference).abs().mean()
        assert err_ours <= err_masked * 1.1 + 1e-6, (words, float(err_ours), float(err_masked))


def test_frozen_linears_stored_in_bf16_give_bitwise_the_same_step(tiny_llama, pairs_csv):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.set_attn_implementation(packed_attention.register())
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # non-zero B, so every LoRA tensor gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    items = [td.tokenize_sample(tok, s, 256) for s in td.load_samples(pairs_csv)[:4]]
    batch = make_batch(items, True, tok.pad_token_id, "cpu")

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss_before, grads_before = step()
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    assert store_frozen_linears_in(model, torch.bfloat16, tiny_llama)
    loss_after, grads_after = step()
    cast = [k for k, v in model.state_dict().items() if v.dtype == torch.bfloat16]
    assert len(cast) == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + a copy of the tied LM head
    assert torch.equal(loss_before, loss_after)
    assert all(torch.equal(a, b) for a, b in zip(grads_before, grads_after))
    base = model.base_model.model
    assert base.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.get_input_embeddings().weight.dtype == torch.float32
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    restore_frozen_linears(model, tiny_llama)  # exactly the fp32 weights that were loaded
    restored = model.state_dict()
    assert restored.keys() == fp32.keys() and all(torch.equal(restored[k], fp32[k]) for k in fp32)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # tied again

    # a folder whose files do not hold every weight under the expected name: not cast, left as it was
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama).requires_grad_(False),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    assert not store_frozen_linears_in(other, torch.bfloat16, tiny_llama.parent)
    assert all(v.dtype == torch.float32 for v in other.state_dict().values())


def test_chunked_cross_entropy_equals_the_full_logits_path(monkeypatch):
    """Loss and both gradients as F.cross_entropy over full fp32 logits, across chunk boundaries."""
    from lora_scripts.train import chunked_ce

    monkeypatch.setattr(chunked_ce, "CHUNK", 7)  # 23 tokens: three full chunks and a partial one
    monkeypatch.setattr(chunked_ce, "ROWS", 3)  # and the fp32 passes in 3 + 3 + 1 rows of each chunk
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (23,))
    target[[0, 5, 13]] = td.IGNORE_INDEX

    ours = chunked_ce.linear_cross_entropy(hidden, weight, target)
    ours.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    theirs = torch.nn.functional.cross_entropy(hidden @ weight.T, target, ignore_index=td.IGNORE_INDEX, reduction="sum")
    theirs.backward()
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6)  # accumulated in fp32
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_without_logits_matches_the_logits_path(tiny_llama, pairs_csv, monkeypatch):
    """The LM head left out of the forward (chunked loss) gives the loss and gradients of the usual path in
    fp32; under bf16 autocast the same loss and gradients at least as close to the fp32 ones (the two paths
    round the logits' gradient differently, so they are compared with the exact numbers, not with each
    other). The model gets its head back."""
    from lora_scripts.train import llm as llm_train

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    head = model.get_output_embeddings()
    items = [td.tokenize_sample(tok, s, 256) for s in td.load_samples(pairs_csv)[:4]]
    batch = make_batch(items, True, tok.pad_token_id, "cpu")

    def loss_and_grads(chunked: bool, autocast: bool):
        monkeypatch.setattr(llm_train, "PLAIN_HEAD_ARCHITECTURES", {"llama"} if chunked else set())
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, n = causal_lm_loss(model, batch)
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def rel(grads, ref_grads):
        assert len(grads) == len(ref_grads)
        return max(float((g - r).norm() / r.norm().clamp_min(1e-12)) for g, r in zip(grads, ref_grads))

    exact_loss, exact_n, exact = loss_and_grads(False, False)
    loss, n, grads = loss_and_grads(True, False)
    assert n == exact_n and model.get_output_embeddings() is head
    torch.testing.assert_close(loss, exact_loss, rtol=1e-5, atol=1e-5)
    assert rel(grads, exact) < 1e-5

    usual_loss, _, usual = loss_and_grads(False, True)
    loss, _, grads = loss_and_grads(True, True)
    assert model.get_output_embeddings() is head
    torch.testing.assert_close(loss, usual_loss, rtol=1e-5, atol=1e-5)
    assert rel(usual, exact) > 1e-3  # bf16 is in play: the comparison below means something
    assert rel(grads, exact) <= 1.05 * rel(usual, exact)


def test_rows_rounded_up_to_a_shape_multiple_change_no_number(tiny_llama, pairs_csv, monkeypatch):
    """Filler tokens (packed rows) and filler columns (padded batches), and the unlabelled positions added
    to the loss's rows, leave the loss, the token count and every gradient as they were."""
    from lora_scripts.train import llm as llm_train

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.set_attn_implementation(packed_attention.register())
    items = [td.tokenize_sample(tok, s, 256) for s in td.load_samples(pairs_csv)[:3]] + packed_items(tok, (2,))

    def loss_and_grads(packed: bool, multiple: int):
        monkeypatch.setattr(llm_train, "shape_multiple", lambda device: multiple)
        batch = make_batch(items, packed, tok.pad_token_id, "cpu")
        model.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
        return batch, loss.detach(), n, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for packed in (True, False):
        plain, ref_loss, ref_n, ref_grads = loss_and_grads(packed, 1)
        rounded, loss, n, grads = loss_and_grads(packed, 64)
        assert rounded["input_ids"].shape[1] % 64 == 0 and rounded["input_ids"].shape[1] > plain["input_ids"].shape[1]
        assert n == ref_n
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    rounded_bounds = make_batch(items, True, tok.pad_token_id, "cpu")["cu_seq_lens_q"].diff().tolist()  # at 64
    monkeypatch.setattr(llm_train, "shape_multiple", lambda device: 1)
    bounds = make_batch(items, True, tok.pad_token_id, "cpu")["cu_seq_lens_q"].diff().tolist()
    # the filler joined the shortest sample (the last one here), the other segments are untouched
    assert rounded_bounds[:-1] == bounds[:-1] and rounded_bounds[-1] > bounds[-1] == min(bounds)
