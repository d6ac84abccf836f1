// Huahua web chat: posts messages, follows jobs over server-sent events, renders results and history.
// All user-supplied text is set with textContent, never parsed as HTML.
"use strict";

const FINAL = new Set(["done", "failed", "cancelled"]);
const EVENTS = ["queued", "position", "started", "progress", "done", "failed", "cancelled"];
const HEALTH_EVERY_MS = 30000;

const $ = (id) => document.getElementById(id);
const list = $("messages");
const chatBox = $("chat");
const textBox = $("text");
const welcome = $("welcome");
const cards = new Map();
const streams = new Map();
let me = { user: null, admin: false };

function remembered(key) {
  try { return localStorage.getItem(key) || ""; } catch (_) { return ""; }
}

function remember(key, value) {
  try { localStorage.setItem(key, value); } catch (_) { /* private mode */ }
}

function room() {
  return chatBox.value.trim();
}

function scrollDown() {
  list.scrollTop = list.scrollHeight;
}

function addMessage(text, kind) {
  welcome.hidden = true;
  const div = document.createElement("div");
  div.className = `msg ${kind}`;
  div.textContent = text;
  list.append(div);
  scrollDown();
  return div;
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

async function act(job, action, index) {
  try {
    const result = await api(`/api/jobs/${encodeURIComponent(job.id)}/actions`, { action, index });
    if (action === "cancel") {
      renderJob(result);
    } else if (action === "choose") {
      addMessage(t("chosen", index + 1, job.panels[index]), "bot");
    } else {
      follow(result);
    }
  } catch (err) {
    addMessage(err.message, "error");
  }
}

function renderActions(card, job) {
  const actions = card.querySelector(".actions");
  actions.replaceChildren();
  if (job.status === "queued" || job.status === "running") {
    if (job.mine || me.admin) {
      const cancel = button(t("cancel"), t("cancelTitle"), () => act(job, "cancel", 0));
      cancel.className = "cancel";
      actions.append(cancel);
    }
    return;
  }
  if (job.status !== "done" && job.status !== "failed") return;
  const reroll = button(t("rerollButton"), t("rerollTitle"), () => act(job, "reroll", 0));
  reroll.className = "reroll";
  actions.append(reroll);
  if (job.status !== "done") return;
  job.images.forEach((_, i) => {
    const v = button(`V${i + 1}`, `${t("variationTitle")} ${i + 1}`, () => act(job, "variation", i));
    v.className = "variation";
    actions.append(v);
  });
  job.images.forEach((_, i) => {
    const u = button(`U${i + 1}`, `${t("upscaleTitle")} ${i + 1}`, () => act(job, "upscale", i));
    u.className = "upscale";
    actions.append(u);
  });
  if (job.meta && job.meta.story_id) renderStoryActions(actions, job);
}

function renderStoryActions(actions, job) {
  job.images.forEach((_, i) => {
    const star = button(`⭐${job.images.length > 1 ? i + 1 : ""}`, t("chooseTitle"), () => act(job, "choose", i));
    star.className = "choose";
    actions.append(star);
  });
  const link = document.createElement("a");
  link.className = "story-link";
  link.href = `/stories/${encodeURIComponent(job.meta.story_id)}`;
  link.target = "_blank";
  link.rel = "noopener";
  link.textContent = t("storybook");
  actions.append(link);
}

function addAttachments(attachments) {
  if (!attachments || attachments.length === 0) return;
  const div = document.createElement("div");
  div.className = "msg bot attachments";
  for (const item of attachments) {
    if (!item.url) {
      const missing = document.createElement("span");
      missing.textContent = `📎 ${item.name} (${t("tooLarge")})`;
      div.append(missing);
      continue;
    }
    const link = document.createElement("a");
    link.href = item.url;
    link.target = "_blank";
    link.rel = "noopener";
    link.className = "attachment";
    if (/\.png$/i.test(item.name)) {
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = item.name;
      img.loading = "lazy";
      link.append(img);
    } else {
      link.textContent = `📎 ${item.name}`;
    }
    div.append(link);
  }
  list.append(div);
  scrollDown();
}

function cardFor(job) {
  let card = cards.get(job.id);
  if (!card) {
    welcome.hidden = true;
    card = $("job-template").content.firstElementChild.cloneNode(true);
    card.dataset.jobId = job.id;
    cards.set(job.id, card);
    list.append(card);
  }
  return card;
}

function kindLabel(job) {
  const kind = t(job.kind);
  if (job.panels && job.panels.length > 1 && job.panels[0] !== job.panels[1]) {
    return `📖 ${t("panelRange", job.panels[0], job.panels[job.panels.length - 1])} · ${kind}`;
  }
  if (job.panels) return `📖 ${t("panel", job.panels[0])} · ${kind}`;
  return kind;
}

function statusLabel(job) {
  if (job.status === "failed" && job.error) return `⚠️ ${job.error}`;
  let status = t(job.status);
  if (job.status === "queued" && job.position) status += ` — ${t("position")} ${job.position}`;
  if (job.status === "running") status += ` ${Math.round(job.progress * 100)}%`;
  return status;
}

function renderJob(job) {
  const card = cardFor(job);
  const before = card.dataset.status;
  card.dataset.status = job.status;
  card.classList.toggle("finished", FINAL.has(job.status));
  card.querySelector(".kind").textContent = kindLabel(job);
  card.querySelector(".status").textContent = statusLabel(job);
  const percent = Math.round(job.progress * 100);
  const bar = card.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(percent));
  bar.querySelector(".fill").style.width = `${percent}%`;
  // panels drawn together: each panel's prompt on its own line
  card.querySelector(".prompt").textContent =
    job.prompts.length > 1 ? job.prompts.map((p, i) => `${i + 1}. ${p}`).join("\n") : job.prompt_zh;
  card.querySelector(".caption").textContent = job.details;
  const images = card.querySelector(".images");
  if (images.childElementCount !== job.images.length) {
    images.replaceChildren(...job.images.map((url, i) => {
      const img = document.createElement("img");
      img.src = url;
      img.alt = `${job.prompt_zh} (${i + 1})`;
      img.width = job.params.width;
      img.height = job.params.height;
      img.loading = "lazy";
      return img;
    }));
  }
  if (before !== job.status) renderActions(card, job);
  scrollDown();
}

function follow(job) {
  renderJob(job);
  if (FINAL.has(job.status) || streams.has(job.id)) return;
  const source = new EventSource(`/api/jobs/${encodeURIComponent(job.id)}/events`);
  streams.set(job.id, source);
  const close = () => { source.close(); streams.delete(job.id); };
  for (const type of EVENTS) {
    source.addEventListener(type, (event) => {
      renderJob(JSON.parse(event.data));
      if (FINAL.has(type)) close();
    });
  }
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) { streams.delete(job.id); return; }
    // the browser reconnects by itself; make sure a finished job is not left spinning
    api(`/api/jobs/${encodeURIComponent(job.id)}`).then((latest) => {
      renderJob(latest);
      if (FINAL.has(latest.status)) close();
    }).catch(close);
  };
}

// The chat's recent jobs, oldest first: what was asked (the asker's words) and the result card.
async function loadHistory() {
  for (const source of streams.values()) source.close();
  streams.clear();
  cards.clear();
  list.replaceChildren(welcome);
  let jobs = [];
  try {
    jobs = (await api(`/api/history?chat=${encodeURIComponent(room())}`)).jobs;
  } catch (err) {
    if (err.status === 401) { showLogin(); return; }
    addMessage(err.message, "error");
    return;
  }
  welcome.hidden = jobs.length > 0;
  for (const job of jobs) {
    if (job.text && !job.parent_id) addMessage(job.text, job.mine ? "mine" : "other");
    follow(job);
  }
}

async function send(text) {
  if (!text.trim()) return;
  addMessage(text, "mine");
  textBox.value = "";
  try {
    const data = await api("/api/messages", { chat: room(), text });
    const jobs = data.jobs || [];
    // a reply per job only announces it: the job's card shows its state and prompt instead
    const announcements = jobs.length > 0 && data.replies.length === jobs.length;
    if (!announcements) for (const reply of data.replies) addMessage(reply, "bot");
    addAttachments(data.attachments);
    for (const job of jobs) follow(job);
  } catch (err) {
    if (err.status === 401) showLogin();
    addMessage(err.message, "error");
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send(textBox.value);
});

chatBox.value = remembered("huahua.room");
chatBox.addEventListener("change", () => {
  remember("huahua.room", room());
  loadHistory();
});
$("who").addEventListener("submit", (event) => { event.preventDefault(); chatBox.blur(); });

$("example").textContent = t("example");
$("example").addEventListener("click", () => send(t("example")));

function showLogin() {
  $("login").hidden = false;
  $("composer").hidden = true;
  $("token").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await api("/api/login", { token: $("token").value });
    $("login").hidden = true;
    $("composer").hidden = false;
    $("token").value = "";
    start();
  } catch (err) {
    $("login-error").hidden = false;
    $("login-error").textContent = err.message;
  }
});

async function checkHealth() {
  const badge = $("engine");
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    const health = await response.json();
    if (health.ok) {
      badge.textContent = health.label ? `${health.engine} · ${health.label}` : health.engine;
      badge.dataset.state = "ok";
      badge.title = t("engineTitle");
    } else {
      badge.textContent = t("engineDown");
      badge.dataset.state = "down";
      badge.title = (health.error && health.error.message) || t("engineDown");
    }
  } catch (_) {
    badge.textContent = t("engineUnreachable");
    badge.dataset.state = "down";
  }
}

async function start() {
  try {
    me = await api("/api/me");
  } catch (err) {
    if (err.status === 401) { showLogin(); return; }
  }
  if (me.user) {
    $("me").textContent = `${t("you")}: ${me.user}${me.admin ? ` · ${t("admin")}` : ""}`;
  }
  await loadHistory();
}

checkHealth();
setInterval(checkHealth, HEALTH_EVERY_MS);
start();
