// The try-it page of `captioner serve`: send photos to POST /v1/captions, show each with its
// caption(s), score and the attention heat map the service draws (heatmap=true).
"use strict";

const $ = (selector) => document.querySelector(selector);
// The API key (when the service asks for one) lives in this tab's session storage only.
const KEY_ITEM = "captioner-api-key";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(message, isError) {
  const status = $("#status");
  status.textContent = message;
  status.classList.toggle("error", Boolean(isError));
}

function card(file, record) {
  const article = el("article", "result");
  article.dataset.image = record.image;
  article.append(el("h2", "name", record.image));
  if (record.error) {
    article.classList.add("failed");
    article.append(el("p", "error", `error: ${record.error}`));
    article.dataset.ready = "true";
    return article;
  }
  const line = el("p", "caption", record.caption);
  article.append(line, el("p", "score", `score ${record.score.toFixed(3)} (log-probability of the caption)`));
  if (record.captions.length > 1) {
    const list = el("ol", "nbest");
    record.captions.forEach((c) => list.append(el("li", "", `${c.caption} (${c.score.toFixed(3)})`)));
    article.append(list);
  }
  const img = el("img", record.heatmap ? "heatmap" : "photo");
  img.alt = record.heatmap ? `where the model looked for each word of: ${record.caption}` : record.caption;
  img.onload = () => { article.dataset.ready = "true"; };
  img.onerror = () => {  // the service read it, this browser cannot show it (e.g. TIFF)
    img.replaceWith(el("p", "score", "(this browser cannot display the image)"));
    article.dataset.ready = "true";
  };
  img.src = record.heatmap || URL.createObjectURL(file);  // the heat map is drawn by the service
  article.append(img);
  return article;
}

async function send(files) {
  const body = new FormData();
  files.forEach((file) => body.append("images", file, file.name));
  body.append("beam_size", $("#beam_size").value);
  body.append("n_best", $("#n_best").value);
  const heatmap = $("#heatmap");
  body.append("heatmap", heatmap && heatmap.checked ? "true" : "false");
  const headers = {};
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("/v1/captions", { method: "POST", body, headers });
  if (response.status === 401) throw new Error("this service needs an API key: enter it above");
  let data;
  try {
    data = await response.json();
  } catch (err) {
    throw new Error(`HTTP ${response.status} without a JSON answer`);
  }
  if (!data.results) throw new Error(data.error || `HTTP ${response.status}`);
  const results = $("#results");
  data.results.forEach((record, i) => results.prepend(card(files[i], record)));
  return data.results;
}

async function caption(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  const chunk = Number(document.body.dataset.maxImages) || 16;
  say(`captioning ${files.length} photo(s)…`);
  let done = 0, failed = 0;
  try {
    for (let start = 0; start < files.length; start += chunk) {
      const results = await send(files.slice(start, start + chunk));
      done += results.filter((r) => !r.error).length;
      failed += results.filter((r) => r.error).length;
    }
    say(`${done} captioned${failed ? `, ${failed} failed` : ""}`, failed > 0 && done === 0);
  } catch (err) {
    say(`error: ${err.message}`, true);
  }
}

const drop = $("#drop");
$("#files").addEventListener("change", (event) => {
  caption(event.target.files);
  event.target.value = "";
});
["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  caption(event.dataTransfer.files);
});

const keyField = $("#api_key");
if (keyField) {
  keyField.value = sessionStorage.getItem(KEY_ITEM) || "";
  keyField.addEventListener("change", () => sessionStorage.setItem(KEY_ITEM, keyField.value.trim()));
}
