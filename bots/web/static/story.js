// Huahua storybook gallery: the panels of one story, their variants, and ⭐ to choose the book's picture.
// All story text (title, cast, excerpts, prompts) is set with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 3000;
const MAX_POLLS = 200;

const $ = (id) => document.getElementById(id);
const storyId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const base = `/api/stories/${encodeURIComponent(storyId)}`;
let polls = 0;
let pollTimer = null;

function notice(text) {
  $("notice").textContent = text;
}

function picture(url, alt) {
  const img = document.createElement("img");
  img.src = url;
  img.alt = alt;
  img.loading = "lazy";
  return img;
}

function thumbnails(scene) {
  return scene.images.map((url, i) => {
    const thumb = document.createElement("div");
    const chosen = url === scene.chosen;
    thumb.className = chosen ? "thumb chosen" : "thumb";
    thumb.dataset.picture = String(i + 1);
    thumb.append(picture(url, t("pictureAlt", scene.index, i + 1)));
    const star = document.createElement("button");
    star.type = "button";
    star.className = "star";
    star.textContent = chosen ? "★" : "☆";
    star.title = chosen ? t("inBook") : t("starTitle", i + 1, scene.index);
    star.disabled = chosen;
    star.addEventListener("click", () => choose(scene.index, i + 1));
    thumb.append(star);
    return thumb;
  });
}

function renderPanel(scene) {
  const figure = $("panel-template").content.firstElementChild.cloneNode(true);
  figure.id = `panel-${scene.index}`;
  figure.dataset.scene = String(scene.index);
  figure.querySelector(".number").textContent = t("panelTitle", scene.index);
  const main = figure.querySelector(".main");
  if (scene.chosen) {
    const img = picture(scene.chosen, scene.excerpt);
    img.width = scene.params.width;
    img.height = scene.params.height;
    main.append(img);
  } else {
    const drawing = document.createElement("div");
    drawing.className = "drawing";
    drawing.textContent = t("stillDrawing");
    main.append(drawing);
  }
  figure.querySelector(".excerpt").textContent = scene.excerpt;
  figure.querySelector(".prompt").textContent = `${scene.prompt_zh} · seed ${scene.seed}`;
  if (scene.images.length > 1) figure.querySelector(".thumbs").replaceChildren(...thumbnails(scene));
  return figure;
}

function render(story) {
  document.title = `${story.title} · Huahua 画画`;
  $("title").textContent = story.title;
  const parts = [t("panels", story.scenes.length)];
  if (story.style) parts.push(story.style);
  if (!story.active) parts.push(t("finished"));
  $("meta").textContent = parts.join(" · ");
  $("export-html").href = `${base}/export.html`;
  $("export-pdf").href = `${base}/export.pdf`;
  $("cast").hidden = story.cast.length === 0 && !story.active;
  $("cast-picture").hidden = !story.active;
  $("cast-list").replaceChildren(...story.cast.flatMap((member) => {
    const name = document.createElement("dt");
    name.textContent = member.name;
    const description = document.createElement("dd");
    description.textContent = member.description;
    if (member.reference_url) {
      const img = picture(member.reference_url, member.name);
      img.className = "reference";
      img.title = t("referenceTitle", member.reference_from);
      description.prepend(img);
    }
    return [name, description];
  }));
  $("panels").replaceChildren(...story.scenes.map(renderPanel));
  document.body.dataset.loaded = "true";
}

async function load() {
  pollTimer = null;
  try {
    const story = await api(base);
    render(story);
    const drawing = story.scenes.some((scene) => scene.chosen === null);
    if (drawing && polls < MAX_POLLS) {
      polls += 1;
      pollTimer = setTimeout(load, POLL_MS);
    }
  } catch (err) {
    notice(err.message);
  }
}

async function choose(scene, number) {
  try {
    render(await api(`${base}/choose`, { scene, picture: number }));
    notice(t("chosenNotice", scene, number));
  } catch (err) {
    notice(err.message);
  }
}

// A cast member's reference picture: the form goes as multipart (the server keeps its own size limit).
async function uploadCastPicture(event) {
  event.preventDefault();
  const form = $("cast-picture");
  const body = new FormData(form);
  body.append("story", storyId);
  form.querySelector("button").disabled = true;
  try {
    const response = await fetch("/api/cast/picture", { method: "POST", body });
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      notice((data && data.error && data.error.message) || t("serverAnswered", response.status));
      return;
    }
    notice(data.replies.join(" "));
    form.reset();
    render(await api(base));
  } catch (_) {
    notice(t("offline"));
  } finally {
    form.querySelector("button").disabled = false;
  }
}

$("cast-picture").addEventListener("submit", uploadCastPicture);
load();
