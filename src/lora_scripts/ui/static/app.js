// lora-scripts UI: shared helpers and the router. No build step: each page is a plain script that adds
// itself to PAGES; a page function renders into <main> and returns a cleanup (close streams, stop timers).
"use strict";

const PAGES = {};
const UI = { token: "", cleanup: null };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function detailText(data) {
  if (data && data.detail !== undefined) {
    const d = data.detail;
    return Array.isArray(d) ? d.map(x => (typeof x === "string" ? x : x.msg || JSON.stringify(x))).join("\n") : String(d);
  }
  return typeof data === "string" ? data : JSON.stringify(data);
}

// fetch with the token; JSON in (opts.json) and out; a non-2xx answer throws ApiError with the server's words
async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (UI.token) headers["Authorization"] = "Bearer " + UI.token;
  let body = opts.body;
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
  const r = await fetch(path, { method: opts.method || (body !== undefined ? "POST" : "GET"), headers, body });
  if (r.status === 401) { document.getElementById("token-box").hidden = false; }
  const type = r.headers.get("content-type") || "";
  const data = type.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, detailText(data));
  return data;
}

// URLs the browser fetches itself (img, EventSource, downloads) cannot set a header: the token goes in the query
function withToken(url) {
  return UI.token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(UI.token) : url;
}
const imageUrl = path => withToken("/api/image?path=" + encodeURIComponent(path));
const fileUrl = path => withToken("/api/file?path=" + encodeURIComponent(path));

// el("div", {class: "x", onclick: f}, child, "text", ...): a small DOM builder
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "value") node.value = v;
    else if (k === "checked") node.checked = !!v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) if (c !== undefined && c !== null && c !== false)
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function flash(message, kind = "error") {
  const box = document.getElementById("flash");
  box.className = "banner " + kind;
  box.textContent = message;
  box.hidden = !message;
  if (kind === "ok" && message) setTimeout(() => { if (box.textContent === message) box.hidden = true; }, 4000);
}

// run an action, showing its error instead of losing it in the console
async function guarded(action) {
  try { return await action(); } catch (e) { flash(e.message); return undefined; }
}

// the preflight's report as list items: its findings (errors among them), or, for a config that did not
// load, the config's errors
function preflightItems(report) {
  return [...(report.findings.length ? [] : report.errors).map(m => el("li", { class: "error" }, m)),
    ...report.findings.map(f => el("li", { class: f.level }, `[${f.level}] ${f.message}`))];
}

const stateBadge = state => el("span", { class: "state " + state, "data-state": state }, state);
const fmtTime = t => (t ? new Date(t * 1000).toLocaleString() : "");
function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}
const relative = (path, root) => (root && path.startsWith(root + "/") ? path.slice(root.length + 1) : path);

// a folder browser under the root; onPick(path, isDir) for each click on a file, or on "use this folder"
function picker(start, onPick, { files = true, filter = () => true } = {}) {
  const box = el("div", { class: "picker" });
  async function show(path) {
    const listing = await guarded(() => api("/api/files?path=" + encodeURIComponent(path)));
    if (!listing) return;
    box.replaceChildren();
    if (listing.path !== ".") {
      const up = listing.path.includes("/") ? listing.path.slice(0, listing.path.lastIndexOf("/")) : ".";
      box.append(el("a", { href: "#", class: "dir", onclick: e => { e.preventDefault(); show(up); } }, ".."));
      box.append(el("a", { href: "#", onclick: e => { e.preventDefault(); onPick(listing.path, true); } },
        "✔ use " + listing.path));
    }
    for (const entry of listing.entries) {
      if (!entry.dir && (!files || !filter(entry.name))) continue;
      box.append(el("a", { href: "#", class: entry.dir ? "dir" : "file", "data-path": entry.path, onclick: e => {
        e.preventDefault();
        entry.dir ? show(entry.path) : onPick(entry.path, false);
      } }, entry.name));
    }
  }
  show(start || ".");
  return box;
}

function parseHash() {
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean);
  return { page: parts[0] || "jobs", arg: parts.slice(1).join("/"), params: new URLSearchParams(query || "") };
}

async function render() {
  if (UI.cleanup) { try { UI.cleanup(); } catch (e) { /* a page's leftovers never block the next one */ } }
  UI.cleanup = null;
  flash("");  // a message belongs to the page it was shown on
  const { page, arg, params } = parseHash();
  document.querySelectorAll("header nav a").forEach(a => a.classList.toggle("active", a.dataset.page === page ||
    (a.dataset.page === "jobs" && (page === "run" || page === "results"))));
  const main = document.getElementById("page");
  main.replaceChildren();
  const show = PAGES[page] || PAGES.jobs;
  try { UI.cleanup = (await show(main, arg, params)) || null; } catch (e) { flash(e.message); }
}

async function start() {
  const fromUrl = new URLSearchParams(location.search).get("token");
  UI.token = fromUrl || sessionStorage.getItem("lora-scripts-token") || "";
  if (fromUrl) sessionStorage.setItem("lora-scripts-token", fromUrl);
  document.getElementById("token-form").addEventListener("submit", e => {
    e.preventDefault();
    UI.token = document.getElementById("token-input").value.trim();
    sessionStorage.setItem("lora-scripts-token", UI.token);
    document.getElementById("token-box").hidden = true;
    start();
  });
  try {
    const about = await api("/api/about");
    UI.root = about.root;
    document.getElementById("served").textContent = "serving " + about.root + (about.token ? " · token required" : "");
  } catch (e) { if (e.status !== 401) flash(e.message); return; }
  window.onhashchange = render;
  render();
}
