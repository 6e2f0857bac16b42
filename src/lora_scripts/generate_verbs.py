"""`lora-scripts generate` and `lora-scripts export`: their arguments and calls; cli.py lists them in its
dispatch table. Nothing heavy is imported until a verb runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_scripts.cli_support import fail, lora_specs
from lora_scripts.tools.verbs import add_prediction_flag


def add_generate(p: argparse.ArgumentParser) -> None:
    """generate with a base model plus LoRAs: LLM replies or SD images

    lora-scripts generate --base smollm2-135m-instruct --lora output/demo_llm_style:0.8 --prompt 'Hi'
    """
    p.add_argument("--base", required=True,
                   help="base model: an LLM (smollm2-135m-instruct, a folder, a .gguf) or an SD checkpoint/folder")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a PEFT adapter folder (LLM) or a LoRA .safetensors (SD) and its strength (default 1.0); "
                        "repeat to mix")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to answer (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true",
                   help="LLM: each prompt answered by the base model first, then with the adapter(s)")
    sd = p.add_argument_group("Stable Diffusion")
    sd.add_argument("--negative", default="", help="negative prompt")
    sd.add_argument("--steps", type=int, default=25)
    sd.add_argument("--guidance", type=float, default=7.0)
    sd.add_argument("--width", type=int, default=None)
    sd.add_argument("--height", type=int, default=None)
    sd.add_argument("--lora-dir", default=".", help="where <lora:name:w> tags in a prompt are looked up")
    sd.add_argument("--out", default="generated", help="folder for the PNG files")
    sd.add_argument("--same-seed", action="store_true",
                    help="every prompt with --seed (default: prompt i with seed + i); a strength sweep then "
                         "compares like with like")
    sd.add_argument("--model-config-dir", default=None, help="diffusers config folder for a non-standard checkpoint")
    add_prediction_flag(sd)


def cmd_generate(args) -> int:
    from lora_scripts.models.detect import detect_model_type

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    model_type = detect_model_type(args.base)
    if model_type != "llm":
        from lora_scripts.sd_generate import describe_image, generate_images

        if not prompts:
            return fail("give --prompt or --prompts-file for image generation")
        written = generate_images(
            args.base, model_type, prompts, lora_specs(args.lora), Path(args.out),
            Path(args.lora_dir), Path(args.model_config_dir) if args.model_config_dir else None, args.negative,
            args.steps, args.guidance, args.seed, args.width, args.height, args.v_parameterization, args.same_seed)
        for path, prompt, loras in written:
            print(describe_image(path, prompt, loras))
        return 0
    from lora_scripts.llm_generate import chat, format_reply, generate_replies, load_with_adapters

    try:
        model, tokenizer = load_with_adapters(args.base, lora_specs(args.lora))
    except (OSError, ValueError) as exc:  # transformers' own words for a folder it cannot load
        return fail(str(exc))
    if args.compare and not args.lora:
        return fail("--compare compares the base with its adapter: give --lora as well")
    if prompts:
        def replies():
            return generate_replies(model, tokenizer, prompts, args.max_new_tokens, temperature=args.temperature,
                                    seed=args.seed)

        if args.compare:
            with model.disable_adapter():
                base = replies()
            for before, after in zip(base, replies()):
                print("[base]")
                print(format_reply(before))
                print("[with the adapter]")
                print(format_reply(after))
            return 0
        for r in replies():
            print(format_reply(r))
        return 0
    print("chat with the model; an empty line or Ctrl-D quits", file=sys.stderr)
    chat(model, tokenizer, args.max_new_tokens, args.temperature, args.seed)
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    """write a merged model (base + adapter)

    lora-scripts export --merge --base smollm2-135m-instruct --lora output/demo_llm_style --out merged/
    """
    p.add_argument("--merge", action="store_true", help="bake the adapter(s) into the base weights")
    p.add_argument("--base", required=True, help="base model the adapter was trained on")
    p.add_argument("--lora", action="append", required=True, metavar="DIR[:WEIGHT]")
    p.add_argument("--out", required=True, help="output folder (a full transformers model)")


def cmd_export(args) -> int:
    from lora_scripts.export.peft import LoraSpecError
    from lora_scripts.tools.model_ops import export_merged

    if not args.merge:
        return fail("export needs --merge (format conversion comes with the LoRA tools)")
    try:
        out = export_merged(args.base, lora_specs(args.lora), Path(args.out))
    except (LoraSpecError, FileNotFoundError, OSError) as exc:
        return fail(str(exc))
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
