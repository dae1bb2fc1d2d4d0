// One chat session with one model over protocol v1, reconnecting after the connection drops.
//
// Emits "state" events ({state, ...}), "frame" events (one parsed server frame each) and
// "closed" events ({code, reason, resuming}). States: "connecting" (socket opening, waiting
// for the session's ready or resumed frame), "connected", "reconnecting" (a retry is
// scheduled: retryIn seconds), "stopped" (no more retries: close() was called, or the app
// gave up).
//
// Resuming (design.md, "Resuming"): every connection offers "resumable", so the server
// keeps the session for a while when the connection goes any way but a close with 1000,
// and its ready frame carries a resume token. The connection remembers that token and the
// seq of the last frame handed on; the next attempt offers "resume.<token>.<after>" and
// gets "resumed", then the frames it missed, then the live stream. A frame whose seq was
// already handed on is dropped, so nothing is shown twice. When the server no longer has
// the session it answers error resume_expired, then a fresh ready: a new session.
//
// A browser's WebSocket hides a refused handshake's HTTP status, so after a failed attempt
// the connection asks GET /v1/models/{name} why (see explain()) before retrying.

const BACKOFF = [0.5, 1, 2, 4, 8];
export const SUBPROTOCOL = "anything-agent.v1";
const RESUMABLE = "resumable";
// Close code the server uses when another connection resumed this session.
const TAKEN_OVER = 4001;

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
  /** `resume`: {token, after} of a session to carry on (kept across a page reload), or null. */
  constructor(model, resume = null) {
    super();
    this.model = model;
    this.socket = null;
    this.state = "idle";
    this.attempt = 0;
    this.refusals = 0; // handshakes offering a resume that failed while the server answered
    this.timer = null;
    this.closed = false;
    this.token = resume && typeof resume.token === "string" ? resume.token : null;
    this.after = this.token !== null && Number.isSafeInteger(resume.after) ? resume.after : 0;
  }

  /** What a later connection (or page) needs to carry this session on, or null. */
  get resumeState() {
    return this.token === null ? null : { token: this.token, after: this.after };
  }

  open() {
    this.closed = false;
    clearTimeout(this.timer);
    this.#setState("connecting");
    const resuming = this.token !== null;
    const socket = new WebSocket(chatUrl(this.model), this.#protocols());
    this.socket = socket;
    let opened = false;
    let ready = false;
    let startError = null;
    socket.addEventListener("open", () => {
      opened = true;
    });
    socket.addEventListener("message", (event) => {
      if (socket !== this.socket) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return; // not protocol v1; nothing sensible to show
      }
      if (frame === null || typeof frame !== "object") return;
      if (typeof frame.seq === "number") {
        if (frame.seq <= this.after) return; // handed on already (a replay overlapping it)
        this.after = frame.seq;
      }
      if (frame.type === "ready") {
        ready = true;
        this.attempt = 0;
        this.refusals = 0;
        // A new session (the first, or the one after resume_expired): its own token and seqs.
        this.token = typeof frame.resume_token === "string" ? frame.resume_token : null;
        this.after = 0;
        this.#setState("connected", { session: frame.session_id, version: frame.version, resumed: false });
      } else if (frame.type === "resumed") {
        ready = true;
        this.attempt = 0;
        this.refusals = 0;
        this.#setState("connected", { session: frame.session_id, version: frame.version, resumed: true });
      } else if (frame.type === "error" && frame.code === "resume_expired") {
        this.token = null; // the old session is over; a ready for a new one follows
        this.after = 0;
      } else if (!ready && frame.type === "error") {
        startError = frame; // on_chat_start failed; the server closes next
      }
      this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
    });
    socket.addEventListener("close", (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      if (event.code === TAKEN_OVER) {
        // Another connection resumed this session (this tab, duplicated): leave it to that
        // one, and carry on here as a new session rather than take it back.
        this.token = null;
        this.after = 0;
      }
      const resumable = !this.closed && !startError && this.token !== null;
      this.dispatchEvent(new CustomEvent("closed", {
        detail: { code: event.code, reason: event.reason, resuming: resumable },
      }));
      if (this.closed) return;
      if (startError) {
        this.#setState("stopped", { reason: `The model could not start a session: ${startError.message}` });
        return;
      }
      this.#retry(ready, resuming && !opened);
    });
  }

  #protocols() {
    const protocols = [SUBPROTOCOL, RESUMABLE];
    if (this.token !== null) protocols.push(`resume.${this.token}.${this.after}`);
    const key = apiKey();
    if (key) protocols.push(keyProtocol(key));
    return protocols;
  }

  async #retry(wasReady, resumeRefused) {
    const delay = wasReady ? BACKOFF[0] : BACKOFF[Math.min(this.attempt, BACKOFF.length - 1)];
    this.attempt += 1;
    const why = wasReady ? { gone: false, text: "The connection was lost." } : await explain(this.model);
    if (this.closed) return;
    if (why && why.gone) {
      this.#setState("stopped", { reason: why.text, auth: Boolean(why.auth) });
      return;
    }
    // The server answers and the model is ready, yet handshakes offering the resume entry
    // keep failing: the server refuses it. Go on as a new session rather than forever.
    if (resumeRefused && why === null && ++this.refusals >= 2) {
      this.token = null;
      this.after = 0;
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

  /** End the session for good (New chat, another model): no reconnect. A close with 1000
   * ends it on the server at once, rather than keeping it for a resume. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    const socket = this.socket;
    this.socket = null;
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.close(1000, "closed by the user");
    } else {
      if (socket) socket.close(); // still opening: abandoned, which leaves the session kept
      if (this.token !== null) this.#endKeptSession();
    }
    this.token = null;
    this.#setState("stopped", { reason: "" });
  }

  // Between connections the server keeps the session for a resume that will never come:
  // resume it just to close it with 1000, so it ends now rather than when its window runs out.
  #endKeptSession() {
    let socket;
    try {
      socket = new WebSocket(chatUrl(this.model), this.#protocols());
    } catch {
      return; // the window ends it
    }
    socket.addEventListener("open", () => socket.close(1000, "closed by the user"));
  }

  #setState(state, detail = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }
}
