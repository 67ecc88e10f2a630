// lora-booth studio: the live parts of the pages. Text from the server is set with textContent
// only, never as HTML; every request that changes something sends the X-Lora-Booth header.
"use strict";

async function api(method, url, body, isForm) {
  const headers = {"X-Lora-Booth": "1"};
  if (body !== undefined && !isForm) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : (isForm ? body : JSON.stringify(body))});
  let data = null;
  try { data = await response.json(); } catch (error) { data = {detail: response.statusText}; }
  if (!response.ok) throw Object.assign(new Error(data.detail || response.statusText), {data});
  return data;
}

function element(tag, attributes, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const page = document.body.dataset.page;

// -------------------------------------------------------------------------------------- runs
if (page === "runs") {
  for (const button of document.querySelectorAll("button.sooner")) {
    button.addEventListener("click", async () => {
      await api("POST", "/api/runs/" + button.dataset.run + "/move", {before: Number(button.dataset.before)});
      window.location.reload();
    });
  }
  const compare = document.getElementById("compare");
  if (compare) compare.addEventListener("click", async () => {
    const runs = [...document.querySelectorAll("input.pick:checked")].map((box) => Number(box.value));
    try {
      window.location.href = (await api("POST", "/api/compare", {runs})).url;
    } catch (error) {
      document.getElementById("compare-message").textContent = error.message;
    }
  });
}

// ---------------------------------------------------------------------------------- datasets
if (page === "datasets") {
  document.getElementById("new-dataset").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("dataset-name").value.trim();
    try {
      await api("POST", "/api/datasets", {name});
      window.location.href = "/datasets/" + encodeURIComponent(name);
    } catch (error) {
      document.getElementById("dataset-message").textContent = error.message;
    }
  });
}

function photoCard(dataset, photo) {
  const figure = element("figure", {"class": "photo", "data-photo": photo.name});
  figure.appendChild(element("img", {alt: photo.name, src: "/api/datasets/" + encodeURIComponent(dataset) +
    "/thumbnails/" + encodeURIComponent(photo.name) + "?t=" + Date.now()}));
  const caption = element("figcaption", {}, photo.name + " ");
  if (photo.mask) caption.appendChild(element("span", {"class": "badge"}, "mask"));
  figure.appendChild(caption);
  const text = element("textarea", {"class": "caption", rows: "2", placeholder: "caption (empty: the instance prompt)"});
  text.value = photo.caption;
  figure.appendChild(text);
  return figure;
}

function watchCaptions(dataset) {
  document.getElementById("photos").addEventListener("change", async (event) => {
    if (!event.target.classList.contains("caption")) return;
    const photo = event.target.closest("figure").dataset.photo;
    event.target.classList.remove("saved", "unsaved");
    try {
      await api("PUT", "/api/datasets/" + encodeURIComponent(dataset) + "/captions/" + encodeURIComponent(photo),
                {caption: event.target.value});
      event.target.classList.add("saved");
    } catch (error) {
      event.target.classList.add("unsaved");
      event.target.title = error.message;
    }
  });
}

async function upload(dataset, files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const result = document.getElementById("upload-result");
  result.replaceChildren(element("li", {"class": "busy"}, "uploading " + files.length + " files…"));
  try {
    const answer = await api("POST", "/api/datasets/" + encodeURIComponent(dataset) + "/files", form, true);
    result.replaceChildren(element("li", {"class": "ok"}, answer.stored.length + " stored"),
      ...answer.refused.map((r) => element("li", {}, r.reason)));
  } catch (error) {
    result.replaceChildren(element("li", {}, error.message));
  }
  const listing = await api("GET", "/api/datasets/" + encodeURIComponent(dataset));
  document.getElementById("photos").replaceChildren(...listing.photos.map((p) => photoCard(dataset, p)));
}

if (page === "dataset") {
  const dataset = document.body.dataset.dataset;
  const drop = document.getElementById("drop");
  for (const kind of ["dragenter", "dragover"]) drop.addEventListener(kind, (event) => {
    event.preventDefault(); drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault(); drop.classList.remove("over");
    upload(dataset, Array.from(event.dataTransfer.files));
  });
  document.getElementById("file-input").addEventListener("change", (event) => {
    upload(dataset, Array.from(event.target.files));
  });
  watchCaptions(dataset);
}

// ----------------------------------------------------------------------------------- new run
function runKeys(form) {
  const keys = {};
  for (const name of ["instance_dir", "model", "instance_prompt", "class_prompt", "preset", "max_steps"]) {
    const value = form.elements[name].value.trim();
    if (value !== "") keys[name] = name === "max_steps" ? Number(value) : value;
  }
  return keys;
}

if (page === "new-run") {
  const form = document.getElementById("new-run");
  const problems = document.getElementById("problems");
  const command = document.getElementById("command");
  let timer = null, latest = 0;
  async function check() {
    const asked = ++latest;
    let answer;
    try {
      answer = await api("POST", "/api/validate", {keys: runKeys(form), yaml: form.elements.yaml.value});
    } catch (error) {
      answer = {ok: false, problems: [error.message]};
    }
    if (asked !== latest) return null;  // a newer check is on its way
    problems.replaceChildren(...(answer.problems || []).map((p) => element("li", {}, p)));
    command.textContent = answer.ok ? answer.command : "";
    document.getElementById("trigger").replaceChildren(...(answer.trigger || []).map((line) =>
      element("li", {"class": line.startsWith("warning") ? "warning" : ""}, line)));
    form.classList.toggle("invalid", !answer.ok);
    return answer;
  }
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 300); });
  document.getElementById("plan").addEventListener("click", async () => {
    const out = document.getElementById("plan-text");
    out.textContent = "planning (a few seconds)…";
    const answer = await check();
    if (!answer || !answer.ok) { out.textContent = ""; return; }
    try {
      out.textContent = (await api("POST", "/api/plan", answer.keys)).text;
    } catch (error) {
      out.textContent = error.message;
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const answer = await check();
    if (!answer || !answer.ok) return;
    try {
      const run = await api("POST", "/api/runs", answer.keys);
      window.location.href = "/runs/" + run.id;
    } catch (error) {
      problems.replaceChildren(...((error.data && error.data.problems) || [error.message]).map((p) => element("li", {}, p)));
    }
  });
  check();
}

// --------------------------------------------------------------------------------------- run
function drawChart(svg, series) {
  // every curve on one scale: the training loss and, with validate.every, the validation loss
  const curves = series.map(([points, name]) => [points.filter((p) => typeof p[1] === "number" && isFinite(p[1])), name]);
  const all = curves.flatMap(([points]) => points);
  svg.replaceChildren();
  if (all.length < 2) return;
  const steps = all.map((p) => p[0]), values = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)], [y0, y1] = [Math.min(...values), Math.max(...values)];
  const x = (s) => 10 + 580 * (s - x0) / Math.max(1, x1 - x0), y = (v) => 150 - 140 * (v - y0) / Math.max(1e-12, y1 - y0);
  for (const [points, name] of curves) {
    if (points.length < 2) continue;
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" "));
    line.setAttribute("class", name);
    svg.appendChild(line);
  }
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  return "ETA " + (s >= 60 ? Math.floor(s / 60) + " min " : "") + (s % 60) + " s";
}

if (page === "run") {
  const id = document.body.dataset.run;
  const base = "/api/runs/" + id;
  const shown = new Set();
  let source = null;
  function show(state) {
    const status = document.getElementById("status");
    status.textContent = state.status;
    status.className = "status " + state.status;
    document.body.dataset.status = state.status;
    const bar = document.getElementById("bar");
    bar.max = state.max_steps; bar.value = state.step;
    document.getElementById("step").textContent = state.step + " / " + state.max_steps;
    document.getElementById("eta").textContent = state.status === "running" ? duration(state.eta_s) : "";
    document.getElementById("loss").textContent = typeof state.loss === "number" ? "loss " + state.loss.toFixed(4) : "";
    document.getElementById("error").textContent = state.error || "";
    document.getElementById("log").textContent = state.log.join("\n");
    document.getElementById("stop").hidden = !["queued", "running"].includes(state.status);
    document.getElementById("resume").hidden = !["stopped", "failed"].includes(state.status);
    for (const id of ["save-now", "sample-now"]) document.getElementById(id).hidden = state.status !== "running";
    drawChart(document.getElementById("chart"), [[state.losses, "loss"], [state.validation, "validation"]]);
    const samples = document.getElementById("samples");
    for (const name of state.samples) {
      if (shown.has(name)) continue;
      shown.add(name);
      const figure = element("figure", {"class": "grid"});
      figure.appendChild(element("img", {alt: name, src: base + "/files/samples/" + encodeURIComponent(name)}));
      figure.appendChild(element("figcaption", {}, name === "base.png" ? "base model" : name.replace(".png", "")));
      samples.appendChild(figure);
    }
    const choice = document.getElementById("generate-checkpoint");
    const known = new Set([...choice.options].map((option) => option.value));
    for (const name of state.files) {
      const match = /^checkpoints\/(step-\d{8})\//.exec(name);
      if (match && !known.has(match[1])) { known.add(match[1]); choice.appendChild(element("option", {value: match[1]}, match[1])); }
    }
    const files = document.getElementById("files");
    files.replaceChildren(...state.files.map((name) => {
      const item = element("li");
      const link = element("a", {href: base + "/files/" + name.split("/").map(encodeURIComponent).join("/")}, name);
      if (name.endsWith(".safetensors")) link.setAttribute("download", name.split("/").pop());
      else link.setAttribute("target", "_blank");
      item.appendChild(link);
      return item;
    }));
  }
  function listen() {
    if (source) source.close();
    source = new EventSource(base + "/events");
    source.onmessage = (event) => {
      const state = JSON.parse(event.data);
      show(state);
      if (["done", "failed", "stopped"].includes(state.status)) source.close();
    };
  }
  document.getElementById("stop").addEventListener("click", () => api("POST", base + "/stop"));
  document.getElementById("save-now").addEventListener("click", () => api("POST", base + "/save-now"));
  document.getElementById("generate").addEventListener("submit", async (event) => {
    event.preventDefault();
    const said = document.getElementById("generate-state");
    said.textContent = "drawing…";
    try {
      const answer = await api("POST", base + "/generate", {
        checkpoint: document.getElementById("generate-checkpoint").value,
        prompt: document.getElementById("generate-prompt").value,
        n: Number(document.getElementById("generate-n").value), seed: Number(document.getElementById("generate-seed").value)});
      const shown = document.getElementById("generated");
      for (const name of answer.images) {
        const figure = element("figure", {"class": "grid"});
        figure.appendChild(element("img", {alt: name, src: base + "/generated/" + name.split("/").map(encodeURIComponent).join("/")}));
        figure.appendChild(element("figcaption", {}, name));
        shown.prepend(figure);
      }
      said.textContent = "";
    } catch (error) { said.textContent = error.message; }
  });
  document.getElementById("sample-now").addEventListener("click", () => api("POST", base + "/sample-now"));
  document.getElementById("resume").addEventListener("click", async () => { await api("POST", base + "/resume"); listen(); });
  api("GET", base).then(show);
  listen();
}
