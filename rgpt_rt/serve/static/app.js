"use strict";
// The page: pick an image, draw regions on it (boxes, brush masks), pick a task, and read the
// answer as the server streams it (POST /v1/<task> with "stream": true, server-sent events).
// Regions are kept in the image's own pixels; the canvas only shows them, scaled.

const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const VIEW = { width: 640, height: 480, upscale: 4 }; // the largest canvas, and how far a small image grows
const TEXT = {
  describe: null,
  classify: { label: "Vocabulary (optional)", placeholder: "e.g. COCO-80", value: "" },
  refer: { label: "Expression", placeholder: "e.g. the red circle", value: "the red circle" },
  ask: { label: "Question", placeholder: "name regions as <region1>, <region2>, …", value: "What is <region1>?" },
};
const STATS = [ // [key of Session.stats, label, unit]
  ["preprocess_ms", "preprocess", "ms"],
  ["vision_ms", "vision", "ms"],
  ["regions_ms", "mask pooling + connector", "ms"],
  ["prefill_ms", "prefill", "ms"],
  ["ttft_ms", "time to first token", "ms"],
  ["decode_ms", "decode", "ms"],
  ["total_ms", "total (server)", "ms"],
  ["decode_tok_s", "decode speed", "tokens/s"],
  ["new_tokens", "answer", "tokens"],
  ["prefill_tokens", "prefilled", "tokens"],
  ["prefix_tokens", "prefix (cached per image)", "tokens"],
  ["regions", "regions", ""],
  ["vision_backend", "vision backend", ""],
];

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const context = canvas.getContext("2d");
const state = {
  image: null, // HTMLImageElement, decoded
  imageData: "", // the file as a data URL, sent as it is
  regions: [], // {kind: "box", box: [x0, y0, x1, y1]} | {kind: "brush", mask, overlay, anchor, open}
  drag: null, // the box being drawn {x0, y0, x1, y1}, or the brush stroke {last: [x, y]}
  controller: null, // AbortController of the answer in flight
};

// --- the image --------------------------------------------------------------------------------
async function loadFile(file) {
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    showError(`${file.name || "that file"} is not a PNG or JPEG image`);
    return;
  }
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  const image = new Image();
  image.src = data;
  try {
    await image.decode();
  } catch {
    showError("the browser could not decode that image");
    return;
  }
  state.image = image;
  state.imageData = data;
  state.regions = [];
  const scale = Math.min(VIEW.width / image.naturalWidth, VIEW.height / image.naturalHeight, VIEW.upscale);
  canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
  canvas.hidden = false;
  canvas.dataset.imageSize = `${image.naturalWidth}x${image.naturalHeight}`;
  setStatus(`${image.naturalWidth}×${image.naturalHeight} px — drag a box on it, or paint with the brush`);
  render();
}

async function loadExample() {
  const response = await fetch("/static/example.png");
  const blob = await response.blob();
  await loadFile(new File([blob], "example.png", { type: "image/png" }));
}

// --- drawing regions ----------------------------------------------------------------------------
function imagePoint(event) {
  const rect = canvas.getBoundingClientRect();
  const width = state.image.naturalWidth;
  const height = state.image.naturalHeight;
  const x = ((event.clientX - rect.left) / rect.width) * width;
  const y = ((event.clientY - rect.top) / rect.height) * height;
  return [Math.min(Math.max(x, 0), width), Math.min(Math.max(y, 0), height)];
}

function tool() {
  return document.querySelector('input[name="tool"]:checked').value;
}

function openBrushRegion() {
  const last = state.regions[state.regions.length - 1];
  if (last && last.kind === "brush" && last.open) return last;
  const make = (fill) => {
    const layer = document.createElement("canvas");
    layer.width = state.image.naturalWidth;
    layer.height = state.image.naturalHeight;
    const layerContext = layer.getContext("2d");
    if (fill) {
      layerContext.fillStyle = fill;
      layerContext.fillRect(0, 0, layer.width, layer.height);
    }
    return layer;
  };
  const region = { kind: "brush", mask: make("#000"), overlay: make(null), anchor: null, open: true };
  state.regions.push(region);
  return region;
}

function paint(region, from, to) {
  const width = Number($("brush-size").value) * (state.image.naturalWidth / canvas.clientWidth || 1);
  for (const [layer, colour] of [[region.mask, "#fff"], [region.overlay, colourOf(region)]]) {
    const layerContext = layer.getContext("2d");
    layerContext.strokeStyle = colour;
    layerContext.lineWidth = width;
    layerContext.lineCap = "round";
    layerContext.lineJoin = "round";
    layerContext.beginPath();
    layerContext.moveTo(from[0], from[1]);
    layerContext.lineTo(to[0] + 0.01, to[1]); // a zero-length line paints no cap
    layerContext.stroke();
  }
  region.anchor = region.anchor || from;
}

function closeBrushRegion() {
  for (const region of state.regions) region.open = false;
}

canvas.addEventListener("pointerdown", (event) => {
  if (!state.image) return;
  canvas.setPointerCapture(event.pointerId);
  const point = imagePoint(event);
  if (tool() === "box") {
    closeBrushRegion();
    state.drag = { x0: point[0], y0: point[1], x1: point[0], y1: point[1] };
  } else {
    const region = openBrushRegion();
    paint(region, point, point);
    state.drag = { last: point, region };
  }
  render();
});

canvas.addEventListener("pointermove", (event) => {
  if (!state.drag) return;
  const point = imagePoint(event);
  if (state.drag.region) {
    paint(state.drag.region, state.drag.last, point);
    state.drag.last = point;
  } else {
    state.drag.x1 = point[0];
    state.drag.y1 = point[1];
  }
  render();
});

function endDrag() {
  const drag = state.drag;
  state.drag = null;
  if (drag && !drag.region) {
    const width = state.image.naturalWidth;
    const height = state.image.naturalHeight;
    const x0 = Math.max(0, Math.floor(Math.min(drag.x0, drag.x1)));
    const y0 = Math.max(0, Math.floor(Math.min(drag.y0, drag.y1)));
    const x1 = Math.min(width, Math.ceil(Math.max(drag.x0, drag.x1)));
    const y1 = Math.min(height, Math.ceil(Math.max(drag.y0, drag.y1)));
    if (x1 - x0 >= 2 && y1 - y0 >= 2) state.regions.push({ kind: "box", box: [x0, y0, x1, y1] });
  }
  render();
}
canvas.addEventListener("pointerup", endDrag);
canvas.addEventListener("pointercancel", endDrag);

function colourOf(region) {
  return COLORS[state.regions.indexOf(region) % COLORS.length];
}

function render() {
  if (!state.image) return;
  const sx = canvas.width / state.image.naturalWidth;
  const sy = canvas.height / state.image.naturalHeight;
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  context.font = "bold 14px system-ui, sans-serif";
  state.regions.forEach((region, index) => {
    const colour = COLORS[index % COLORS.length];
    let labelAt;
    if (region.kind === "box") {
      const [x0, y0, x1, y1] = region.box;
      context.strokeStyle = colour;
      context.lineWidth = 2;
      context.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
      labelAt = [x0 * sx + 3, y0 * sy + 15];
    } else {
      context.globalAlpha = 0.5;
      context.drawImage(region.overlay, 0, 0, canvas.width, canvas.height);
      context.globalAlpha = 1;
      labelAt = region.anchor ? [region.anchor[0] * sx + 3, region.anchor[1] * sy - 4] : [4, 16];
    }
    context.fillStyle = colour;
    context.fillText(String(index + 1), labelAt[0], labelAt[1]);
  });
  if (state.drag && !state.drag.region) {
    const { x0, y0, x1, y1 } = state.drag;
    context.setLineDash([5, 4]);
    context.strokeStyle = COLORS[state.regions.length % COLORS.length];
    context.lineWidth = 2;
    context.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
    context.setLineDash([]);
  }
  listRegions();
}

function listRegions() {
  const list = $("regions");
  list.replaceChildren(
    ...state.regions.map((region, index) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = COLORS[index % COLORS.length];
      item.append(swatch, region.kind === "box" ? `box [${region.box.join(", ")}]` : "brush mask");
      item.dataset.kind = region.kind;
      if (region.kind === "box") item.dataset.box = JSON.stringify(region.box);
      return item;
    }),
  );
}

function regionJSON(region) {
  if (region.kind === "box") return { box: region.box };
  return { mask: region.mask.toDataURL("image/png") };
}

// --- asking -----------------------------------------------------------------------------------
function showTask() {
  const task = $("task").value;
  const text = TEXT[task];
  $("detailed-row").hidden = task !== "describe";
  $("tokens-row").hidden = task === "classify" || task === "refer";
  $("text-row").hidden = !text;
  if (text) {
    $("text-label").textContent = text.label;
    $("text").placeholder = text.placeholder;
    $("text").value = text.value;
  }
}

function requestBody(task) {
  const body = { image: state.imageData, regions: state.regions.map(regionJSON) };
  const text = $("text").value.trim();
  const maxTokens = Number($("max-tokens").value) || 64;
  if (task === "describe") Object.assign(body, { detailed: $("detailed").checked, max_new_tokens: maxTokens });
  if (task === "classify" && text) body.vocabulary = text;
  if (task === "refer") body.expression = text;
  if (task === "ask") Object.assign(body, { question: text, max_new_tokens: maxTokens });
  // Several regions are described in one batched decode, which answers all at once.
  body.stream = !(task === "describe" && state.regions.length > 1);
  return body;
}

async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function run() {
  if (state.controller) return; // an answer is already coming
  if (!state.image) return showError("pick an image first");
  if (!state.regions.length) return showError("draw a region first: drag a box, or paint with the brush");
  const task = $("task").value;
  const body = requestBody(task);
  const answer = $("answer");
  answer.textContent = "";
  answer.className = "answer";
  answer.dataset.state = "running";
  answer.dataset.deltas = "0";
  $("stats").hidden = true;
  setStatus("waiting for the first words…");
  state.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let firstAt = null;
  try {
    const response = await fetch(`/v1/${task}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error(error?.error?.message || `the server answered ${response.status}`);
    }
    if (!body.stream) {
      finish(task, await response.json(), started, null);
      return;
    }
    for await (const { event, data } of serverEvents(response)) {
      if (event === "delta") {
        firstAt = firstAt ?? performance.now();
        answer.textContent += data.text;
        answer.dataset.deltas = String(Number(answer.dataset.deltas) + 1);
        setStatus("streaming…");
      } else if (event === "done") {
        finish(task, data, started, firstAt);
      } else if (event === "error") {
        throw new Error(data.error.message);
      }
    }
    if (answer.dataset.state === "running") throw new Error("the stream ended without an answer");
  } catch (error) {
    if (error.name === "AbortError") {
      answer.dataset.state = "stopped";
      setStatus("stopped");
    } else {
      showError(error.message);
    }
  } finally {
    state.controller = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

function finish(task, result, started, firstAt) {
  const answer = $("answer");
  if (task === "describe" && result.answers.length > 1) {
    answer.textContent = result.answers.map((text, index) => `${index + 1}. ${text}`).join("\n");
  } else {
    answer.textContent = result.answer;
  }
  answer.dataset.state = "done";
  const rows = STATS.filter(([key]) => key in result.stats).map(([key, label, unit]) => {
    let value = result.stats[key];
    if (typeof value === "number" && !Number.isInteger(value)) value = value.toFixed(1);
    if (key === "vision_ms" && result.stats.vision_cached) value += " (cached)";
    return [label, value, unit];
  });
  if (firstAt !== null) rows.push(["first words, in this browser", (firstAt - started).toFixed(1), "ms"]);
  rows.push(["total, in this browser", (performance.now() - started).toFixed(1), "ms"]);
  $("stats").tBodies[0].replaceChildren(
    ...rows.map(([label, value, unit]) => {
      const row = document.createElement("tr");
      row.dataset.key = label;
      for (const text of [label, `${value}${unit ? ` ${unit}` : ""}`]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    }),
  );
  $("stats").hidden = false;
  setStatus(task === "refer" && result.region !== null ? `region ${result.region + 1} fits` : "done");
}

function showError(message) {
  const answer = $("answer");
  answer.textContent = message;
  answer.className = "answer error";
  answer.dataset.state = "error";
  setStatus("");
}

function setStatus(text) {
  $("status").textContent = text;
}

// --- wiring -----------------------------------------------------------------------------------
$("file").addEventListener("change", (event) => event.target.files[0] && loadFile(event.target.files[0]));
$("example").addEventListener("click", loadExample);
for (const target of [$("drop"), canvas]) {
  target.addEventListener("dragover", (event) => {
    event.preventDefault();
    $("drop").classList.add("over");
  });
  target.addEventListener("dragleave", () => $("drop").classList.remove("over"));
  target.addEventListener("drop", (event) => {
    event.preventDefault();
    $("drop").classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) loadFile(file);
  });
}
$("new-region").addEventListener("click", () => {
  closeBrushRegion();
  render();
});
$("undo").addEventListener("click", () => {
  state.regions.pop();
  render();
});
$("clear").addEventListener("click", () => {
  state.regions = [];
  render();
});
$("task").addEventListener("change", showTask);
$("run").addEventListener("click", run);
$("stop").addEventListener("click", () => state.controller?.abort());
$("text").addEventListener("keydown", (event) => event.key === "Enter" && run());
showTask();

fetch("/v1/info")
  .then((response) => response.json())
  .then((info) => {
    const s = info.session;
    $("model-info").textContent =
      `${s.model} · ${s.device} · vision: ${s.vision_backend} · LLM: ${s.llm.quantization} ${s.llm.dtype}`;
  })
  .catch(() => {
    $("model-info").textContent = "the server did not answer /v1/info";
  });
