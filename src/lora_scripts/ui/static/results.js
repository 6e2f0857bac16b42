// Results: a finished run's files (downloads, inspect, convert), its checkpoints and sample grids side by
// side, and the comparisons: an x/y grid of LoRA strength x prompt (SD) or base vs tuned replies (LLM),
// each rendered as a job; export merges the adapter into the base.
"use strict";

PAGES.results = async (main, jobId) => {
  const run = await api("/api/runs/" + jobId);
  const files = await api("/api/files?path=" + encodeURIComponent(run.output_dir));
  const inspect = el("pre", { id: "inspect", hidden: true });
  const showInspect = path => guarded(async () => {
    inspect.textContent = (await api("/api/inspect?path=" + encodeURIComponent(path))).text;
    inspect.hidden = false;
  });
  // the final adapter, or one a checkpoint kept (the folder holds it in the family's own format)
  const adapterSelect = (id, final) => el("select", { id }, el("option", { value: "" }, final),
    run.checkpoints.map(c => el("option", { value: `${run.output_dir}/${c}` }, c)));
  const startJob = (url, body) => guarded(async () => {
    const job = await api(url, { json: body });
    location.hash = "#/run/" + job.id;
  });
  const fileRows = files.entries.map(f => el("tr", { "data-file": f.name },
    el("td", { class: "mono" }, f.dir ? f.name + "/" : el("a", { href: fileUrl(f.path), download: f.name }, f.name)),
    el("td", { class: "muted" }, f.size !== null ? (f.size / 1e6).toFixed(2) + " MB" : ""),
    el("td", {}, (f.name.endsWith(".safetensors") || f.name.startsWith("checkpoint-") || f.name === "best") && [
      // a checkpoint holds the adapter in the family's own format: PEFT files (LLM), <name>.safetensors (SD)
      el("button", { onclick: () => showInspect(f.dir && run.family !== "llm" ? `${f.path}/${run.name}.safetensors` : f.path) },
        "Inspect"),
      f.name.endsWith(".safetensors") && !f.name.endsWith("-merged.safetensors") && ["kohya", "diffusers", "peft"].map(to =>
        el("button", { onclick: () => startJob("/api/commands/convert", { path: f.path, to }) }, "→ " + to))])));
  // the adapter itself, when the run wrote it at the top of its folder (LLM: PEFT files)
  if (run.family === "llm" && files.entries.some(f => f.name === "adapter_config.json"))
    fileRows.unshift(el("tr", {}, el("td", { class: "mono" }, "(the adapter folder)"), el("td", {}),
      el("td", {}, el("button", { onclick: () => showInspect(run.output_dir) }, "Inspect"))));

  main.append(el("h1", {}, "Results of " + jobId), el("p", {}, el("code", {}, run.output_dir), "  ",
    el("a", { class: "button", href: "#/run/" + jobId }, "Run page"),
    el("button", { class: "primary", id: "export", onclick: () => startJob("/api/commands/export", { job: jobId }) },
      run.family === "llm" ? "Export merged model" : "Merge into the base checkpoint")),
  el("h2", {}, "Files"), el("table", { id: "files" }, el("tbody", {}, fileRows)), inspect,
  el("h2", {}, "Checkpoints"), el("p", { class: "muted" }, run.checkpoints.length ? run.checkpoints.join(" · ") :
    "none kept (save_total_limit, or the run ended before save_steps)"));

  if (run.family === "llm") {
    const prompt = el("textarea", { id: "compare-prompt", rows: 2 }, run.sample_prompts[0] || "");
    const adapter = adapterSelect("compare-adapter", "final adapter");
    main.append(el("h2", {}, "Base vs tuned"), el("div", { class: "card" }, prompt, el("div", { class: "row" }, adapter,
      el("button", { class: "primary", id: "compare", onclick: () => startJob("/api/commands/compare",
        { job: jobId, prompts: [prompt.value], adapter: adapter.value }) }, "Answer with both"),
      el("span", { class: "muted" }, "greedy replies, base model first; runs as a job"))));
  } else {
    const prompts = el("textarea", { id: "grid-prompts", rows: 3 }, run.sample_prompts.join("\n"));
    const strengths = el("input", { id: "grid-strengths", value: "0, 0.5, 1" });
    const checkpoint = adapterSelect("grid-adapter", "final LoRA");
    main.append(el("h2", {}, "Samples per epoch"), el("div", { class: "samples" }, run.samples.map(p =>
      el("figure", {}, el("img", { src: imageUrl(p) }), el("figcaption", {}, p.split("/").pop())))),
    el("h2", {}, "Strength x prompt"), el("div", { class: "card" }, prompts, el("div", { class: "row" }, "strengths ", strengths,
      checkpoint, el("button", { class: "primary", id: "grid", onclick: () => startJob("/api/commands/grid", { job: jobId, adapter: checkpoint.value,
        prompts: prompts.value.split("\n").map(s => s.trim()).filter(Boolean),
        strengths: strengths.value.split(",").map(Number).filter(n => !isNaN(n)) }) }, "Render the grid"))));
    for (const folder of run.grids) main.append(await strengthGrid(folder));
  }
};

// a grid job's PNGs (prompt-major, strengths inner) as a table; grid.json, written when it was queued, says
// which prompt and strength each is
async function strengthGrid(folder) {
  const listing = await api("/api/files?path=" + encodeURIComponent(folder));
  const images = listing.entries.filter(f => f.name.endsWith(".png"));
  const layout = await api("/api/file?path=" + encodeURIComponent(folder + "/grid.json")).catch(() => null);
  if (!layout) return el("div", {});
  const n = layout.strengths.length;
  return el("table", { class: "grid-table card", "data-grid": folder }, el("caption", { class: "muted" }, layout.lora || folder),
    el("thead", {}, el("tr", {}, el("th", {}, "prompt \\ strength"), layout.strengths.map(s => el("th", {}, String(s))))),
    el("tbody", {}, layout.prompts.map((prompt, i) => el("tr", {}, el("td", {}, prompt), layout.strengths.map((s, j) => {
      const image = images[i * n + j];
      return el("td", {}, image ? el("img", { src: imageUrl(image.path), alt: `${prompt} at ${s}` }) : el("span", { class: "muted" }, "rendering…"));
    })))));
}
