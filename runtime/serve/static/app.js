// The sdexport web page: a thin client of the A1111 API served by the same app (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";
const POLL_MS = 200;

async function api(path, options) {
  const response = await fetch(API + path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) throw new Error(errorText(response, body));
  return body;
}

// The server answers {"error", "field", "detail"}; FastAPI's own form is {"detail": str | [{loc, msg}]}.
function errorText(response, body) {
  if (!body) return `${response.status} ${response.statusText}`;
  const detail = body.detail ?? body.error;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d.loc ? d.loc.filter((p) => p !== "body").join(".") + ": " : "") + (d.msg ?? JSON.stringify(d)))
      .join("\n");
  }
  const text = typeof detail === "string" ? detail : JSON.stringify(body);
  return `${response.status}: ${body.field ? body.field + ": " : ""}${text}`;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function setProgress(fraction, text) {
  const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
  const bar = $("progress");
  $("progress-fill").style.width = pct + "%";
  bar.setAttribute("aria-valuenow", String(pct));
  bar.dataset.progress = String(pct);
  $("progress-text").textContent = text ?? (pct ? pct + "%" : "");
}

function option(value, label) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label ?? value;
  return el;
}

async function loadChoices() {
  const [samplers, models, options] = await Promise.all([
    api("/samplers"), api("/sd-models"), api("/options").catch(() => ({})),
  ]);
  const sampler = $("sampler");
  sampler.replaceChildren(...samplers.map((s) => option(s.name)));
  if (samplers.some((s) => s.name === "Euler a")) sampler.value = "Euler a";
  const model = $("model");
  model.replaceChildren(...models.map((m) => option(m.title, m.model_name ?? m.title)));
  const current = options.sd_model_checkpoint;
  if (current && models.some((m) => m.title === current)) model.value = current;
}

function request() {
  const int = (id) => parseInt($(id).value, 10);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: int("width"),
    height: int("height"),
    steps: int("steps"),
    cfg_scale: parseFloat($("cfg_scale").value),
    sampler_name: $("sampler").value,
    seed: Number.isFinite(int("seed")) ? int("seed") : -1,
    batch_size: 1,
    n_iter: 1,
  };
  // Per request, as A1111's clients do: the server's current model is left alone for other users.
  if ($("model").value) body.override_settings = { sd_model_checkpoint: $("model").value };
  return body;
}

let polling = null;

async function pollProgress() {
  try {
    const p = await api("/progress?skip_current_image=true");
    const state = p.state ?? {};
    const text = state.sampling_steps ? `step ${state.sampling_step} / ${state.sampling_steps}` : "starting…";
    if (polling) setProgress(p.progress ?? 0, text);
  } catch (_) { /* the next poll retries */ }
}

function showResult(result) {
  const images = $("images");
  images.replaceChildren(...(result.images ?? []).map((b64, i) => {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = `image ${i + 1}`;
    return img;
  }));
  let infotext = "";
  try {
    const info = typeof result.info === "string" ? JSON.parse(result.info) : result.info;
    infotext = (info.infotexts ?? []).join("\n\n");
  } catch (_) {
    infotext = String(result.info ?? "");
  }
  $("infotext").textContent = infotext;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setProgress(0, "queued");
  polling = setInterval(pollProgress, POLL_MS);
  try {
    const result = await api("/txt2img", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request()),
    });
    showResult(result);
    setProgress(1, "done");
  } catch (err) {
    setProgress(0, "");
    showError(err.message);
  } finally {
    clearInterval(polling);
    polling = null;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

async function interrupt() {
  try { await api("/interrupt", { method: "POST" }); } catch (err) { showError(err.message); }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", interrupt);
loadChoices().catch((err) => showError("could not load the server's models and samplers: " + err.message));
