"""The web UI end to end in a real headless Chromium (Debian's, driven by Playwright), against a real
`lora-scripts ui` server process, on a tiny LLM and a tiny SD1.5: what a user clicks, and what it leaves on
disk. Each page is saved as a screenshot (build/ui-screenshots, or $LORA_SCRIPTS_SCREENSHOTS).

LLM: the dataset as a table; a bad config value and its message; a run started from the config page; its
loss curve getting points; the page reloaded and the UI server restarted mid-run, the job found again both
times; stop (exit 130, the resume line in its log), resume, the end with a sample and the loss curve; the
merged export. (Base vs tuned replies and the strength x prompt grid: their commands in test_ui_api, what
they compute in test_cli and test_sd_cli; each is one more model-loading process here.)
SD: a caption edited and a trigger word put in front of all (metadata.csv and its backup); an image
uploaded, the preflight's "no caption" beside it, then captioned; a bad value; a run with its sample grids,
stopped, resumed, finished; its WebUI LoRA file downloaded from the results page. (Merging it into the
checkpoint is the same job button as the LLM's export, whose SD command test_ui_api checks; `merge` itself:
test_tools, test_sd2.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from lora_scripts.train.checkpoint import verify_checkpoint

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("LORA_SCRIPTS_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build" / "ui-screenshots"))
TIMEOUT_MS = 120_000


class Server:
    """`lora-scripts ui --root ROOT --port PORT` as a user starts it; restartable on the same port."""

    def __init__(self, root: Path, token: str | None = None):
        self.root, self.token = root, token
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        token = ["--token", self.token] if self.token else []
        self.proc = subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "ui", "--root", str(self.root),
                                      "--port", str(self.port), *token], stderr=subprocess.PIPE, text=True)
        end = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=10).close()  # the page: served without a token
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > end:
                    raise AssertionError(f"the UI server did not start: {self.proc.stderr.read()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
            return json.loads(body) if response.headers.get_content_type() == "application/json" else body.decode()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the UI's browser tests need Debian's Chromium "
                    "(sudo apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no script error on any page


def shot(page, name: str, full: bool = False) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full)


def points(page) -> int:
    return int(page.get_attribute('[data-chart="loss"]', "data-points"))


def wait_points_above(page, n: int) -> int:
    page.wait_for_function(f"Number(document.querySelector('[data-chart=loss]')?.dataset.points) > {n}")
    return points(page)


def wait_state(page, state: str) -> None:
    page.wait_for_selector(f'#page .row .state[data-state="{state}"]')


def job_id(page, previous: str = "") -> str:
    """The job whose page the browser went to (after `previous`, when it was on one already)."""
    page.wait_for_url(lambda url: "#/run/" in url and not url.endswith(f"/{previous}"))
    return page.url.rsplit("/", 1)[-1]


def wait_job(server: Server, jid: str, states=("finished", "failed", "interrupted"), timeout: float = 180) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = server.get(f"/api/jobs/{jid}")
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {jid} still {job['state']}:\n{server.get(f'/api/jobs/{jid}/log')}")


def set_field(page, key: str, value: str) -> None:
    page.fill(f"#key-{key}", value)


def field_error(page, key: str) -> str:
    page.wait_for_timeout(700)  # the form checks 300 ms after the last keystroke
    return page.inner_text(f'[data-field="{key}"] .error')


# ---- the LLM flow ------------------------------------------------------------------------------------------


@pytest.fixture
def llm_root(tmp_path, tiny_llama, pairs_csv):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "configs").mkdir()
    shutil.copy(pairs_csv, root / "data" / "pairs.csv")
    # 12 epochs of 6 steps: time to see it go on after the page and the server came back, and to stop it
    (root / "configs" / "llm.yaml").write_text(yaml.safe_dump({
        "base_model": str(tiny_llama), "metadata_path": "data/pairs.csv", "output_dir": "output/llm",
        "batch_size": 4, "epochs": 12, "learning_rate": 5e-3, "mixed_precision": "no", "drift_check": False,
        "save_steps": 1000, "sample_prompts": ["How do I brew tea?"], "max_new_tokens": 8, "seed": 3}, sort_keys=False))
    return root


def adapter_loads_everywhere(base: Path, adapter: Path, merged: Path) -> None:
    """The adapter the UI's job trained, loaded here, in a process that did not train it: by PEFT and by
    transformers' own `load_adapter` alike, equal to the merged model the export job wrote, and not the base.
    (That the saved adapter is the model as trained, in memory: test_real_smollm2 and test_lora_init.)"""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 520, 3000, 12, 77, 4000, 9]])
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
        by_peft = tuned(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)
        plain.load_adapter(str(adapter))
        by_transformers = plain.eval()(input_ids=ids).logits
        baked = AutoModelForCausalLM.from_pretrained(merged).eval()
        by_merged = baked(input_ids=ids).logits
        by_base = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
    assert float((by_transformers - by_peft).abs().max()) <= 1e-5
    assert float((by_merged - by_peft).abs().max()) <= 1e-4
    assert float((by_base - by_peft).abs().max()) > 1e-3  # training changed the model
    assert not any("lora" in k for k in baked.state_dict())


def test_llm_flow_in_the_browser(page, llm_root, tiny_llama):
    server = Server(llm_root)
    server.start()
    try:
        page.goto(server.url + "/#/dataset?file=data/pairs.csv")
        page.wait_for_selector("#samples-table tbody tr")
        assert page.locator("#samples-table tbody tr").count() == 24
        assert "Hello friend!" in page.inner_text("#samples-table")
        shot(page, "dataset-llm")

        page.goto(server.url + "/#/config?path=configs/llm.yaml")
        set_field(page, "lora_rank", "0")
        assert "greater than or equal to 1 (got 0)" in field_error(page, "lora_rank")
        page.locator('[data-field="lora_rank"]').scroll_into_view_if_needed()
        shot(page, "config-error")
        set_field(page, "lora_rank", "4")
        assert field_error(page, "lora_rank") == ""
        page.click("#start")
        first = job_id(page)
        assert yaml.safe_load((llm_root / "configs" / "llm.yaml").read_text())["lora_rank"] == 4  # saved first

        seen = wait_points_above(page, 1)
        # The job is held still (SIGSTOP, as on a suspended laptop) while the page and the server come and go,
        # so a machine fast enough to finish the run in those seconds still tests a job that is mid-run.
        group = server.get(f"/api/jobs/{first}")["pid"]
        os.killpg(group, signal.SIGSTOP)
        try:
            page.reload()  # the tab reloaded: the job is still there, its events replayed from the start
            seen = wait_points_above(page, seen - 1)
            wait_state(page, "running")
            server.stop()  # the UI server restarted: the job is found again
            server.start()
            page.reload()
            wait_state(page, "running")
            wait_points_above(page, seen - 1)
        finally:
            os.killpg(group, signal.SIGCONT)
        wait_points_above(page, seen)  # and it goes on
        shot(page, "run-llm-live", full=True)

        page.click('[data-action="stop"]')
        wait_state(page, "interrupted")
        assert server.get(f"/api/jobs/{first}")["exit_code"] == 130  # what Ctrl-C gives on a terminal
        events = [json.loads(x) for x in (llm_root / "output/llm/events.jsonl").read_text().splitlines()]
        stopped_at = [e["step"] for e in events if e["event"] == "step"][-1]
        checkpoint = llm_root / f"output/llm/checkpoint-{stopped_at:06d}"
        assert stopped_at < 72 and verify_checkpoint(checkpoint) is None
        log = server.get(f"/api/jobs/{first}/log")
        assert "SIGINT received: finishing this step and saving a checkpoint" in log
        assert f"checkpoint saved: {checkpoint.relative_to(llm_root)}" in log
        assert f"python train.py --config {llm_root / 'configs/llm.yaml'} resume_from=latest" in log
        page.wait_for_function("document.getElementById('log').textContent.includes('resume_from=latest')")

        page.click('[data-action="resume"]')
        second = job_id(page, previous=first)
        page.wait_for_selector("#summary #loss-curve")
        wait_state(page, "finished")
        assert page.locator("#replies .sample").count() >= 1
        assert "final loss" in page.inner_text("#summary")
        resumed = server.get(f"/api/jobs/{second}")
        assert resumed["resume_of"] == first and resumed["exit_code"] == 0
        events = [json.loads(x) for x in (llm_root / "output/llm/events.jsonl").read_text().splitlines()]
        steps = [e["step"] for e in events if e["event"] == "step"]
        assert steps[-1] == 72 and len([e for e in events if e["event"] == "start"]) == 2
        shot(page, "run-llm-finished", full=True)

        page.click("text=Results")
        page.wait_for_selector("#files")
        page.click("#export")
        merged = job_id(page)
        assert wait_job(server, merged)["state"] == "finished", server.get(f"/api/jobs/{merged}/log")
        assert (llm_root / "output/llm/merged/config.json").is_file()
        adapter_loads_everywhere(tiny_llama, llm_root / "output/llm", llm_root / "output/llm/merged")

        page.goto(server.url + "/#/jobs")
        page.wait_for_selector(f'tr[data-job="{merged}"]')
        states = {row.get_attribute("data-job"): row.locator(".state").inner_text()
                  for row in page.locator("#jobs tbody tr").all()}
        assert states == {first: "interrupted", second: "finished", merged: "finished"}
        shot(page, "jobs")
    finally:
        server.stop()


# ---- the SD flow -------------------------------------------------------------------------------------------


@pytest.fixture
def sd_root(tmp_path, tiny_sd15, style_images):
    ckpt, config_dir = tiny_sd15
    root = tmp_path / "root"
    (root / "configs").mkdir(parents=True)
    shutil.copytree(style_images, root / "data" / "style")
    shutil.copy(style_images / "img1.png", tmp_path / "new.png")  # to be uploaded through the page
    (root / "configs" / "sd.yaml").write_text(yaml.safe_dump({
        "base_model": str(ckpt), "model_config_dir": str(config_dir), "train_data_dir": "data/style",
        "output_dir": "output/sd", "output_name": "neon", "resolution": 64, "batch_size": 2, "repeats": 1,
        "epochs": 6, "learning_rate": 1e-3, "mixed_precision": "no", "save_steps": 1000,
        "sample_prompts": ["neon city"], "sample_steps": 2, "seed": 3}, sort_keys=False))
    return root


def test_sd_flow_in_the_browser(page, sd_root):
    server = Server(sd_root)
    server.start()
    try:
        page.goto(server.url + "/#/dataset?folder=data/style")
        page.wait_for_selector('[data-image="img0.png"] img')
        page.fill('textarea[data-key="img0.png"]', "neon city at dawn, wet street")
        assert "changed" in page.get_attribute('textarea[data-key="img0.png"]', "class")
        page.click("#save-captions")
        page.wait_for_selector("#flash.ok")
        page.fill("#trigger", "zxq style")
        page.click("#do-trigger")
        page.wait_for_function("document.querySelector('textarea[data-key=\"img1.png\"]')?.value.startsWith('zxq style, ')")
        meta = (sd_root / "data/style/metadata.csv").read_text()
        assert "zxq style, neon city at dawn, wet street" in meta and meta.count("zxq style, ") == 6
        assert "neon city at dawn" in (sd_root / "data/style/metadata.csv.bak").read_text()  # the file before
        # a new image, uploaded through the page: decoded and saved; without a caption the preflight says so
        # beside it, and once it has one the folder is ready
        page.set_input_files("#upload", str(sd_root.parent / "new.png"))
        page.wait_for_selector('[data-image="new.png"]')
        page.fill("#check-config", "configs/sd.yaml")
        page.click("#run-preflight")
        page.wait_for_selector('[data-image="new.png"] .problem:text("no caption")')
        shot(page, "dataset-sd", full=True)
        page.fill('textarea[data-key="new.png"]', "zxq style, neon city, a new view")
        page.click("#save-captions")
        page.wait_for_selector("#flash.ok")  # the page reloads and runs the preflight again
        page.wait_for_function("document.querySelector('#findings li') && !document.querySelector('#findings li.error')")
        assert page.inner_text('[data-image="new.png"] .problem') == ""

        page.goto(server.url + "/#/config?path=configs/sd.yaml")
        set_field(page, "resolution", "abc")
        assert "valid integer" in field_error(page, "resolution")
        set_field(page, "resolution", "64")
        assert field_error(page, "resolution") == ""
        page.click("#start")
        first = job_id(page)
        wait_points_above(page, 1)
        page.wait_for_function("[...document.querySelectorAll('#samples img')].some(i => i.naturalWidth > 0)")
        page.click('[data-action="stop"]')
        wait_state(page, "interrupted")
        page.click('[data-action="resume"]')
        second = job_id(page, previous=first)
        page.wait_for_selector("#summary #loss-curve")
        wait_state(page, "finished")
        events = [json.loads(x) for x in (sd_root / "output/sd/events.jsonl").read_text().splitlines()]
        total = next(e["total_steps"] for e in events if e["event"] == "start")
        assert [e["step"] for e in events if e["event"] == "step"][-1] == total and total >= 18  # 7 images, 6 epochs
        assert next(e["images"] for e in events if e["event"] == "start") == 7  # the uploaded one too
        assert server.get(f"/api/jobs/{second}")["resume_of"] == first
        shot(page, "run-sd", full=True)

        page.click("text=Results")
        page.wait_for_selector("#files")
        shot(page, "results-sd", full=True)
        # the export an SD run ends with, the WebUI file, downloaded through its link as the user gets it
        with page.expect_download() as download:
            page.click('[data-file="neon.safetensors"] a')
        assert download.value.suggested_filename == "neon.safetensors"
        assert Path(download.value.path()).read_bytes() == (sd_root / "output/sd/neon.safetensors").read_bytes()
    finally:
        server.stop()


def test_a_token_guarded_server_asks_for_it_in_the_page(browser, tmp_path):
    """Started with --token: the page loads (it holds no data), says a token is needed, and works once it
    is given; the API refuses requests without it."""
    root = tmp_path / "root"
    root.mkdir()
    server = Server(root, token="s3cret")
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            server.get("/api/jobs")
        page = browser.new_page()
        page.goto(server.url + "/#/jobs")
        page.wait_for_selector("#token-box:not([hidden])")
        assert "--token" in page.inner_text("#token-box")
        page.fill("#token-input", "s3cret")
        page.click("#token-form button")
        page.wait_for_selector("#jobs")
        assert "token required" in page.inner_text("#served")
        shot(page, "token")
        page.close()
    finally:
        server.stop()
