// Dataset: an image folder's pictures with their captions (edited inline, saved to metadata.csv with a
// backup), find/replace and a trigger word over all of them, uploads, auto-labelling as a job, and the
// preflight's findings beside the image they name; or an LLM dataset (CSV / JSONL) as a table.
"use strict";

const DATA_FILES = /\.(csv|jsonl|json)$/i;

PAGES.dataset = async (main, _arg, params) => {
  const path = params.get("folder") || params.get("file") || "";
  main.append(el("h1", {}, "Dataset"));
  const choose = el("div", { class: "card" }, el("div", { class: "muted" },
    "Pick an image folder, or an LLM dataset (.csv with prompt,response columns, or .jsonl):"),
  picker(path && !DATA_FILES.test(path) ? path : ".", (picked, isDir) => {
    location.hash = "#/dataset?" + (isDir ? "folder=" : "file=") + encodeURIComponent(picked);
  }, { filter: name => DATA_FILES.test(name) }));
  if (!path) { main.append(choose); return; }
  if (params.get("file")) { main.append(el("p", {}, el("code", {}, path)), await llmTable(path), choose); return; }

  const listing = await api("/api/dataset?folder=" + encodeURIComponent(path));
  const cards = new Map();  // image key -> {textarea, original, problem}
  const problems = el("ul", { class: "findings", id: "problems" },
    listing.problems.map(p => el("li", { class: "warning" }, p)));
  const grid = el("div", { class: "thumbs", id: "thumbs" });
  for (const image of listing.images) {
    const area = el("textarea", { rows: 3, "data-key": image.key, placeholder: "no caption: write one" },
      image.caption || "");
    const problem = el("div", { class: "problem" });
    area.addEventListener("input", () => area.classList.toggle("changed", area.value !== (image.caption || "")));
    cards.set(image.key, { area, image, problem });
    grid.append(el("div", { class: "thumb", "data-image": image.key },
      el("img", { src: imageUrl(path + "/" + image.key), loading: "lazy", alt: image.key }),
      el("div", { class: "name", title: image.key }, image.key,
        el("span", { class: "muted" }, image.source ? "  · " + image.source : "  · no caption")),
      area, problem));
  }
  const reload = () => render();
  const changed = () => Object.fromEntries([...cards].filter(([, c]) => c.area.value !== (c.image.caption || ""))
    .map(([key, c]) => [key, c.area.value]));
  async function edit(body, what) {
    const result = await guarded(() => api("/api/dataset/captions", { json: Object.assign({ folder: path }, body) }));
    if (result) { await reload(); flash(`${result.changed} caption(s) ${what}; the previous metadata.csv is kept as metadata.csv.bak`, "ok"); }
  }
  const find = el("input", { placeholder: "find", id: "find" }), replace = el("input", { placeholder: "replace with", id: "replace" });
  const trigger = el("input", { placeholder: "trigger word", id: "trigger" });
  const clip = el("input", { placeholder: "CLIP folder (default: the Hugging Face cache)", id: "clip-model", size: 34 });
  const configPath = el("input", { placeholder: "configs/my_lora.yaml", id: "check-config", size: 30,
    value: params.get("config") || "" });
  const findings = el("ul", { class: "findings", id: "findings" });
  const upload = el("input", { type: "file", multiple: true, accept: "image/*", id: "upload" });
  upload.addEventListener("change", async () => {
    let saved = 0;
    for (const file of upload.files) {
      const url = `/api/dataset/upload?folder=${encodeURIComponent(path)}&name=${encodeURIComponent(file.name)}`;
      if (await guarded(() => api(url, { method: "POST", body: file }))) saved++;
    }
    if (saved) { await reload(); flash(`${saved} image(s) added`, "ok"); }
  });
  async function preflight() {
    params.set("config", configPath.value.trim());  // kept in the address: a save reloads the page with it
    history.replaceState(null, "", "#/dataset?" + params.toString());
    const report = await guarded(() => api("/api/config/validate", { json: { config: configPath.value.trim() } }));
    if (!report) return;
    findings.replaceChildren(...preflightItems(report));
    if (report.ok && !report.findings.length) findings.append(el("li", {}, "no findings: ready to train"));
    for (const c of cards.values()) {  // a finding that names an image shows beside it too
      const about = report.findings.filter(f => f.message.startsWith(c.image.key + ":"));
      c.problem.textContent = about.map(f => f.message).join("\n");
    }
  }
  main.append(el("p", {}, el("code", {}, path), el("span", { class: "muted" }, `  ${listing.images.length} image(s)`)),
    el("div", { class: "card" },
      el("div", { class: "row" }, el("button", { class: "primary", id: "save-captions", onclick: () => {
        const changes = changed();
        if (!Object.keys(changes).length) return flash("no caption was changed", "ok");
        edit({ captions: changes }, "saved");
      } }, "Save captions"), el("span", { class: "muted" }, "Edited captions are highlighted until saved.")),
      el("div", { class: "row" }, find, replace, el("button", { id: "do-replace",
        onclick: () => find.value && edit({ find: find.value, replace: replace.value }, "changed") }, "Replace in all")),
      el("div", { class: "row" }, trigger, el("button", { id: "do-trigger",
        onclick: () => trigger.value.trim() && edit({ trigger: trigger.value }, "given the trigger word") }, "Put in front of all")),
      el("div", { class: "row" }, el("label", {}, "Add images ", upload),
        el("button", { id: "auto-label", onclick: () => guarded(async () => {
          const job = await api("/api/commands/label", { json: { folder: path, trigger: trigger.value.trim(),
            clip_model: clip.value.trim() } });
          location.hash = "#/run/" + job.id;
        }) }, "Auto-label with CLIP"), clip, el("span", { class: "muted" }, "captions images that have none; runs as a job")),
      el("div", { class: "row" }, "Check with a config: ", configPath, el("button", { id: "run-preflight", onclick: preflight }, "Run the preflight"))),
    problems, findings, grid, el("h2", {}, "Another dataset"), choose);
  if (configPath.value) preflight();  // after a save or upload: the findings of the folder as it is now
};

async function llmTable(path) {
  const data = await api("/api/dataset/table?path=" + encodeURIComponent(path));
  const body = el("tbody");
  for (const row of data.rows) {
    const turns = row.messages || [{ role: "text", content: row.text }];
    const system = turns.find(t => t.role === "system");
    body.append(el("tr", {}, el("td", { class: "muted mono" }, row.origin),
      el("td", {}, system ? system.content : ""),
      el("td", {}, turns.filter(t => t.role === "user").map(t => el("div", {}, t.content))),
      el("td", {}, turns.filter(t => t.role !== "user" && t.role !== "system").map(t => el("div", {}, t.content)))));
  }
  return el("div", {}, el("p", { class: "muted" }, `${data.total} sample(s)` + (data.total > data.rows.length ?
    `, the first ${data.rows.length} shown` : "")), el("table", { id: "samples-table" },
    el("thead", {}, el("tr", {}, ["row", "system", "prompt", "response"].map(h => el("th", {}, h)))), body));
}
