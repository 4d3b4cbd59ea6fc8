// The tagging page: pick or drop an image, POST it to /v1/tag, draw the tags with probability bars.
// Plain JavaScript, nothing loaded from elsewhere (the page works offline).
"use strict";

const state = { file: null, lang: "en", request: 0 };
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function describeModel() {
  try {
    const response = await fetch("/v1/model");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    const m = info.model;
    $("model").textContent = `${m.kind || "model"} ${m.variant || ""} · ${info.num_tags.toLocaleString()} tags · ` +
      `${m.image_size} px · up to ${info.limits.max_images_per_request} images per request`;
    if (!info.languages.includes("zh")) {
      const zh = document.querySelector('#lang [data-lang="zh"]');
      zh.disabled = true;
      zh.title = "this vocabulary has no Chinese names";
    }
  } catch (error) {
    $("model").textContent = `model description unavailable: ${error.message}`;
  }
}

function render(result) {
  const list = $("tags");
  list.replaceChildren();
  result.tags.forEach((tag, i) => {
    const p = result.probabilities[i];
    const item = document.createElement("li");
    item.dataset.probability = String(p);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = tag;
    if (state.lang === "zh") name.lang = "zh";
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = p.toFixed(3);
    item.append(name, bar, value);
    list.append(item);
  });
}

async function tag() {
  if (!state.file) return;
  const id = ++state.request;  // only the latest request's answer is drawn
  const form = new FormData();
  form.append("images", state.file, state.file.name);
  form.append("lang", state.lang);
  const topK = $("top-k").value;
  if (topK) form.append("top_k", topK);
  if ($("own-threshold").checked) form.append("threshold", $("threshold").value);
  setStatus("tagging…");
  const started = performance.now();
  try {
    const response = await fetch("/v1/tag", { method: "POST", body: form });
    const body = await response.json();
    if (id !== state.request) return;
    if (!response.ok) {
      $("tags").replaceChildren();
      setStatus(`${response.status}: ${body.error || response.statusText}`, true);
      return;
    }
    const result = body.results[0];
    render(result);
    const ms = Math.round(performance.now() - started);
    setStatus(result.tags.length ? `${result.tags.length} tags in ${ms} ms` : `no tag above the threshold (${ms} ms)`);
  } catch (error) {
    if (id === state.request) setStatus(`request failed: ${error.message}`, true);
  }
}

function useFile(file) {
  if (!file) return;
  state.file = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").textContent = file.name;
  tag();
}

function setLanguage(lang) {
  state.lang = lang;
  document.querySelectorAll("#lang button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.lang === lang)));
  tag();
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    useFile(e.dataTransfer.files[0]);
  });
  document.querySelectorAll("#lang button").forEach((b) => b.addEventListener("click", () => setLanguage(b.dataset.lang)));
  $("top-k").addEventListener("change", tag);
  $("own-threshold").addEventListener("change", (e) => {
    $("threshold").disabled = !e.target.checked;
    tag();
  });
  $("threshold").addEventListener("input", (e) => { $("threshold-value").textContent = Number(e.target.value).toFixed(2); });
  $("threshold").addEventListener("change", tag);
  describeModel();
}

document.addEventListener("DOMContentLoaded", wire);
