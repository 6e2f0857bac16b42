"""The commands as a user types them: wrappers, help, exit codes, messages."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from lora_scripts.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_py_wrapper_reports_a_misspelt_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: smollm2-135m-instruct\nlearning_rte: 1e-4\n")
    proc = run("train.py", "--config", str(cfg))
    assert proc.returncode == 2
    assert f"{cfg}:2: learning_rte: unknown key; did you mean learning_rate?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_ok_and_error_exit_codes(tmp_path, pairs_csv, tiny_llama, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {tiny_llama}\nmetadata_path: {pairs_csv}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["validate", "--config", str(cfg)]) == 0
    assert "ready to train" in capsys.readouterr().out
    assert main(["validate", "--config", str(cfg), f"metadata_path={tmp_path / 'gone.csv'}"]) == 2
    assert "gone.csv: not found" in capsys.readouterr().out


def test_validate_lists_documented_keys(capsys):
    assert main(["validate", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ["train_data_dir", "metadata_path", "base_model", "lora_rank", "lora_alpha", "batch_size", "epochs",
                "learning_rate", "optimizer", "scheduler", "output_dir", "save_steps", "logging_dir"]:
        assert f"\n{key}  (" in "\n" + out


def test_auto_label_wrapper_dispatches_to_label():
    proc = run("tools/auto_label.py", "--input", "x", "--output", "y.csv")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --input x: not a folder"


def test_every_command_has_help():
    for name in COMMANDS:
        proc = run("-m", "lora_scripts.cli", name, "--help")
        assert proc.returncode == 0 and "usage: lora-scripts" in proc.stdout, name


def test_generate_answers_prompts_with_a_weighted_adapter(tiny_llama, pairs_csv, tmp_path, capsys):
    from lora_scripts.config_file import load_config
    from lora_scripts.train.llm import train_llm

    out = tmp_path / "a"
    train_llm(load_config(None, [f"base_model={tiny_llama}", f"metadata_path={pairs_csv}", f"output_dir={out}",
                                 "epochs=1", "max_new_tokens=4", "learning_rate=2e-2"]), progress=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("first question\n\nsecond question\n")
    code = main(["generate", "--base", str(tiny_llama), "--lora", f"{out}:0.7", "--prompts-file", str(prompts),
                 "--max-new-tokens", "5"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.count(">>> ") == 2 and ">>> second question" in text
    assert main(["generate", "--base", str(tiny_llama), "--lora", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err

    # --compare (the UI's base-vs-tuned): the base's reply, then the adapter's, each as generate alone gives it
    def answer(*extra):
        assert main(["generate", "--base", str(tiny_llama), "--prompt", "How do I brew tea?", *extra]) == 0
        return capsys.readouterr().out

    plain, tuned = answer(), answer("--lora", str(out))
    assert plain != tuned
    assert answer("--lora", str(out), "--compare") == f"[base]\n{plain}[with the adapter]\n{tuned}"
    assert main(["generate", "--base", str(tiny_llama), "--prompt", "x", "--compare"]) == 2
    assert "give --lora as well" in capsys.readouterr().err


def test_demo_outside_the_project_folder_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["demo"], ["demo", "--images"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "config file not found" in err and "run it from there (as `make demo` does), or pass --config" in err


def test_demo_config_errors_from_the_project_folder_get_no_where_to_run_hint(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["demo", "lora_rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "lora_rnak: unknown key; did you mean lora_rank?" in err and "run it from there" not in err


def test_demo_interrupted_prints_the_resume_line_and_exits_130(tiny_llama, pairs_csv, tmp_path):
    """SIGTERM (Ctrl-C takes the same path, tested with `train` through the UI job store in test_ui_jobs)."""
    sig = signal.SIGTERM
    out = tmp_path / "demo"
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(f"base_model: {tiny_llama}\nmetadata_path: {pairs_csv}\neval_data_path: {pairs_csv}\n"
                   f"output_dir: {out}\nepochs: 2\nbatch_size: 4\nmax_new_tokens: 4\ndrift_check: false\n")
    script = textwrap.dedent(f"""
        import os, sys
        from lora_scripts import cli
        from lora_scripts.train import events
        real = events.Events.emit
        def emit(self, kind, **data):
            if kind == "step" and data["step"] == 2:
                os.kill(os.getpid(), {int(sig)})  # a real signal, in the middle of training
            return real(self, kind, **data)
        events.Events.emit = emit
        sys.exit(cli.main(["demo", "--config", "{cfg}", "mixed_precision=no"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"checkpoint saved: {out / 'checkpoint-000002'}" in proc.stderr
    assert f"lora-scripts demo --config {cfg} mixed_precision=no resume_from=latest" in proc.stderr


def test_chat_keeps_the_conversation_and_starts_over_on_new(tiny_llama):
    from lora_scripts.llm_generate import chat, generate_replies, load_with_adapters

    model, tokenizer = load_with_adapters(str(tiny_llama), [])
    lines = iter(["Hi, I am Ada.", "What is my name?", "/new", "What is my name?", ""])
    said: list[str] = []
    chat(model, tokenizer, max_new_tokens=6, ask=lambda _: next(lines), say=said.append)
    first = generate_replies(model, tokenizer, ["Hi, I am Ada."], 6)[0].text
    conversation = [{"role": "user", "content": "Hi, I am Ada."}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "What is my name?"}]
    with_history = generate_replies(model, tokenizer, [conversation], 6)[0].text
    alone = generate_replies(model, tokenizer, ["What is my name?"], 6)[0].text
    assert with_history != alone  # so the test tells a chat with history from one without
    assert said[1].startswith(">>> What is my name?\n" + with_history)  # the second answer saw the first exchange
    assert said[2] == "(a new conversation)" and said[3].startswith(">>> What is my name?\n" + alone)
