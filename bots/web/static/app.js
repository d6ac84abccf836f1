// Huahua web chat: posts messages, follows jobs over server-sent events, renders results.
// All user-supplied text is set with textContent, never parsed as HTML.
"use strict";

const FINAL = new Set(["done", "failed", "cancelled"]);
const EVENTS = ["queued", "position", "started", "progress", "done", "failed", "cancelled"];
const STATUS_TEXT = {
  queued: "⏳ Queued",
  running: "🎨 Drawing…",
  done: "✅ Done",
  failed: "⚠️ Failed",
  cancelled: "❌ Cancelled",
};

const $ = (id) => document.getElementById(id);
const list = $("messages");
const userBox = $("user");
const chatBox = $("chat");
const textBox = $("text");
const cards = new Map();

function randomName() {
  const words = ["panda", "crane", "koi", "tiger", "lotus", "bamboo", "cloud", "plum"];
  const word = words[Math.floor(Math.random() * words.length)];
  return `${word}-${Math.floor(Math.random() * 9000 + 1000)}`;
}

function remembered(key, fallback) {
  let value = null;
  try { value = localStorage.getItem(key); } catch (_) { /* private mode */ }
  if (!value) {
    value = fallback();
    try { localStorage.setItem(key, value); } catch (_) { /* private mode */ }
  }
  return value;
}

userBox.value = remembered("huahua.user", randomName);
chatBox.value = remembered("huahua.chat", () => "main");
for (const [box, key] of [[userBox, "huahua.user"], [chatBox, "huahua.chat"]]) {
  box.addEventListener("change", () => {
    const value = box.value.trim();
    if (value) { try { localStorage.setItem(key, value); } catch (_) { /* ignore */ } }
  });
}

function scrollDown() {
  list.scrollTop = list.scrollHeight;
}

function addMessage(text, kind, who) {
  const div = document.createElement("div");
  div.className = `msg ${kind}`;
  if (who) {
    const name = document.createElement("span");
    name.className = "who";
    name.textContent = who;
    div.append(name);
  }
  div.append(document.createTextNode(text));
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
    const result = await api(`/api/jobs/${encodeURIComponent(job.id)}/actions`, {
      action, index, user: userBox.value.trim(),
    });
    if (action === "cancel") {
      renderJob(result);
    } else if (action === "choose") {
      addMessage(`⭐ Picture ${index + 1} is now panel ${job.meta.story_scene} of the story.`, "bot");
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
    const cancel = button("❌ Cancel", "Cancel this job", () => act(job, "cancel", 0));
    cancel.className = "cancel";
    actions.append(cancel);
    return;
  }
  if (job.status !== "done" && job.status !== "failed") return;
  const reroll = button("🔄 Reroll", "Reroll: same prompt, new seed", () => act(job, "reroll", 0));
  reroll.className = "reroll";
  actions.append(reroll);
  if (job.status !== "done") return;
  job.images.forEach((_, i) => {
    const v = button(`V${i + 1}`, `Variation of image ${i + 1}`, () => act(job, "variation", i));
    v.className = "variation";
    actions.append(v);
  });
  job.images.forEach((_, i) => {
    const u = button(`U${i + 1}`, `Upscale image ${i + 1}`, () => act(job, "upscale", i));
    u.className = "upscale";
    actions.append(u);
  });
  if (job.meta && job.meta.story_id) renderStoryActions(actions, job);
}

function renderStoryActions(actions, job) {
  job.images.forEach((_, i) => {
    const star = button(`⭐${job.images.length > 1 ? i + 1 : ""}`, `Use image ${i + 1} in the storybook`,
      () => act(job, "choose", i));
    star.className = "choose";
    actions.append(star);
  });
  const link = document.createElement("a");
  link.className = "story-link";
  link.href = `/stories/${encodeURIComponent(job.meta.story_id)}`;
  link.target = "_blank";
  link.rel = "noopener";
  link.textContent = "📖 Storybook";
  actions.append(link);
}

function addAttachments(attachments) {
  const div = document.createElement("div");
  div.className = "msg bot attachments";
  for (const item of attachments) {
    if (!item.url) {
      const missing = document.createElement("span");
      missing.textContent = `📎 ${item.name} (too large to offer here)`;
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
    card = $("job-template").content.firstElementChild.cloneNode(true);
    card.dataset.jobId = job.id;
    cards.set(job.id, card);
    list.append(card);
  }
  return card;
}

function renderJob(job) {
  const card = cardFor(job);
  const before = card.dataset.status;
  card.dataset.status = job.status;
  card.classList.toggle("finished", FINAL.has(job.status));
  let kind = job.parent_id ? `${job.kind}` : "imagine";
  if (job.meta && job.meta.story_scene) kind = `📖 panel ${job.meta.story_scene} · ${job.kind}`;
  card.querySelector(".kind").textContent = kind;
  let status = STATUS_TEXT[job.status] || job.status;
  if (job.status === "queued" && job.position) status += ` — position ${job.position}`;
  if (job.status === "running") status += ` ${Math.round(job.progress * 100)}%`;
  if (job.status === "failed" && job.error) status = `⚠️ ${job.error}`;
  card.querySelector(".status").textContent = status;
  const bar = card.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(Math.round(job.progress * 100)));
  bar.querySelector(".fill").style.width = `${Math.round(job.progress * 100)}%`;
  card.querySelector(".prompt").textContent = job.prompt_zh;
  card.querySelector(".caption").textContent = job.caption;
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
  if (FINAL.has(job.status)) return;
  const source = new EventSource(`/api/jobs/${encodeURIComponent(job.id)}/events`);
  for (const type of EVENTS) {
    source.addEventListener(type, (event) => {
      renderJob(JSON.parse(event.data));
      if (FINAL.has(type)) source.close();
    });
  }
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) return;
    // the browser reconnects by itself; make sure a finished job is not left spinning
    api(`/api/jobs/${encodeURIComponent(job.id)}`).then((latest) => {
      renderJob(latest);
      if (FINAL.has(latest.status)) source.close();
    }).catch(() => source.close());
  };
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = textBox.value;
  if (!text.trim()) return;
  const user = userBox.value.trim() || randomName();
  const chat = chatBox.value.trim() || "main";
  userBox.value = user;
  chatBox.value = chat;
  addMessage(text, "mine", user);
  textBox.value = "";
  try {
    const data = await api("/api/messages", { chat, user, text });
    for (const reply of data.replies) addMessage(reply, "bot");
    if (data.attachments) addAttachments(data.attachments);
    for (const job of data.jobs || []) follow(job);
  } catch (err) {
    addMessage(err.message, "error");
  }
});

api("/healthz").then((health) => {
  $("engine").textContent = health.label ? `${health.engine} · ${health.label}` : health.engine;
}).catch(() => { $("engine").textContent = "engine unreachable"; });
