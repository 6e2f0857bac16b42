"""Auto-labelling with a tiny random CLIP (and BLIP) built in code."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.data.images import load_captioned_images, open_rgb
from lora_scripts.label import label_folder
from lora_scripts.label.captioner import Captioner
from lora_scripts.label.clip import ClipInterrogator, shipped_phrases

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "cyberpunk_night"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(d / f"img{i:02d}.png")
    return d


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def reference_choice(clip_dir, image_path, threshold, max_phrases):
    """The phrases a correct interrogator must pick, computed independently from the model's similarities."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    bank = shipped_phrases()
    with torch.no_grad():
        img = model.get_image_features(**proc(images=[open_rgb(image_path)], return_tensors="pt"))
        img = getattr(img, "pooler_output", img)
        img = img / img.norm(dim=-1, keepdim=True)
        best = []
        for texts in bank.values():
            t = model.get_text_features(**proc.tokenizer(texts, padding=True, return_tensors="pt"))
            t = getattr(t, "pooler_output", t)
            sims = (img @ (t / t.norm(dim=-1, keepdim=True)).T)[0]
            j = int(sims.argmax())
            best.append((texts[j], float(sims[j])))
    best = sorted((b for b in best if b[1] >= threshold), key=lambda b: -b[1])
    return best[:max_phrases]


def test_chosen_phrases_are_the_top_scoring_ones(photos, tiny_clip):
    result = label_folder(photos, clip_model=str(tiny_clip), threshold=-1.0, max_phrases=5, progress=False)
    for name, chosen in result.details.items():
        expected = reference_choice(tiny_clip, photos / name, -1.0, 5)
        assert [c[0] for c in chosen] == [e[0] for e in expected]
        assert [c[1] for c in chosen] == pytest.approx([e[1] for e in expected], abs=1e-5)
        assert result.labelled[name] == ", ".join(e[0] for e in expected)
    # a threshold between the scores cuts exactly the phrases below it
    name, chosen = next(iter(result.details.items()))
    all_best = reference_choice(tiny_clip, photos / name, -1.0, 99)
    cut = (all_best[2][1] + all_best[3][1]) / 2
    again = label_folder(photos, photos / "t.csv", clip_model=str(tiny_clip), threshold=cut, max_phrases=99,
                             progress=False)
    assert [c[0] for c in again.details[name]] == [b[0] for b in all_best[:3]]


def test_csv_round_trips_through_the_training_loader(photos, tiny_clip):
    out = photos / "metadata.csv"
    label_folder(photos, out, clip_model=str(tiny_clip), threshold=-1.0, trigger="cybr_night", progress=False)
    rows = read_rows(out)
    assert rows[0] == ["filename", "prompt"] and len(rows) == 6
    assert all(r[1].startswith("cybr_night, ") and r[1].count(",") >= 2 for r in rows[1:])
    loaded = {it.key: it.caption for it in load_captioned_images(photos)}
    assert loaded == {r[0]: r[1] for r in rows[1:]}


def test_existing_rows_survive_and_overwrite_keeps_a_backup(photos, tiny_clip):
    out = photos / "metadata.csv"
    out.write_text('filename,prompt\nimg01.png,"my own words, carefully written"\n')
    result = label_folder(photos, out, clip_model=str(tiny_clip), threshold=-1.0, progress=False)
    assert result.kept == 1 and len(result.labelled) == 4 and "img01.png" not in result.labelled
    rows = dict(read_rows(out)[1:])
    assert rows["img01.png"] == "my own words, carefully written" and len(rows) == 5
    before = out.read_text()
    label_folder(photos, out, clip_model=str(tiny_clip), threshold=-1.0, overwrite=True, progress=False)
    assert (photos / "metadata.csv.bak").read_text() == before
    assert dict(read_rows(out)[1:])["img01.png"] != "my own words, carefully written"


def test_hand_captions_of_every_kind_survive_auto_labelling(photos, tiny_clip):
    # a sidecar caption, and images in a kohya `N_name` folder listed in the CSV by their bare names
    (photos / "img00.txt").write_text("my hand caption, sidecar\n")
    night = photos / "5_night"
    night.mkdir()
    for name in ["img03.png", "img04.png"]:
        (photos / name).rename(night / name)
    out = photos / "metadata.csv"
    out.write_text("filename,prompt\nimg03.png,listed by bare name\nimg04.png,also by bare name\n")
    result = label_folder(photos, out, clip_model=str(tiny_clip), threshold=-1.0, progress=False)
    assert sorted(result.labelled) == ["img01.png", "img02.png"] and result.kept == 3
    captions = {it.key: it.caption for it in load_captioned_images(photos)}
    assert captions["img00.png"] == "my hand caption, sidecar"  # not superseded by a CLIP row
    assert captions["5_night/img03.png"] == "listed by bare name"
    assert captions["5_night/img04.png"] == "also by bare name"
    assert "img00.png" not in dict(read_rows(out)[1:])


def test_interrupted_run_resumes_without_duplicates(photos, tiny_clip, monkeypatch):
    out = photos / "metadata.csv"
    interrogator = ClipInterrogator.load(tiny_clip, torch.device("cpu"))
    real = interrogator.similarities
    calls = {"n": 0}

    def dies_on_second_batch(images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(images)

    monkeypatch.setattr(interrogator, "similarities", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        label_folder(photos, out, batch_size=2, threshold=-1.0, interrogator=interrogator, progress=False)
    first = read_rows(out)
    assert len(first) == 3  # header + the first batch of 2
    monkeypatch.setattr(interrogator, "similarities", real)
    label_folder(photos, out, batch_size=2, threshold=-1.0, interrogator=interrogator, progress=False)
    rows = read_rows(out)
    names = [r[0] for r in rows[1:]]
    assert sorted(names) == [f"img{i:02d}.png" for i in range(5)] and len(set(names)) == 5
    assert rows[1:3] == first[1:3]


def test_corrupt_image_is_skipped_and_reported(photos, tiny_clip, capsys):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code = main(["label", "--input", str(photos), "--clip-model", str(tiny_clip), "--threshold", "-1"])
    err = capsys.readouterr().err
    assert code == 1 and "skipped broken.jpg" in err and "1 image(s) could not be read" in err
    names = [r[0] for r in read_rows(photos / "metadata.csv")[1:]]
    assert "broken.jpg" not in names and len(names) == 5


def test_captioner_sentence_leads_the_prompt(photos, tiny_clip, tiny_blip):
    result = label_folder(photos, clip_model=str(tiny_clip), captioner=str(tiny_blip), trigger="tok",
                              threshold=-1.0, max_phrases=3, dry_run=True, progress=False)
    sentences = Captioner(tiny_blip, torch.device("cpu")).caption([open_rgb(photos / "img00.png")])
    prompt = result.labelled["img00.png"]
    assert prompt.startswith(f"tok, {sentences[0]}, ") if sentences[0] else prompt.startswith("tok, ")
    assert not (photos / "metadata.csv").exists()  # dry run wrote nothing


def test_sidecars_dry_run_and_extra_phrases(photos, tiny_clip, capsys, tmp_path):
    extra = tmp_path / "mine.txt"
    extra.write_text("# my vocabulary\nglowing katana\n")
    assert main(["label", "--input", str(photos), "--clip-model", str(tiny_clip), "--threshold", "-1", "--dry-run",
                 "--extra-phrases", str(extra), "--max-phrases", "20"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("filename") and out.count("glowing katana") == 5
    assert not list(photos.glob("*.txt")) and not (photos / "metadata.csv").exists()
    assert main(["label", "--input", str(photos), "--clip-model", str(tiny_clip), "--sidecar"]) == 0
    assert len(list(photos.glob("*.txt"))) == 5


def test_no_clip_model_offline_is_a_clear_message(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, "tools/auto_label.py", "--input", str(photos), "--output",
                           str(photos / "metadata.csv")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "no CLIP model 'openai/clip-vit-large-patch14' is available offline" in proc.stderr
    assert "--clip-model DIR" in proc.stderr and "Traceback" not in proc.stderr
