// Jobs: every job the store knows (training and the other commands), refreshed every 2 s. The jobs live on
// disk (ui/jobs.py): this page only shows them, so closing it loses nothing.
"use strict";

function jobTitle(job) {
  if (job.kind === "train") return relative(job.config, UI.root) + (job.resume_of ? "  (resumed)" : "");
  return job.kind + " " + job.command.slice(1).map(a => relative(a, UI.root)).join(" ").slice(0, 90);
}

function jobActions(job, after) {
  const act = (verb) => guarded(async () => {
    const next = await api(`/api/jobs/${job.id}/${verb}`, { method: "POST" });
    if (verb === "resume") location.hash = "#/run/" + next.id; else after();
  });
  return [
    (job.state === "running" || job.state === "queued") &&
      el("button", { class: "danger", "data-action": "stop", onclick: () => act("stop") }, "Stop"),
    job.kind === "train" && (job.state === "interrupted" || job.state === "failed") &&
      el("button", { "data-action": "resume", onclick: () => act("resume") }, "Resume"),
  ];
}

PAGES.jobs = async (main) => {
  const body = el("tbody");
  main.append(el("h1", {}, "Jobs"),
    el("p", { class: "muted" }, "Training runs and other work, one at a time on this machine. They keep running " +
      "when you close this page or restart the UI server."),
    el("div", { class: "row" }, el("a", { class: "button primary", href: "#/config" }, "New training run"),
      el("a", { class: "button", href: "#/dataset" }, "Prepare a dataset")),
    el("table", { id: "jobs" }, el("thead", {}, el("tr", {}, ["job", "what", "state", "started", "took", ""]
      .map(h => el("th", {}, h)))), body));
  async function refresh() {
    const jobs = await api("/api/jobs").catch(e => { flash(e.message); return null; });
    if (!jobs) return;
    body.replaceChildren(...jobs.reverse().map(job => el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: "#/run/" + job.id, class: "mono" }, job.id)),
      el("td", {}, jobTitle(job)),
      el("td", {}, stateBadge(job.state)),
      el("td", {}, fmtTime(job.started)),
      el("td", {}, job.started ? fmtDuration((job.ended || Date.now() / 1000) - job.started) : ""),
      el("td", {}, jobActions(job, refresh), job.kind === "train" && job.state === "finished" &&
        el("a", { class: "button", href: "#/results/" + job.id }, "Results")))));
    if (!jobs.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No jobs yet.")));
  }
  await refresh();
  const timer = setInterval(refresh, 2000);
  return () => clearInterval(timer);
};
