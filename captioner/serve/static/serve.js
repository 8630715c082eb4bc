// The try-it page of `captioner serve`: send photos to POST /v1/captions, show each with its
// caption(s), score and the attention strip (the image, then one heat tile per word).
"use strict";

const TILE = 160;  // tile size of the CLI's strip (captioner/heatmaps.py TILE)
const DARK = 0.6;  // the CLI darkens the least attended cells by 60 % (heatmaps.overlay)

const $ = (selector) => document.querySelector(selector);

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

// The one place that draws a heat map; the same overlay as heatmaps.overlay: the image
// squashed to a square tile, each word's weights min-max scaled, dark where unattended,
// smoothly upscaled from the (h, w) grid. `heat` is null for the plain image.
function drawOverlay(canvas, img, heat) {
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (!heat) return;
  const h = heat.length, w = heat[0].length, cells = heat.flat();
  const lo = Math.min(...cells), span = Math.max(Math.max(...cells) - lo, 1e-8);
  const grid = document.createElement("canvas");
  grid.width = w;
  grid.height = h;
  const gctx = grid.getContext("2d");
  const shade = gctx.createImageData(w, h);
  cells.forEach((value, i) => {  // black, opaque where the word did not look
    shade.data[4 * i + 3] = Math.round(255 * DARK * (1 - (value - lo) / span));
  });
  gctx.putImageData(shade, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(grid, 0, 0, canvas.width, canvas.height);
}

function tile(img, heat, label) {
  const figure = el("figure", heat ? "tile heat" : "tile");
  const canvas = el("canvas");
  canvas.width = canvas.height = TILE;
  drawOverlay(canvas, img, heat);
  figure.append(canvas, el("figcaption", "", label));
  return figure;
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
  const strip = el("div", "strip");
  article.append(strip);
  const img = new Image();
  img.alt = record.caption;
  img.onload = () => {
    strip.append(tile(img, null, "(image)"));
    const att = record.attention;
    if (att) att.words.forEach((word, i) => strip.append(tile(img, att.weights[i], word)));
    article.dataset.ready = "true";
  };
  img.onerror = () => {  // the service read it, this browser cannot show it (e.g. TIFF)
    strip.append(el("p", "score", "(this browser cannot display the image)"));
    article.dataset.ready = "true";
  };
  img.src = URL.createObjectURL(file);
  return article;
}

async function send(files) {
  const body = new FormData();
  files.forEach((file) => body.append("images", file, file.name));
  body.append("beam_size", $("#beam_size").value);
  body.append("n_best", $("#n_best").value);
  const attention = $("#attention");
  body.append("attention", attention && attention.checked ? "true" : "false");
  const response = await fetch("/v1/captions", { method: "POST", body });
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
