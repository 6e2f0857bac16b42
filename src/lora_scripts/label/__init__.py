"""Auto-labelling (`lora-scripts label`, tools/auto_label.py): images -> comma-separated prompts in
metadata.csv, interrogator style.

For each image, CLIP scores the shipped phrase lists (resources/phrases/*.txt: subjects, mediums, art
styles, lighting, colours, composition, mood, quality) plus the user's own phrases. The best phrase of
each list is a candidate; candidates whose cosine similarity reaches the threshold are written most
relevant first, up to --max-phrases. An optional image-to-text captioner (BLIP, GIT, ...; captioning without a task prompt)
writes a sentence that leads the prompt, as CLIP-Interrogator does.

People's captions are never lost: existing rows are kept and only unlabelled images are labelled, unless
--overwrite (which keeps the old file as metadata.csv.bak). The CSV is rewritten atomically after every
batch, so an interrupted run keeps what it did and a rerun continues without duplicating rows.

label/clip.py scores the phrase lists with CLIP, label/captioner.py writes the leading sentence,
label/writer.py composes and writes the prompts, label/folder.py runs the whole job over a folder.
"""

from lora_scripts.label.folder import LabelError, LabelResult, label_folder

__all__ = ["LabelError", "LabelResult", "label_folder"]
