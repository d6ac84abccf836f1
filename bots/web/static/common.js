// Shared by the chat page and the story gallery: the page's language and JSON calls to the Huahua API.
"use strict";

// The server sets <html lang> from the browser's languages (zh or en); every label follows it.
const LANG = document.documentElement.lang === "zh" ? "zh" : "en";

const TEXT = {
  en: {
    engineTitle: "Image engine",
    engineDown: "⚠️ engine unavailable",
    engineUnreachable: "⚠️ server unreachable",
    room: "Room",
    roomHint: "just you",
    you: "you",
    admin: "admin",
    idTitle: "Your web user id (for HUAHUA_WEB_ADMINS)",
    message: "Message",
    placeholder: "Describe a picture, or /help",
    send: "Send",
    token: "Access token",
    enter: "Enter",
    loginHint: "This chat asks for an access token.",
    welcome: "Hello! Describe a picture in any language and I will draw it. /help lists the commands.",
    tryExample: "Try:",
    example: "一只在月球上看书的猫 --ar 3:2",
    queued: "⏳ Queued",
    position: "position",
    running: "🎨 Drawing…",
    done: "✅ Done",
    failed: "⚠️ Failed",
    cancelled: "❌ Cancelled",
    imagine: "imagine",
    reroll: "reroll",
    variation: "variation",
    upscale: "upscale",
    scene: "scene",
    panel: "panel {0}",
    panelRange: "panels {0}–{1}",
    referenceTitle: "Reference picture (from the {0})",
    cancel: "❌ Cancel",
    cancelTitle: "Cancel this job",
    rerollButton: "🔄 Reroll",
    rerollTitle: "Reroll: same prompt, new seed",
    variationTitle: "Variation of image",
    upscaleTitle: "Upscale image",
    chooseTitle: "Use this image in the storybook",
    chosen: "⭐ Picture {0} is now panel {1} of the story.",
    storybook: "📖 Storybook",
    tooLarge: "too large to offer here",
    serverAnswered: "The server answered {0}.",
    offline: "The server cannot be reached; check your connection.",
    // story gallery
    storyTitle: "Storybook",
    cast: "Cast",
    download: "Download the storybook",
    panelTitle: "Panel {0}",
    pictureAlt: "Panel {0}, picture {1}",
    starTitle: "Use picture {0} for panel {1}",
    chosenNotice: "★ Panel {0} now uses picture {1}.",
    inBook: "In the book",
    stillDrawing: "🎨 Still drawing…",
    panels: "{0} panels",
    castName: "Name",
    castDescription: "How they look (optional for someone in the cast)",
    castPicture: "Set their reference picture",
    castPictureLabel: "A picture of the character: every panel with them follows it",
    finished: "finished",
  },
  zh: {
    engineTitle: "绘图引擎",
    engineDown: "⚠️ 引擎不可用",
    engineUnreachable: "⚠️ 无法连接服务器",
    room: "房间",
    roomHint: "仅你自己",
    you: "你",
    admin: "管理员",
    idTitle: "你的网页用户 ID(用于 HUAHUA_WEB_ADMINS)",
    message: "消息",
    placeholder: "描述一幅画,或输入 /help",
    send: "发送",
    token: "访问口令",
    enter: "进入",
    loginHint: "这个聊天需要访问口令。",
    welcome: "你好!用任何语言描述一幅画,我来画。/help 列出所有命令。",
    tryExample: "试试:",
    example: "一只在月球上看书的猫 --ar 3:2",
    queued: "⏳ 排队中",
    position: "位置",
    running: "🎨 绘制中…",
    done: "✅ 完成",
    failed: "⚠️ 失败",
    cancelled: "❌ 已取消",
    imagine: "绘画",
    reroll: "重画",
    variation: "变体",
    upscale: "放大",
    scene: "场景",
    panel: "第 {0} 幅",
    panelRange: "第 {0}–{1} 幅",
    referenceTitle: "参考图(来自{0})",
    cancel: "❌ 取消",
    cancelTitle: "取消这个任务",
    rerollButton: "🔄 重画",
    rerollTitle: "重画:同样的提示词,新的种子",
    variationTitle: "变体:图",
    upscaleTitle: "放大:图",
    chooseTitle: "把这张图放进故事书",
    chosen: "⭐ 图 {0} 现在是故事的第 {1} 幅。",
    storybook: "📖 故事书",
    tooLarge: "文件太大,无法在此提供",
    serverAnswered: "服务器返回了 {0}。",
    offline: "无法连接服务器,请检查网络。",
    storyTitle: "故事书",
    cast: "角色",
    download: "下载故事书",
    panelTitle: "第 {0} 幅",
    pictureAlt: "第 {0} 幅,图 {1}",
    starTitle: "第 {1} 幅使用图 {0}",
    chosenNotice: "★ 第 {0} 幅现在使用图 {1}。",
    inBook: "已在书中",
    stillDrawing: "🎨 绘制中…",
    panels: "共 {0} 幅",
    castName: "名字",
    castDescription: "外貌描述(已在角色表中可不填)",
    castPicture: "设为参考图",
    castPictureLabel: "角色的图片:有这个角色的每一幅都参照它",
    finished: "已完结",
  },
};

// The label `key` in the page's language, with {0}, {1}... replaced by `args`.
function t(key, ...args) {
  const text = TEXT[LANG][key] ?? TEXT.en[key] ?? key;
  return text.replace(/\{(\d)\}/g, (_, i) => String(args[Number(i)]));
}

// Fill every element marked data-i18n (text), data-i18n-placeholder, data-i18n-title, data-i18n-label.
function translatePage() {
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of document.querySelectorAll("[data-i18n-label]")) {
    el.setAttribute("aria-label", t(el.dataset.i18nLabel));
  }
}

// An API refusal: `message` is the server's one sentence, `code` its error code, `status` the HTTP status.
class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// GET (no body) or POST JSON; throws an ApiError with the server's one-sentence message on failure.
async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, options);
  } catch (_) {
    throw new ApiError(t("offline"), 0, "offline");
  }
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    const error = data && data.error;
    const message = (error && error.message) || t("serverAnswered", response.status);
    throw new ApiError(message, response.status, (error && error.code) || "http_error");
  }
  return data;
}

translatePage();
