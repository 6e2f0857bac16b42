"""The UI server's API through FastAPI's TestClient: a real job submitted, its events streamed (server-sent
events) to the end; the config's keys and validation; the token; paths outside the served folder refused."""

import json

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


def test_a_job_runs_and_its_events_stream_to_the_end(served):
    with TestClient(create_app(served)) as client:  # the app's refresh thread moves the job along
        job = client.post("/api/jobs", json={"config": "run.yaml"}).json()
        assert job["state"] == "running" and job["output_dir"] == str(served / "out" / "run")
        with client.stream("GET", f"/api/jobs/{job['id']}/events") as response:
            events = sse(response.iter_lines())
        names = [data["event"] for kind, data in events if kind == "message"]
        assert names[0] == "info" or "start" in names
        assert [d["step"] for k, d in events if k == "message" and d["event"] == "step"] == [1, 2, 3]
        assert "end" in names
        last_kind, final = events[-1]
        assert last_kind == "job" and final["state"] == "finished" and final["exit_code"] == 0
        assert client.get("/api/jobs").json()[0]["state"] == "finished"
        assert "done: 3 steps" in client.get(f"/api/jobs/{job['id']}/log").text
        # a page opened later gets the same events from any point on
        with client.stream("GET", f"/api/jobs/{job['id']}/events?since=1") as response:
            assert len(sse(response.iter_lines())) == len(events) - 1


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
