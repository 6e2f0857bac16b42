"""The UI server's API through FastAPI's TestClient: a real job submitted, its events streamed (server-sent
events) to the end; the config's keys and validation; the token; paths outside the served folder refused."""

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lora_scripts.ui.app import create_app
from test_ui_jobs import write_config


@pytest.fixture
def served(tiny_llama, pairs_csv, tmp_path):
    write_config(tmp_path / "run.yaml", tiny_llama, pairs_csv, "out/run", max_train_steps=3)
    return tmp_path


def sse(lines) -> list[tuple[str, dict]]:
    """(event name, data) of a server-sent event stream."""
    found, name = [], "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            found.append((name, json.loads(line[6:])))
            name = "message"
    return found


def test_events_stream_as_they_are_written_and_a_reconnect_goes_on(served, monkeypatch):
    """The run page's stream: events.jsonl line by line as server-sent events (each with its line number as
    id), a line still being written held back until its newline, the job's record as a last `job` event
    once it has ended; a page that reconnects (EventSource's Last-Event-ID, or ?since=) gets only the rest.
    A real training job streams in the browser tests (test_ui_e2e); here the file is written by hand, so
    the partial line is certain."""
    from lora_scripts.ui import app as ui_app
    from lora_scripts.ui.jobs import Job

    monkeypatch.setattr(ui_app, "KEEP_ALIVE_SECONDS", 0.5)  # a quiet stream says it is alive (proxies close idle ones)
    app = create_app(served, refresh=False)
    store = app.state.store
    out = served / "out" / "run"
    out.mkdir(parents=True)
    job = Job("20260101-000000-000001", str(served / "run.yaml"), str(out), state="running", created=1.0)
    store._save(job)
    lines = [{"event": "start", "step": 0}, {"event": "step", "step": 1, "loss": 2.5}, {"event": "step", "step": 2, "loss": 2.0}]
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "ste')

    def ended_soon():  # the job ends while the stream is open: the partial line is completed first
        import time
        time.sleep(1.2)
        with open(out / "events.jsonl", "a") as fh:
            fh.write('p", "step": 3, "loss": 1.5}\n')
        store._save(Job(**{**job.__dict__, "state": "finished", "exit_code": 0}))

    import threading
    threading.Thread(target=ended_soon).start()
    with TestClient(app) as client:
        with client.stream("GET", f"/api/jobs/{job.id}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = list(response.iter_lines())
        events = sse(raw)
        assert [d["step"] for k, d in events if k == "message"] == [0, 1, 2, 3]
        assert [line for line in raw if line.startswith("id: ")] == ["id: 0", "id: 1", "id: 2", "id: 3"]
        assert ": keep-alive" in raw[raw.index("id: 2"):raw.index("id: 3")]  # sent while the line was unfinished
        assert events[-1][0] == "job" and events[-1][1]["state"] == "finished"
        for reconnect in ({"headers": {"Last-Event-ID": "1"}}, {"params": {"since": 2}}):
            with client.stream("GET", f"/api/jobs/{job.id}/events", **reconnect) as response:
                assert [d["step"] for k, d in sse(response.iter_lines()) if k == "message"] == [2, 3]


def test_config_keys_and_validation(served):
    client = TestClient(create_app(served, refresh=False))
    keys = {k["name"]: k for k in client.get("/api/config/keys").json()}
    assert keys["lora_rank"]["default"] == 8 and "Rank r of the update" in keys["lora_rank"]["doc"]
    assert keys["resolution"]["family"] == "image" and keys["drift_check"]["family"] == "llm"
    assert keys["base_model"]["required"] is True
    (served / "bad.yaml").write_text("base_model: x\nlora_rnak: 8\n")
    bad = client.post("/api/config/validate", json={"config": "bad.yaml"}).json()
    assert bad["ok"] is False and any("did you mean lora_rank?" in e for e in bad["errors"])
    good = client.post("/api/config/validate", json={"config": "run.yaml"}).json()
    assert good["ok"] is True and any("optimizer steps" in f["message"] for f in good["findings"])
    refused = client.post("/api/jobs", json={"config": "bad.yaml"})
    assert refused.status_code == 422 and any("did you mean lora_rank?" in e for e in refused.json()["detail"])


def test_paths_outside_the_served_folder_are_refused(served, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "x.yaml").write_text((served / "run.yaml").read_text())
    (served / "link.yaml").symlink_to(outside / "x.yaml")
    client = TestClient(create_app(served, refresh=False))
    for path in ["../elsewhere/x.yaml", str(outside / "x.yaml"), "link.yaml", "sub/../../x.yaml"]:
        for url in ["/api/jobs", "/api/config/validate"]:
            response = client.post(url, json={"config": path})
            assert response.status_code == 403 and "outside the folder this UI serves" in response.json()["detail"]
    response = client.post("/api/jobs", json={"config": "run.yaml", "overrides": [f"output_dir={outside}/out"]})
    assert response.status_code == 403 and client.get("/api/jobs").json() == []  # nothing queued
    assert client.get("/api/jobs/..%2F..%2Fetc").status_code == 404
    assert client.post("/api/jobs/nope/stop").status_code == 404


def test_a_token_is_needed_when_one_is_set(served):
    client = TestClient(create_app(served, token="s3cret", refresh=False))
    assert client.get("/api/jobs").status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/jobs?token=s3cret").status_code == 200  # EventSource cannot set headers


def test_captions_are_edited_into_metadata_csv_with_a_backup(tmp_path):
    """What the dataset page does: every image with its caption and where it came from; an edit, a find /
    replace and a trigger word written into metadata.csv (the previous one kept as .bak) so that training
    reads exactly what the page shows; the images served for thumbnails, nothing outside the folder."""
    import numpy as np
    from PIL import Image

    from lora_scripts.data.images import load_captioned_images

    data = tmp_path / "data" / "style"
    (data / "5_cats").mkdir(parents=True)
    for name in ["a.png", "b.png", "5_cats/c.png"]:
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(data / name)
    (data / "metadata.csv").write_text('filename,prompt\na.png,"neon city, rain"\n')
    (data / "b.txt").write_text("neon alley, night")  # a sidecar caption; c.png has none yet
    client = TestClient(create_app(tmp_path, refresh=False))

    listed = client.get("/api/dataset", params={"folder": "data/style"}).json()["images"]
    assert [(i["key"], i["caption"], i["source"]) for i in listed] == [
        ("5_cats/c.png", None, None), ("a.png", "neon city, rain", "metadata.csv"), ("b.png", "neon alley, night", "b.txt")]
    edit = client.post("/api/dataset/captions", json={"folder": "data/style", "captions": {"5_cats/c.png": "neon cat"}})
    assert edit.json() == {"changed": 1}
    assert (data / "metadata.csv.bak").read_text() == 'filename,prompt\na.png,"neon city, rain"\n'
    assert client.post("/api/dataset/captions", json={"folder": "data/style", "find": "neon", "replace": "glowing"}
                       ).json() == {"changed": 3}
    for _ in range(2):  # a trigger word goes in front once
        client.post("/api/dataset/captions", json={"folder": "data/style", "trigger": "cyb3r"})
    # the trainer's own reader sees the page's captions, the sidecar's included
    assert {i.key: i.caption for i in load_captioned_images(data)} == {
        "5_cats/c.png": "cyb3r, glowing cat", "a.png": "cyb3r, glowing city, rain", "b.png": "cyb3r, glowing alley, night"}
    assert (data / "b.txt").read_text() == "neon alley, night"  # sidecars are left as they were

    refused = client.post("/api/dataset/captions", json={"folder": "data/style", "captions": {"a.png": "  "}})
    assert refused.status_code == 422 and "empty caption" in refused.json()["detail"]
    refused = client.post("/api/dataset/captions", json={"folder": "data/style", "captions": {"../x.png": "y"}})
    assert refused.status_code == 422 and "no such image" in refused.json()["detail"]
    assert client.get("/api/dataset", params={"folder": "../"}).status_code == 403
    image = client.get("/api/image", params={"path": "data/style/5_cats/c.png"})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert client.get("/api/image", params={"path": "data/style/metadata.csv"}).status_code == 404  # not an image
    assert client.get("/api/image", params={"path": "../../etc/passwd"}).status_code == 403


def test_the_ui_command_serves_the_api_and_wants_a_token_off_loopback(tmp_path, capsys):
    """`lora-scripts ui` as a user starts it: a real server process answering over HTTP; listening beyond
    this machine without a token is refused before anything listens."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from lora_scripts.cli import main

    assert main(["ui", "--root", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "pass --token SECRET as well" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "ui", "--root", str(tmp_path), "--port",
                               str(port)], stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs", timeout=2) as response:
                    assert json.loads(response.read()) == []
                break
            except OSError:
                assert server.poll() is None and time.time() < end, server.stderr.read() if server.poll() else "slow"
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_files_config_form_table_and_uploads(served):
    """The pickers' listing (the UI's own folder hidden), downloads, a config read into the form and saved
    back with each problem under its key (an unknown key kept, with "did you mean"), an LLM dataset as a
    table, and uploads: decoded before they are saved, never outside the folder, never over a file, never
    larger than the limit."""
    import io

    import numpy as np
    import yaml
    from PIL import Image

    from lora_scripts.ui.files import UPLOAD_LIMIT

    (served / ".lora-scripts-ui").mkdir()
    client = TestClient(create_app(served, refresh=False))
    names = [e["name"] for e in client.get("/api/files").json()["entries"]]
    assert "run.yaml" in names and ".lora-scripts-ui" not in names
    assert client.get("/api/file", params={"path": "run.yaml"}).text == (served / "run.yaml").read_text()
    assert client.get("/api/files", params={"path": ".."}).status_code == 403

    form = client.get("/api/config/file", params={"path": "run.yaml"}).json()
    assert form["values"]["batch_size"] == 4 and form["errors"] == {}
    values = {**form["values"], "lora_rank": 0, "lora_rnak": 4}
    checked = client.post("/api/config/check", json={"values": values, "path": "configs/new.yaml"}).json()
    assert checked["errors"] == {"lora_rank": ["lora_rank: Input should be greater than or equal to 1 (got 0)"],
                                 "lora_rnak": ["lora_rnak: unknown key; did you mean lora_rank?"]}
    saved = yaml.safe_load((served / "configs" / "new.yaml").read_text())
    assert saved == values  # kept as typed, problems and all: nothing the user wrote is dropped
    assert list(saved)[:2] == ["base_model", "metadata_path"]  # in the model's order, unknown keys last
    assert list(saved)[-1] == "lora_rnak"
    refused = client.post("/api/config/check", json={"values": values, "path": "notes.txt"})
    assert refused.status_code == 422 and not (served / "notes.txt").exists()
    keys = {k["name"]: k for k in client.get("/api/config/keys").json()}
    assert keys["optimizer"]["widget"] == "choice" and "adafactor" in keys["optimizer"]["choices"]
    assert keys["sample_prompts"]["widget"] == "list" and keys["v_parameterization"]["widget"] == "bool"
    assert keys["lora_rank"]["group"] == "the adapter" and keys["epochs"]["group"] == "optimisation"

    table = client.get("/api/dataset/table", params={"path": "metadata.csv"}).json()
    assert table["total"] == 24 and table["rows"][0]["messages"][1]["content"].startswith("Hello friend!")

    (served / "imgs").mkdir()
    png = io.BytesIO()
    Image.fromarray(np.full((12, 20, 3), 200, np.uint8)).save(png, format="PNG")

    def upload(name, body):
        return client.post("/api/dataset/upload", params={"folder": "imgs", "name": name}, content=body)

    assert upload("a.png", png.getvalue()).json() == {"saved": "imgs/a.png", "width": 20, "height": 12}
    assert upload("a.png", png.getvalue()).status_code == 409  # never over an existing file
    assert upload("../../b.png", png.getvalue()).json()["saved"] == "imgs/b.png"  # the name, not a path
    broken = upload("c.png", png.getvalue()[: len(png.getvalue()) // 2])  # a truncated PNG
    assert broken.status_code == 422 and "not a readable image" in broken.json()["detail"]
    assert upload("d.txt", b"hello").status_code == 422
    assert upload("e.png", b"\0" * (UPLOAD_LIMIT + 1)).status_code == 413
    assert sorted(p.name for p in (served / "imgs").iterdir()) == ["a.png", "b.png"]  # nothing else written


def test_actions_queue_the_commands_a_user_would_type(served, tiny_sd15):
    """Each results-page action is a `lora-scripts` command as a list of arguments, queued as a job. A job
    that holds the device (this test process, recorded as running) keeps them queued, so they are looked at,
    not run (they run in the browser tests)."""
    import os

    import psutil
    import yaml

    from lora_scripts.ui.jobs import Job

    app = create_app(served, refresh=False)
    store = app.state.store
    out = served / "out" / "run"
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text("{}")
    busy = Job("20260101-000000-000000", str(served / "run.yaml"), str(out), state="running", created=1.0,
               pid=os.getpid(), pid_started=psutil.Process().create_time(),
               command=["train", "--config", str(served / "run.yaml")])
    store._save(busy)
    client = TestClient(app)

    compare = client.post("/api/commands/compare", json={"job": busy.id, "prompts": ["Why; rm -rf /?"]}).json()
    assert compare["state"] == "queued" and compare["command"][:3] == ["generate", "--compare", "--base"]
    assert compare["command"][-2:] == ["--prompt", "Why; rm -rf /?"]  # one argument, never a shell string
    export = client.post("/api/commands/export", json={"job": busy.id}).json()
    base = yaml.safe_load((served / "run.yaml").read_text())["base_model"]
    assert export["command"] == ["export", "--merge", "--base", base, "--lora", str(out), "--out", str(out / "merged")]
    (served / "clip").mkdir()
    label = client.post("/api/commands/label", json={"folder": "out", "trigger": "zxq", "clip_model": "clip"}).json()
    assert label["command"] == ["label", "--input", str(out.parent), "--trigger", "zxq", "--clip-model", str(served / "clip")]
    assert client.post("/api/commands/label", json={"folder": "out", "clip_model": "/"}).status_code == 403
    assert client.post("/api/commands/label", json={"folder": "../"}).status_code == 403
    assert client.post("/api/commands/grid", json={"job": busy.id}).status_code == 409  # no image LoRA in an LLM run
    assert client.post("/api/commands/compare", json={"job": "nope", "prompts": ["x"]}).status_code == 404
    assert client.post("/api/commands/compare", json={"job": label["id"], "prompts": ["x"]}).status_code == 409
    assert client.post("/api/commands/convert", json={"path": "run.yaml", "to": "onnx"}).status_code == 422
    # an SD run: its strength x prompt grid, one cell per prompt and strength, all with the run's seed
    ckpt, config_dir = tiny_sd15
    (served / "sd.yaml").write_text(yaml.safe_dump({"base_model": str(ckpt), "model_config_dir": str(config_dir),
                                                    "train_data_dir": "imgs", "output_dir": "out/sd", "output_name": "neon",
                                                    "resolution": 64, "seed": 9}))
    (served / "out/sd").mkdir()
    sd_run = Job("20260101-000000-000002", str(served / "sd.yaml"), str(served / "out/sd"), state="finished",
                 created=2.0)
    store._save(sd_run)
    assert client.post("/api/commands/grid", json={"job": sd_run.id}).status_code == 409  # no LoRA file yet
    (served / "out/sd/neon.safetensors").write_bytes(b"")
    grid = client.post("/api/commands/grid", json={"job": sd_run.id, "prompts": ["city", "street"],
                                                   "strengths": [0, 0.5]}).json()
    cells = [grid["command"][i + 1] for i, a in enumerate(grid["command"]) if a == "--prompt"]
    assert cells == ["city <lora:neon:0>", "city <lora:neon:0.5>", "street <lora:neon:0>", "street <lora:neon:0.5>"]
    assert "--same-seed" in grid["command"] and grid["command"][grid["command"].index("--seed") + 1] == "9"
    layout = json.loads((Path(grid["output_dir"]) / "grid.json").read_text())  # the results page's table
    assert layout == {"prompts": ["city", "street"], "strengths": [0, 0.5], "lora": "out/sd/neon.safetensors"}
    # the same grid with a checkpoint's LoRA: checkpoints side by side
    (served / "out/sd/checkpoint-000004").mkdir()
    (served / "out/sd/checkpoint-000004/neon.safetensors").write_bytes(b"")
    early = client.post("/api/commands/grid", json={"job": sd_run.id, "adapter": "out/sd/checkpoint-000004",
                                                    "prompts": ["city"]}).json()
    assert early["command"][early["command"].index("--lora-dir") + 1] == str(served / "out/sd/checkpoint-000004")
    assert early["output_dir"].endswith("-checkpoint-000004")
    assert client.post("/api/commands/grid", json={"job": sd_run.id, "adapter": "../x"}).status_code == 403
    merge = client.post("/api/commands/export", json={"job": sd_run.id}).json()["command"]
    assert merge[:2] == ["merge", "--base"] and merge[merge.index("--out") + 1].endswith("out/sd/neon-merged.safetensors")

    # the results page's view of a run whose config names its model relative to the root (as the job, run
    # there, reads it; this test's working folder is elsewhere)
    (served / "models").mkdir()
    (served / "models" / "tiny").symlink_to(yaml.safe_load((served / "run.yaml").read_text())["base_model"])
    (served / "rel.yaml").write_text((served / "run.yaml").read_text().replace(base, "models/tiny"))
    rel_run = Job("20260101-000000-000003", str(served / "rel.yaml"), str(out), state="finished", created=3.0)
    store._save(rel_run)
    assert client.get(f"/api/runs/{rel_run.id}").json()["family"] == "llm"

    store.refresh()  # nothing starts while the device is held
    assert [j.state for j in store.jobs()] == ["running", "finished", "finished"] + ["queued"] * 6
