// Config: a form made from the config model (/api/config/keys: type, default, choices, documentation,
// group), checked by the server as you type (the same messages as the CLI, "did you mean" included), saved
// as YAML, validated with the preflight, and started as a training job.
"use strict";

let CONFIG_KEYS = null;

function fieldInput(key, value) {
  const attrs = { name: key.name, id: "key-" + key.name, "data-key": key.name };
  const placeholder = key.default === null || key.default === undefined ? "" : String(key.default);
  // a yes/no key whose default is "decide for me" (null) needs three states: a select, not a checkbox
  if (key.widget === "bool" && key.default !== null) return el("input", Object.assign(attrs, { type: "checkbox", checked: value ?? key.default }));
  if (key.widget === "choice" || key.widget === "bool") {
    const choices = key.widget === "bool" ? ["true", "false"] : key.choices;
    const current = value === undefined || value === null ? "" : String(value);
    const select = el("select", attrs, el("option", { value: "" }, `(default: ${placeholder || "decided from the model"})`),
      choices.map(c => el("option", { value: c }, c)), current && !choices.includes(current) && el("option", { value: current }, current));
    select.value = current;
    return select;
  }
  if (key.widget === "list") {
    const lines = Array.isArray(value) ? value.join("\n") : value ?? "";
    return el("textarea", Object.assign(attrs, { rows: 2, placeholder: "one per line" }), lines);
  }
  return el("input", Object.assign(attrs, { type: "text", placeholder, value: value ?? "" }));
}

// the form's value for a key, typed as the YAML would be; undefined = leave it out (the default applies)
function fieldValue(key, input) {
  if (key.widget === "bool" && input.type === "checkbox") return input.checked === key.default ? undefined : input.checked;
  const raw = input.value.trim();
  if (!raw) return undefined;
  if (key.widget === "bool") return raw === "true" ? true : raw === "false" ? false : raw;
  if (key.widget === "list") return raw.split("\n").map(s => s.trim()).filter(Boolean);
  if (key.widget === "int" && /^[-+]?\d+$/.test(raw)) return parseInt(raw, 10);
  if ((key.widget === "float" || key.widget === "int") && raw !== "" && !isNaN(Number(raw))) return Number(raw);
  return raw;  // what does not parse goes as typed: the server's message says what is wrong with it
}

PAGES.config = async (main, _arg, params) => {
  CONFIG_KEYS = CONFIG_KEYS || await api("/api/config/keys");
  const path = params.get("path") || "";
  const pathInput = el("input", { id: "config-path", size: 44, value: path, placeholder: "configs/my_lora.yaml" });
  const general = el("ul", { class: "findings", id: "config-errors" });
  const report = el("ul", { class: "findings", id: "preflight" });
  const command = el("pre", { id: "cli-preview" });
  const family = el("select", { id: "family" }, el("option", { value: "" }, "all keys"),
    el("option", { value: "image" }, "Stable Diffusion keys"), el("option", { value: "llm" }, "LLM keys"));
  let fileValues = {};
  if (path) {
    const loaded = await guarded(() => api("/api/config/file?path=" + encodeURIComponent(path)));
    if (loaded) fileValues = loaded.values;
  }
  const inputs = new Map();
  const groups = new Map();
  for (const key of CONFIG_KEYS) {
    if (!groups.has(key.group)) groups.set(key.group, el("fieldset", {}, el("legend", {}, key.group)));
    const input = fieldInput(key, fileValues[key.name]);
    const error = el("div", { class: "error" });
    const row = el("div", { class: "field", "data-field": key.name, "data-family": key.family },
      el("label", { for: input.id }, key.name, key.required ? " *" : "",
        key.family !== "both" && el("span", { class: "family" }, key.family === "image" ? "SD" : "LLM")),
      input, el("div", { class: "help" }, key.doc), error);
    inputs.set(key.name, { key, input, row, error });
    groups.get(key.group).append(row);
    input.addEventListener(input.tagName === "SELECT" || input.type === "checkbox" ? "change" : "input", scheduleCheck);
  }
  // keys in the file the model does not know: kept (never silently dropped) and shown with their error
  const unknown = Object.keys(fileValues).filter(k => !inputs.has(k));
  const unknownBox = el("fieldset", { id: "unknown-keys", hidden: !unknown.length }, el("legend", {}, "keys this version does not know"),
    unknown.map(k => el("div", { class: "field invalid", "data-field": k }, el("label", {}, k),
      el("code", {}, JSON.stringify(fileValues[k])), el("div", { class: "help" }, "remove it from the file, or rename it"),
      el("div", { class: "error" }))));
  family.addEventListener("change", () => inputs.forEach(({ row, key }) => {
    row.hidden = family.value && key.family !== "both" && key.family !== family.value;
  }));

  const values = () => {
    const out = {};
    for (const [name, { key, input }] of inputs) { const v = fieldValue(key, input); if (v !== undefined) out[name] = v; }
    for (const k of unknown) out[k] = fileValues[k];
    return out;
  };
  let timer = null;
  function scheduleCheck() { clearTimeout(timer); timer = setTimeout(() => check(""), 300); }
  async function check(saveTo) {
    const result = await guarded(() => api("/api/config/check", { json: { values: values(), path: saveTo } }));
    if (!result) return null;
    for (const [name, { row, error }] of inputs) {
      const messages = result.errors[name] || [];
      row.classList.toggle("invalid", messages.length > 0);
      error.textContent = messages.join("\n");
    }
    unknownBox.querySelectorAll("[data-field]").forEach(row => {
      row.querySelector(".error").textContent = (result.errors[row.dataset.field] || []).join("\n");
    });
    general.replaceChildren(...(result.errors[""] || []).map(m => el("li", { class: "error" }, m)));
    const where = pathInput.value.trim() || "configs/my_lora.yaml";
    command.textContent = `lora-scripts train --config ${where}\n# the same: python train.py --config ${where}`;
    return result;
  }
  async function save() {
    const where = pathInput.value.trim();
    if (!where) { flash("give the file a name first, e.g. configs/my_lora.yaml"); return null; }
    const result = await check(where);
    if (result) {
      flash(`saved ${where}` + (Object.keys(result.errors).length ? " (it still has problems: training will refuse it)" : ""), "ok");
      if (params.get("path") !== where) history.replaceState(null, "", "#/config?path=" + encodeURIComponent(where));
    }
    return result;
  }
  async function validate() {
    if (!(await save())) return;
    const result = await guarded(() => api("/api/config/validate", { json: { config: pathInput.value.trim() } }));
    if (!result) return;
    report.replaceChildren(...preflightItems(result),
      ...(result.ok ? [el("li", { class: "ok" }, "preflight passed" + (result.findings.length ? " (see the notes above)" : ""))] : []));
  }
  async function train() {
    const result = await save();
    if (!result) return;
    if (Object.keys(result.errors).length) { flash("fix the fields marked in red first"); return; }
    const job = await guarded(() => api("/api/jobs", { json: { config: pathInput.value.trim() } }));
    if (job) location.hash = "#/run/" + job.id;
  }
  main.append(el("h1", {}, "Config"),
    el("div", { class: "card" },
      el("div", { class: "row" }, "File ", pathInput,
        el("button", { id: "load", onclick: () => { location.hash = "#/config?path=" + encodeURIComponent(pathInput.value.trim()); } }, "Load"),
        el("button", { id: "save", onclick: save }, "Save"),
        el("button", { id: "validate", onclick: validate }, "Validate"),
        el("button", { class: "primary", id: "start", onclick: train }, "Start training"), "Show ", family),
      el("details", {}, el("summary", { class: "muted" }, "open another config"),
        picker(path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : "configs", picked => {
          location.hash = "#/config?path=" + encodeURIComponent(picked);
        }, { filter: name => /\.ya?ml$/.test(name) })),
      el("h2", {}, "On the command line"), command, general, report),
    unknownBox, ...groups.values());
  await check("");
};
