// One chat session with one model over protocol v1, reconnecting after the connection drops.
//
// Emits "state" events ({state, ...}) and "frame" events (one parsed server frame each).
// States: "connecting" (socket opening, waiting for the session's ready frame),
// "connected", "reconnecting" (a retry is scheduled: retryIn seconds), "stopped" (no
// more retries: close() was called, or the app gave up).
//
// A browser's WebSocket hides a refused handshake's HTTP status, so after a failed attempt
// the connection asks GET /v1/models/{name} why (see explain()) before retrying.

const BACKOFF = [0.5, 1, 2, 4, 8];
export const SUBPROTOCOL = "anything-agent.v1";

/** The API key the page was given (kept in this browser's storage), or "". */
export function apiKey() {
  return localStorage.getItem("anything-agent.key") || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem("anything-agent.key", key);
  else localStorage.removeItem("anything-agent.key");
}

/** Headers for the HTTP API: the key as a bearer token, when there is one. */
export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Browsers can't set Authorization on a WebSocket: the key travels as a subprotocol entry,
// "bearer." + base64url(UTF-8 key), beside ours (the server only ever selects ours). It is a
// header, so it stays out of URLs, access logs and history.
function keyProtocol(key) {
  const bytes = new TextEncoder().encode(key);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return "bearer." + btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function chatUrl(model) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/chat/${encodeURIComponent(model)}`;
}

/** Why the model can't take a session now, from the model list: {gone, text} or null. */
export async function explain(model) {
  let response;
  try {
    response = await fetch(`/v1/models/${encodeURIComponent(model)}`, {
      cache: "no-store",
      headers: authHeaders(),
    });
  } catch {
    return { gone: false, text: "The server is unreachable." };
  }
  if (response.status === 401) return { gone: true, auth: true, text: "This server needs a valid API key." };
  if (response.status === 404) return { gone: true, text: `The model “${model}” no longer exists.` };
  if (!response.ok) return { gone: false, text: `The server answered HTTP ${response.status}.` };
  const info = await response.json();
  if (info.status === "building") return { gone: false, text: `“${model}” is building its environment.` };
  if (info.status === "failed") return { gone: false, text: `“${model}” failed to load: ${info.error}` };
  if (info.status === "draining") return { gone: false, text: `“${model}” is being replaced.` };
  return null; // ready: the next attempt may well succeed
}

export class ChatConnection extends EventTarget {
  constructor(model) {
    super();
    this.model = model;
    this.socket = null;
    this.state = "idle";
    this.attempt = 0;
    this.timer = null;
    this.closed = false;
  }

  open() {
    this.closed = false;
    clearTimeout(this.timer);
    this.#setState("connecting");
    const key = apiKey();
    const socket = new WebSocket(chatUrl(this.model), key ? [SUBPROTOCOL, keyProtocol(key)] : []);
    this.socket = socket;
    let ready = false;
    let startError = null;
    socket.addEventListener("message", (event) => {
      if (socket !== this.socket) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return; // not protocol v1; nothing sensible to show
      }
      if (frame.type === "ready") {
        ready = true;
        this.attempt = 0;
        this.#setState("connected", { session: frame.session_id, version: frame.version });
      } else if (!ready && frame.type === "error") {
        startError = frame; // on_chat_start failed; the server closes next
      }
      this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
    });
    socket.addEventListener("close", (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.dispatchEvent(new CustomEvent("closed", { detail: { code: event.code, reason: event.reason } }));
      if (this.closed) return;
      if (startError) {
        this.#setState("stopped", { reason: `The model could not start a session: ${startError.message}` });
        return;
      }
      this.#retry(ready);
    });
  }

  async #retry(wasReady) {
    const delay = wasReady ? BACKOFF[0] : BACKOFF[Math.min(this.attempt, BACKOFF.length - 1)];
    this.attempt += 1;
    const why = wasReady ? { gone: false, text: "The connection was lost." } : await explain(this.model);
    if (this.closed) return;
    if (why && why.gone) {
      this.#setState("stopped", { reason: why.text, auth: Boolean(why.auth) });
      return;
    }
    this.#setState("reconnecting", { retryIn: delay, reason: why ? why.text : "" });
    this.timer = setTimeout(() => this.open(), delay * 1000);
  }

  /** Send one frame (an object); false if the session isn't connected. */
  send(frame) {
    if (this.state !== "connected" || !this.socket) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  /** End the session for good (New chat, another model): no reconnect. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000, "closed by the user");
    this.socket = null;
    this.#setState("stopped", { reason: "" });
  }

  #setState(state, detail = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }
}
