"""A length-varied chat dataset (prompts and replies of very different lengths), where padding costs most."""

import csv
import random
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars watch quietly from far above "
         "calm harbors and busy markets where people trade stories about weather boats bread and music").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_pairs(path: Path, n: int, seed: int, prompt_words: tuple[int, int], reply_sentences: tuple[int, int]) -> Path:
    """`n` prompt,response rows: prompts of `prompt_words` words, replies of `reply_sentences` 12-word sentences."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "response"])
        for _ in range(n):
            w.writerow([sentence(rng, rng.randint(*prompt_words)),
                        " ".join(sentence(rng, 12) for _ in range(rng.randint(*reply_sentences)))])
    return path


def write_varied(path: Path) -> Path:
    return write_pairs(path, n=128, seed=0, prompt_words=(4, 40), reply_sentences=(1, 14))


def write_long(path: Path) -> Path:
    """Long replies (20-40 sentences, ~300-500 tokens): the seq-512 case of the GPU profile."""
    return write_pairs(path, n=96, seed=1, prompt_words=(8, 40), reply_sentences=(20, 40))


def write_photo_sized(src: Path, dst: Path, scale: int = 4) -> Path:
    """The same pictures at camera-like sizes (1024-1536 px JPEGs), as users usually hand them over.

    A loop that decodes and resizes every image at every step pays for their size; a latent cache does not.
    """
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    rows = (src / "metadata.csv").read_text().splitlines()
    out = [rows[0]]
    for row in rows[1:]:
        name, caption = row.split(",", 1)
        img = Image.open(src / name).convert("RGB")
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS)
        jpg = Path(name).with_suffix(".jpg").name
        img.save(dst / jpg, quality=92)
        out.append(f"{jpg},{caption}")
    (dst / "metadata.csv").write_text("\n".join(out) + "\n")
    return dst
