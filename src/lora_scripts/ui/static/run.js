// Run: one job, live. Training runs stream events.jsonl (server-sent events; a reconnect resumes after the
// last event it saw) into the loss / learning-rate / grad-norm charts, the figures, the samples and the
// warnings; every job shows its log tail. Charts redraw at most once a second, the log every 2 s.
"use strict";

function lineChart(title, series, height = 220) {
  const box = el("div", { class: "chart card", "data-chart": title, "data-points": "0" }, el("h3", {}, title));
  const data = [[], ...series.map(() => [])];
  const opts = {
    width: 400, height, scales: { x: { time: false } }, legend: { live: false },
    series: [{ label: "step" }, ...series.map(s => Object.assign({ width: 1.5, spanGaps: true }, s))],
    axes: [{ label: "optimizer step" }, { size: 60 }],
  };
  let plot = null, dirty = false;
  return {
    box, data,
    add(step, values) {  // one x value; a value per series (null: none at this step)
      // a resumed run goes on from its checkpoint: what the earlier run logged after it is replaced
      const keep = data[0].findIndex(x => x > step);
      if (keep >= 0) data.forEach(s => s.splice(keep));
      let i = data[0].length - 1;
      if (i < 0 || data[0][i] !== step) { data[0].push(step); data.slice(1).forEach(s => s.push(null)); i++; }
      values.forEach((v, k) => { if (v !== null && v !== undefined) data[k + 1][i] = v; });
      dirty = true;
    },
    draw() {
      if (!dirty) return;
      dirty = false;
      box.dataset.points = String(data[0].length);
      if (!plot) { opts.width = Math.max(320, box.clientWidth - 28); plot = new uPlot(opts, data, box); }
      else plot.setData(data);
    },
  };
}

function runFigures() {
  const figs = {};
  const node = el("div", { class: "stats card" });
  for (const [key, label] of [["step", "step"], ["epoch", "epoch"], ["loss", "loss"], ["speed", "throughput"],
    ["eta", "time left"], ["elapsed", "elapsed"]])
    node.append(el("div", {}, el("b", { "data-fig": key }, "–"), el("span", { class: "muted" }, label)));
  node.querySelectorAll("[data-fig]").forEach(b => { figs[b.dataset.fig] = b; });
  return { node, set: (k, v) => { figs[k].textContent = v; } };
}

PAGES.run = async (main, jobId) => {
  let job = await api("/api/jobs/" + jobId);
  const header = el("div", { class: "row" });
  const figures = runFigures();
  const loss = lineChart("loss", [{ label: "train loss", stroke: "#2a62c9" },
    { label: "eval loss", stroke: "#e07b00", points: { show: true, size: 7 } },
    { label: "retention", stroke: "#2f9e44", dash: [6, 4], points: { show: true } }]);
  const lr = lineChart("learning rate", [{ label: "lr", stroke: "#7048e8" }], 160);
  const grad = lineChart("grad norm", [{ label: "grad norm", stroke: "#c2255c" }], 160);
  const notes = el("ul", { class: "events", id: "notes" });
  const samples = el("div", { class: "samples", id: "samples" });
  const replies = el("div", { id: "replies" });
  const summary = el("div", { id: "summary" });
  const log = el("pre", { id: "log" });
  const train = job.kind === "train";
  main.append(el("h1", {}, (train ? "Run " : job.kind + " ") + job.id), header,
    ...(train ? [figures.node, el("div", { class: "charts" }, loss.box, lr.box, grad.box),
      el("h2", {}, "Warnings and notes"), notes, el("h2", {}, "Samples"), samples, replies] : []),
    summary, el("h2", {}, "Log"), log);

  function showHeader() {
    header.replaceChildren(stateBadge(job.state), el("span", { class: "muted mono" },
      train ? relative(job.config, UI.root) : jobTitle(job)), el("span", {}, jobActions(job, refreshJob)),
      train && el("a", { class: "button", href: "#/results/" + job.id }, "Results"),
      el("a", { class: "button", href: "#/jobs" }, "All jobs"));
  }
  async function refreshJob() { job = await api("/api/jobs/" + jobId); showHeader(); }
  showHeader();

  let total = null, epochs = null, firstStep = null, started = null;
  function onEvent(e) {
    if (e.event === "start") { total = e.total_steps; epochs = e.epochs; firstStep = [e.step, e.time]; started = started || e.time; }
    else if (e.event === "step") {
      loss.add(e.step, [e.loss, null, null]); lr.add(e.step, [e.lr]);
      if (e.grad_norm !== null && e.grad_norm !== undefined) grad.add(e.step, [e.grad_norm]);
      figures.set("step", total ? `${e.step} / ${total}` : e.step);
      figures.set("epoch", epochs ? `${e.epoch + 1} / ${epochs}` : e.epoch + 1);
      figures.set("loss", e.loss.toFixed(4));
      const rate = e.tokens_per_s ? `${Math.round(e.tokens_per_s)} tok/s` : e.images_per_s ? `${e.images_per_s.toFixed(2)} img/s` : "–";
      figures.set("speed", rate);
      if (firstStep && total && e.step > firstStep[0]) {
        const perStep = (e.time - firstStep[1]) / (e.step - firstStep[0]);
        figures.set("eta", fmtDuration(perStep * (total - e.step)));
      }
      if (started) figures.set("elapsed", fmtDuration(e.time - started));
    } else if (e.event === "eval") {
      loss.add(e.step, [null, e.eval_loss ?? null, e.retention ?? null]);
    } else if (e.event === "image" && e.path) {
      samples.prepend(el("figure", {}, el("img", { src: imageUrl(e.path), alt: "samples at step " + e.step }),
        el("figcaption", {}, "step " + e.step)));
    } else if (e.event === "sample") {
      replies.prepend(el("div", { class: "card sample" }, el("b", {}, `step ${e.step} · ${e.prompt}`),
        el("div", {}, e.text), e.stopped ? null : el("div", { class: "muted" }, "[max_new_tokens reached]")));
    } else if (e.event === "info" && e.message.startsWith("samples written to")) {
      // the grid itself is shown under Samples
    } else if (["warning", "error", "info", "checkpoint"].includes(e.event)) {
      const text = e.event === "checkpoint" ? `checkpoint at step ${e.step}: ${relative(e.path, UI.root)}` : e.message;
      notes.prepend(el("li", { class: e.event }, `[${e.event}] ${text}`));
    } else if (e.event === "end") {
      summary.replaceChildren(el("h2", {}, "Summary"), el("div", { class: "card" },
        `final loss ${e.final_loss?.toFixed?.(4) ?? e.final_loss} at step ${e.step}` +
        (e.skipped_steps ? `, ${e.skipped_steps} step(s) skipped` : "") + (e.best_eval_loss ? `, best eval loss ${e.best_eval_loss.toFixed(4)}` : "")),
      el("img", { src: imageUrl(job.output_dir + "/loss_curve.png"), alt: "loss curve", id: "loss-curve",
        style: "max-width: 880px; width: 100%" }));
    }
  }

  let stream = null;
  if (train) {
    stream = new EventSource(withToken(`/api/jobs/${jobId}/events`));
    stream.onmessage = m => onEvent(JSON.parse(m.data));
    stream.addEventListener("job", m => { job = JSON.parse(m.data); showHeader(); stream.close(); drawAll(); });
  }
  const drawAll = () => { loss.draw(); lr.draw(); grad.draw(); };
  async function tail() {
    const text = await api(`/api/jobs/${jobId}/log?tail=80`).catch(() => null);
    if (text !== null && text !== log.textContent) { log.textContent = text; log.scrollTop = log.scrollHeight; }
    if (!train && !["finished", "failed", "interrupted"].includes(job.state)) await refreshJob();
  }
  await tail();
  const timers = [setInterval(drawAll, 1000), setInterval(tail, 2000), setInterval(async () => {
    if (train && job.state !== "running" && job.state !== "stopping") await refreshJob().catch(() => null);
  }, 2000)];
  return () => { timers.forEach(clearInterval); if (stream) stream.close(); };
};
