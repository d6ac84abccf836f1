// Shared by the chat page and the story gallery: JSON calls to the Huahua API.
"use strict";

// GET (no body) or POST JSON; throws an Error with the server's one-sentence message on failure.
async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    throw new Error((data && data.error) || `The server answered ${response.status}.`);
  }
  return data;
}
