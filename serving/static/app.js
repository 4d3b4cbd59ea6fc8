// The tagging page: pick or drop an image, POST it to /v1/tag, draw the tags with probability bars.
// Your own tags (open-set) go with the request as its `tags` field, classes as a second request's
// `classify` field: both need the bundle's text encoder, and neither needs the token that guards
// stored vocabularies. Plain JavaScript, nothing loaded from elsewhere (the page works offline).
"use strict";

const state = { file: null, lang: "en", request: 0, languages: ["en"], openSet: false, captioning: false,
                customTags: [], classes: [] };
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false, element = $("status")) {
  element.textContent = text;
  element.classList.toggle("error", isError);
}

async function describeModel() {
  try {
    const response = await fetch("/v1/model");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    const m = info.model;
    state.languages = info.languages;
    state.openSet = Boolean(info.open_set && info.open_set.text_encoder);
    state.captioning = Boolean(info.captioning);
    $("model").textContent = `${m.kind || "model"} ${m.variant || ""} · ${info.num_tags.toLocaleString()} tags · ` +
      `${m.image_size} px · up to ${info.limits.max_images_per_request} images per request` +
      (state.openSet ? " · open-set tags and classification" : "");
    if (!state.openSet) {
      ["custom-tags", "classes"].forEach((id) => { $(id).disabled = true; });
      document.querySelector("#open-set button").disabled = true;
      const note = $("open-set-note");
      note.textContent = "This bundle has no text encoder: your own tags and classification need one " +
        "(ram-export --text-encoder, see docs/openset.md).";
      note.hidden = false;
    }
    updateLanguages();
  } catch (error) {
    $("model").textContent = `model description unavailable: ${error.message}`;
  }
}

// Chinese names come with the model's vocabulary; your own tags show their own names in either language.
function updateLanguages() {
  const zh = document.querySelector('#lang [data-lang="zh"]');
  const available = state.languages.includes("zh") || state.customTags.length > 0;
  zh.disabled = !available;
  zh.title = available ? "" : "this vocabulary has no Chinese names";
  if (!available && state.lang === "zh") setLanguage("en", false);
}

function renderList(list, names, probabilities) {
  list.replaceChildren();
  names.forEach((label, i) => {
    const p = probabilities[i];
    const item = document.createElement("li");
    item.dataset.probability = String(p);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
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

// Where the bundle captions (GET /v1/model "captioning": true) the tag request asks for a caption too.
function showCaption(result) {
  $("caption-box").hidden = !state.captioning;
  $("caption").textContent = state.captioning ? (result && result.caption) || "" : "";
}

function imageForm() {
  const form = new FormData();
  form.append("images", state.file, state.file.name);
  return form;
}

async function post(form) {
  const response = await fetch("/v1/tag", { method: "POST", body: form });
  return { response, body: await response.json() };
}

async function tag() {
  if (!state.file) return;
  const id = ++state.request;  // only the latest request's answers are drawn
  const form = imageForm();
  form.append("lang", state.lang);
  const topK = $("top-k").value;
  if (topK) form.append("top_k", topK);
  if ($("own-threshold").checked) form.append("threshold", $("threshold").value);
  const custom = state.customTags.length > 0;
  if (custom) form.append("tags", state.customTags.join(","));
  if (state.captioning) form.append("caption", "true");
  $("scope").textContent = custom ? `against your ${state.customTags.length} tags` : "";
  setStatus("tagging…");
  classify(id);
  const started = performance.now();
  try {
    const { response, body } = await post(form);
    if (id !== state.request) return;
    if (!response.ok) {
      $("tags").replaceChildren();
      showCaption(null);
      setStatus(`${response.status}: ${body.error || response.statusText}`, true);
      return;
    }
    const result = body.results[0];
    renderList($("tags"), result.tags, result.probabilities);
    showCaption(result);
    const ms = Math.round(performance.now() - started);
    setStatus(result.tags.length ? `${result.tags.length} tags in ${ms} ms` : `no tag above the threshold (${ms} ms)`);
  } catch (error) {
    if (id === state.request) setStatus(`request failed: ${error.message}`, true);
  }
}

async function classify(id) {
  const box = $("classes-box");
  box.hidden = state.classes.length === 0;
  $("class-list").replaceChildren();
  if (box.hidden) return;
  const status = $("classes-status");
  const form = imageForm();
  form.append("classify", state.classes.join(","));
  setStatus("classifying…", false, status);
  try {
    const { response, body } = await post(form);
    if (id !== state.request) return;
    if (!response.ok) {
      setStatus(`${response.status}: ${body.error || response.statusText}`, true, status);
      return;
    }
    const result = body.results[0];
    renderList($("class-list"), result.classes, result.probabilities);
    setStatus(`most likely: ${result.classes[0]}`, false, status);
  } catch (error) {
    if (id === state.request) setStatus(`request failed: ${error.message}`, true, status);
  }
}

const parseList = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

function applyOpenSet() {
  const customTags = parseList($("custom-tags").value);
  const classes = parseList($("classes").value);
  if (customTags.join(",") === state.customTags.join(",") && classes.join(",") === state.classes.join(",")) return;
  state.customTags = customTags;
  state.classes = classes;
  updateLanguages();
  tag();
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

function setLanguage(lang, retag = true) {
  state.lang = lang;
  document.querySelectorAll("#lang button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.lang === lang)));
  if (retag) tag();
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
  $("open-set").addEventListener("submit", (e) => {
    e.preventDefault();
    applyOpenSet();
  });
  ["custom-tags", "classes"].forEach((id) => $(id).addEventListener("change", applyOpenSet));
  describeModel();
}

document.addEventListener("DOMContentLoaded", wire);
