// The chat page: a model picker filled from /v1/models, one conversation at a time.
//
// The conversation's history is kept here as well as on the server, and so is what the page
// shows (the reply in progress included), in this tab's sessionStorage, per model, with the
// session's resume token and the seq of the last frame shown. After a dropped connection or
// a reload, the session is resumed (see connection.js): the frames missed come in and the
// reply goes on where it stopped. When the server no longer has the session (it restarted,
// or the resume window passed), a new session starts knowing nothing, so the next turn
// sends the whole history as a "messages" frame and the conversation carries on.
//
// What a model reports besides text (status, steps, its own events: see activity.js) is
// kept with its reply and saved with it, so a reload shows it again; a resume's replay
// never repeats it (recording is idempotent per step id and per seq).

import { drawActivity, leaveQueue, recordEvent, restoreActivity, showEvent } from "./activity.js";
import { ChatConnection, apiKey, authHeaders, setApiKey } from "./connection.js";
import { renderPlain, renderReply } from "./render.js";

const $ = (id) => document.getElementById(id);
const ui = {
  models: $("models"),
  modelsState: $("models-state"),
  newChat: $("new-chat"),
  name: $("model-name"),
  version: $("model-version"),
  connection: $("connection"),
  connectionLabel: $("connection-label"),
  log: $("log"),
  empty: $("empty"),
  emptyTitle: $("empty-title"),
  emptyDescription: $("empty-description"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  stopLabel: $("stop-label"),
  params: $("params"),
  paramsInput: $("params-input"),
  paramsError: $("params-error"),
  paramsState: $("params-state"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyInput: $("key-input"),
  keyError: $("key-error"),
  forgetKey: $("forget-key"),
};

const MODEL_REFRESH_MS = 10000;
const SAVE_DELAY_MS = 200; // a streaming reply is saved at most this often (and on pagehide)
const STORE_PREFIX = "anything-agent.chat."; // + model name, in sessionStorage
const STATUS_TEXT = { ready: "ready", building: "building…", failed: "failed", draining: "draining" };

const app = {
  models: [],
  model: null, // the picked model's name
  connection: null,
  history: [], // [{role, content}] as the model will see it next
  resync: false, // the server's session lacks our history (after a reconnect)
  sessionVersion: null, // the version the open session is pinned to
  listing: "", // the last /v1/models answer, to redraw the picker only when it changed
  countdown: null,
  turnCount: 0,
  log: [], // what the conversation shows: [{kind: "user"|"assistant", text, ...}] (saved)
  // (an assistant entry also keeps its events: activity, status, queued; see activity.js)
  turn: null, // {number, entry, element, body, userMessage, stopping, frame, started, resync}
  replay: null, // after a resume, until the frames missed are in: {until, running, turn}
  saveTimer: 0,
};

// ------------------------------------------------------------------ model picker
async function loadModels() {
  try {
    const response = await fetch("/v1/models", { cache: "no-store", headers: authHeaders() });
    if (response.status === 401) {
      ui.modelsState.textContent = "key needed";
      askForKey();
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const listing = await response.text();
    app.models = JSON.parse(listing).data;
    ui.modelsState.textContent = "";
    if (listing !== app.listing) {
      app.listing = listing;
      renderModels();
    }
  } catch {
    ui.modelsState.textContent = "offline";
    return;
  }
  if (app.model === null) {
    const wanted = hashModel() || localStorage.getItem("anything-agent.model");
    const pick = app.models.find((m) => m.id === wanted && m.status === "ready")
      || app.models.find((m) => m.status === "ready");
    if (pick) selectModel(pick.id, { restore: true }); // this tab's chat with it, after a reload
    else showEmpty("No model is ready", app.models.length ? "The models are still loading or failed; see their status on the left." : "Add a directory under models/ and reload.");
  }
  const current = app.models.find((m) => m.id === app.model);
  if (current) showModelHeader(current);
}

function hashModel() {
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch {
    return ""; // a malformed #… is no reason to fail
  }
}

function renderModels() {
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.model : undefined;
  // A redraw keeps the errors someone opened open.
  const opened = new Set([...ui.models.querySelectorAll(".model-error-more[open]")]
    .map((details) => details.closest(".model").dataset.model));
  const items = app.models.map((model) => {
    const li = document.createElement("li");
    const ready = model.status === "ready";
    li.className = "model";
    li.dataset.model = model.id;
    li.dataset.status = model.status;
    li.setAttribute("role", "option");
    li.setAttribute("aria-selected", String(model.id === app.model));
    li.setAttribute("aria-disabled", String(!ready));
    li.tabIndex = ready ? 0 : -1;
    const top = document.createElement("div");
    top.className = "model-top";
    const name = document.createElement("span");
    name.className = "model-name";
    name.textContent = model.id;
    const badge = document.createElement("span");
    badge.className = `badge ${model.status}`;
    badge.textContent = ready ? `v${model.version}` : STATUS_TEXT[model.status] || model.status;
    if (ready && model.mode === "isolated") badge.title = "runs in its own isolated worker";
    top.append(name, badge);
    const description = document.createElement("p");
    description.className = "model-description";
    description.textContent = model.description || "";
    li.append(top, description);
    if (model.error) li.append(modelError(model.error, opened.has(model.id)));
    if (ready) {
      li.addEventListener("click", () => selectModel(model.id));
      li.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          selectModel(model.id);
        }
      });
    } else {
      li.title = `${model.id} is ${model.status}; it can be picked once it is ready`;
    }
    return li;
  });
  ui.models.replaceChildren(...items);
  if (focused !== undefined) {
    const again = items.find((li) => li.dataset.model === focused);
    if (again) again.focus();
  }
}

// A failed model's error can be a whole installer log with paths: the list shows its first
// line, the rest behind "more". Always as text, never as HTML.
function modelError(text, open) {
  const [first, ...rest] = text.trim().split(/\r?\n/);
  const box = document.createElement("div");
  box.className = "model-error";
  const line = document.createElement("p");
  line.className = "model-error-first";
  line.textContent = first;
  box.append(line);
  const more = rest.join("\n").trimEnd();
  if (!more.trim()) return box;
  const details = document.createElement("details");
  details.className = "model-error-more";
  const toggle = document.createElement("summary");
  toggle.textContent = "more";
  const body = document.createElement("pre");
  body.textContent = more;
  details.append(toggle, body);
  details.open = open;
  const label = () => { toggle.textContent = details.open ? "less" : "more"; };
  label();
  details.addEventListener("toggle", label);
  // Opening it is not picking the model (a ready model may show the error of a failed reload).
  details.addEventListener("click", (event) => event.stopPropagation());
  details.addEventListener("keydown", (event) => event.stopPropagation());
  box.append(details);
  return box;
}

function selectModel(name, { restore = false } = {}) {
  if (name === app.model && app.connection && app.connection.state !== "stopped") return;
  app.model = name;
  history.replaceState(null, "", `#${encodeURIComponent(name)}`);
  localStorage.setItem("anything-agent.model", name);
  for (const li of ui.models.children) li.setAttribute("aria-selected", String(li.dataset.model === name));
  const info = app.models.find((m) => m.id === name);
  if (info) showModelHeader(info);
  newChat({ restore });
}

// Another #model in an open tab (a link, the address bar, Back): a new chat with that model.
async function followHash() {
  const wanted = hashModel();
  if (!wanted || wanted === app.model) return;
  let info = app.models.find((m) => m.id === wanted);
  if (!info || info.status !== "ready") {
    await loadModels(); // it may be new, or ready, since the list was last fetched
    if (hashModel() !== wanted || wanted === app.model) return;
    info = app.models.find((m) => m.id === wanted);
  }
  if (info && info.status === "ready") {
    selectModel(wanted);
    return;
  }
  // Nothing to chat with there: stay on this chat, and say why.
  if (app.model !== null) history.replaceState(null, "", `#${encodeURIComponent(app.model)}`);
  const why = info ? `“${wanted}” is ${STATUS_TEXT[info.status] || info.status}.` : `There is no model named “${wanted}”.`;
  notice("error", "unavailable", why);
}

function showModelHeader(info) {
  ui.name.textContent = info.id;
  // An open session stays on the version it started with (its ready frame says which).
  const pinned = app.sessionVersion;
  ui.version.textContent = pinned ? `v${pinned}` : `v${info.version}`;
  if (pinned && info.status === "ready" && info.version !== pinned) {
    ui.version.textContent += ` · v${info.version} available in a new chat`;
  }
  document.title = `${info.id} · AnythingAgent`;
  ui.input.placeholder = `Message ${info.id}…`;
  if (!app.history.length) showEmpty(info.id, info.description || "Say something to start.");
}

function showEmpty(title, description) {
  ui.emptyTitle.textContent = title;
  ui.emptyDescription.textContent = description;
}

// ------------------------------------------------------------------ session
/** A new conversation with app.model; with `restore`, this tab's saved one with it, if any
 * (its session resumed). The conversation shown before is ended, on the server too. */
function newChat({ restore = false } = {}) {
  const previous = app.connection;
  app.connection = null;
  if (previous) {
    previous.close();
    forgetChat(previous.model);
  }
  clearTimeout(app.saveTimer);
  app.saveTimer = 0;
  const saved = restore && app.model !== null ? savedChat(app.model) : null;
  if (app.model !== null && !saved) forgetChat(app.model);
  app.turn = null;
  app.history = [];
  app.log = [];
  app.resync = false;
  app.replay = null;
  app.sessionVersion = null;
  app.turnCount = 0;
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  const info = app.models.find((m) => m.id === app.model);
  if (info) showEmpty(info.id, info.description || "Say something to start.");
  if (saved) restoreChat(saved);
  updateComposer();
  if (app.model === null) return;
  const connection = new ChatConnection(app.model, saved ? saved.resume : null);
  app.connection = connection;
  connection.addEventListener("state", (event) => connection === app.connection && onState(event.detail));
  connection.addEventListener("frame", (event) => connection === app.connection && onFrame(event.detail));
  connection.addEventListener("closed", (event) => connection === app.connection && onClosed(event.detail));
  connection.open();
  ui.input.focus();
}

function onState({ state, retryIn, reason, version, auth, resumed }) {
  ui.connection.dataset.state = state;
  clearInterval(app.countdown);
  ui.connectionLabel.textContent =
    { connecting: "Connecting…", connected: "Connected", stopped: "Disconnected" }[state] || "";
  if (state === "reconnecting") countDown(retryIn);
  if (state === "connected") {
    app.sessionVersion = version;
    ui.version.textContent = `v${version}`;
  }
  ui.connection.title = reason || "";
  if (state !== "connected") app.replay = null;
  if (state === "connected" && !resumed) {
    // A new session on the server: it knows nothing of this conversation, and numbers its
    // turns from 1 again. A reply that was coming can't go on.
    if (app.turn) endTurn("lost");
    app.turnCount = 0;
    app.resync = app.history.length > 0;
  }
  if (state === "stopped" && app.turn) endTurn("lost");
  if (state === "connected") saveChat();
  if (state === "reconnecting" || state === "connected") loadModels();
  if (state === "stopped" && auth) {
    askForKey();
  } else if (state === "stopped" && reason) {
    notice("error", "disconnected", `${reason} Use “New chat” to try again.`);
  }
  updateComposer();
}

function countDown(seconds) {
  const until = Date.now() + seconds * 1000;
  const show = () => {
    const left = Math.max(0, (until - Date.now()) / 1000);
    ui.connectionLabel.textContent = `Reconnecting in ${left < 1 ? left.toFixed(1) : Math.ceil(left)} s…`;
  };
  show();
  app.countdown = setInterval(show, 250);
}

function onClosed({ code, resuming }) {
  const turn = app.turn;
  if (!turn) return;
  if (code === 1009 && !turn.started) {
    // The server's frame size limit: the message never became a turn.
    const text = turn.resync
      ? "The conversation is too long to send to the new session. Start a New chat."
      : "That message is too large for this server.";
    turnError(turn, { code: "too_large", message: text });
    endTurn("refused");
    return;
  }
  if (resuming) return; // the reply goes on once the session is resumed
  endTurn("lost");
}

function onFrame(frame) {
  const turn = app.turn;
  if (turn && frame.turn === turn.number) turn.started = true;
  switch (frame.type) {
    case "resumed":
      onResumed(frame);
      return;
    case "chunk":
      if (turn && frame.turn === turn.number && typeof frame.content === "string") {
        turn.entry.text += frame.content;
        showEvent(turn.element, turn.entry, leaveQueue(turn.entry));
        scheduleRender();
        saveSoon();
      }
      break;
    case "event":
      if (turn && frame.turn === turn.number && typeof frame.name === "string") {
        showEvent(turn.element, turn.entry, recordEvent(turn.entry, frame));
        stickToBottom();
        saveSoon();
      }
      break;
    case "done":
      if (turn && frame.turn === turn.number) endTurn(frame.reason);
      break;
    case "error":
      if (frame.code === "resume_expired") {
        // The session is gone; the new one's ready follows (see onState).
      } else if (turn && frame.turn === turn.number) {
        turnError(turn, frame);
      } else if (turn && frame.turn == null && !turn.entry.text && !turn.started) {
        turnError(turn, frame); // the message itself was refused (busy, rate limited, …)
        endTurn("refused");
      } else {
        notice("error", frame.code, frame.message);
      }
      break;
    default:
      break;
  }
  if (app.replay && typeof frame.seq === "number" && frame.seq >= app.replay.until) settleReplay();
}

// The session was resumed: the frames missed (seq after+1 … after+replayed) follow, then
// the live stream. A Stop pressed while disconnected may never have reached the server.
function onResumed(frame) {
  app.replay = {
    until: frame.after + frame.replayed,
    running: Boolean(frame.running),
    turn: frame.turn,
  };
  const turn = app.turn;
  if (turn && turn.stopping && frame.running) app.connection.send({ type: "cancel" });
  if (app.connection.after >= app.replay.until) settleReplay();
}

// The frames missed are all in. A reply still open here whose turn no longer runs there
// ended unseen, or never began: its message was lost with the connection.
function settleReplay() {
  const replay = app.replay;
  app.replay = null;
  const turn = app.turn;
  if (!turn) {
    // (a turn running there that this page never knew of ends unseen; the next is after it)
    if (Number.isInteger(replay.turn)) app.turnCount = replay.turn;
    return;
  }
  if (replay.running) return; // it goes on live
  if (Number.isInteger(replay.turn) && turn.number > replay.turn) {
    turnError(turn, {
      code: "not_delivered",
      message: "The connection dropped before the server got this message. Send it again.",
    });
    if (!ui.input.value) {
      ui.input.value = turn.userMessage.content;
      autosize();
    }
    endTurn("refused");
    return;
  }
  endTurn("lost");
}

// ------------------------------------------------------------------ turns
function sendMessage() {
  const text = ui.input.value;
  if (!text.trim() || app.turn || !app.connection || app.connection.state !== "connected") return;
  const { params, error } = readParams();
  if (error) {
    showParamsError(error); // nothing is sent: the message stays in the box
    ui.params.open = true;
    ui.paramsInput.focus();
    return;
  }
  const userMessage = { role: "user", content: text };
  const frame = app.resync
    ? { type: "messages", messages: [...app.history, userMessage] }
    : { type: "message", content: text };
  if (params) frame.params = params;
  if (!app.connection.send(frame)) return;
  const resync = app.resync;
  app.resync = false;
  ui.input.value = "";
  autosize();
  ui.empty.hidden = true;
  addMessage({ kind: "user", text });
  const entry = {
    kind: "assistant", text: "", errors: [], tags: [], activity: [], status: "", queued: false,
  };
  const element = addMessage(entry);
  element.classList.add("streaming");
  app.turn = {
    number: app.turnCount + 1,
    entry,
    element,
    body: element.querySelector(".body"),
    userMessage,
    stopping: false,
    frame: 0,
    started: false,
    resync, // this turn carries the whole history; if it is refused, the next one must
  };
  saveChat(); // now: a reload from here on must know this turn
  updateComposer();
  ui.input.focus();
}

function stopTurn() {
  const turn = app.turn;
  if (!turn || turn.stopping) return;
  turn.stopping = true;
  app.connection.send({ type: "cancel" }); // while reconnecting: sent again once resumed
  saveSoon();
  updateComposer();
  ui.input.focus();
}

function scheduleRender() {
  const turn = app.turn;
  if (turn.frame) return;
  turn.frame = requestAnimationFrame(() => {
    turn.frame = 0;
    renderReply(turn.body, turn.entry.text);
    stickToBottom();
  });
}

function endTurn(reason) {
  const turn = app.turn;
  const entry = turn.entry;
  app.turn = null;
  if (turn.frame) cancelAnimationFrame(turn.frame);
  renderReply(turn.body, entry.text);
  showEvent(turn.element, entry, leaveQueue(entry)); // it never ran
  turn.element.classList.remove("streaming");
  entry.reason = reason;
  turn.element.dataset.reason = reason;
  if (reason === "refused") {
    entry.refused = true;
    turn.element.classList.add("refused");
    if (turn.resync) app.resync = true;
  } else {
    app.turnCount = turn.number;
    app.history.push(turn.userMessage);
    if (entry.text) app.history.push({ role: "assistant", content: entry.text });
  }
  const tags = {
    cancelled: turn.stopping ? "Stopped" : "Cancelled by the server",
    lost: "Interrupted: the connection was lost",
  };
  if (tags[reason]) entry.tags.push(tags[reason]);
  if (!entry.text && reason === "stop") entry.tags.push("(no reply)");
  for (const text of entry.tags) tag(turn.element, text);
  saveChat();
  updateComposer();
  stickToBottom();
}

function turnError(turn, frame) {
  const error = { code: String(frame.code), message: String(frame.message) };
  turn.entry.errors.push(error);
  inlineError(turn.element, error);
  saveSoon();
  stickToBottom();
}

function inlineError(element, { code, message }) {
  element.append(codedBox("inline-error", code, message));
}

/** A box showing an error code and its message, as text. */
function codedBox(className, code, text) {
  const box = document.createElement("div");
  box.className = className;
  box.dataset.code = code;
  const label = document.createElement("span");
  label.className = "code";
  label.textContent = code;
  const message = document.createElement("span");
  message.textContent = text;
  box.append(label, message);
  return box;
}

// ------------------------------------------------------------------ parameters
// A JSON object typed under the composer goes with every message as "params" (the model's
// self.params for that turn). Empty: none.

/** The parameters box read: {params} (null when empty), or {error} saying what is wrong. */
function readParams() {
  const text = ui.paramsInput.value.trim();
  if (!text) return { params: null };
  let value;
  try {
    value = JSON.parse(text);
  } catch (error) {
    return { error: `Parameters are not valid JSON: ${error.message}` };
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    const kind = value === null ? "null" : Array.isArray(value) ? "an array" : `a ${typeof value}`;
    return { error: `Parameters must be a JSON object, like {"temperature": 0.2}, not ${kind}.` };
  }
  return { params: Object.keys(value).length ? value : null };
}

function showParamsError(text) {
  ui.paramsError.textContent = text;
  ui.paramsError.hidden = !text;
  ui.paramsInput.setAttribute("aria-invalid", String(Boolean(text)));
}

/** What the closed box shows after "Parameters": the names set, or that it is invalid. */
function showParamsState() {
  const { params, error } = readParams();
  ui.paramsState.textContent = error ? "(invalid)" : params ? `(${Object.keys(params).join(", ")})` : "";
  ui.params.dataset.state = error ? "invalid" : params ? "set" : "empty";
}

// ------------------------------------------------------------------ log
/** Show one entry of the conversation ({kind: "user"|"assistant", text}) and keep it. */
function addMessage(entry) {
  app.log.push(entry);
  return drawMessage(entry);
}

function drawMessage(entry) {
  const element = document.createElement("article");
  element.className = `message ${entry.kind}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = entry.kind === "user" ? "You" : app.model;
  const body = document.createElement("div");
  body.className = "body";
  if (entry.kind === "user") renderPlain(body, entry.text);
  element.append(who, body);
  ui.log.append(element);
  stickToBottom(true);
  return element;
}

function tag(element, text) {
  const span = document.createElement("div");
  span.className = "tag";
  span.textContent = text;
  element.append(span);
}

// ------------------------------------------------------------------ saved in this tab
// sessionStorage lives as long as the tab, survives reloads, and is this tab's alone.
function storageKey(model) {
  return STORE_PREFIX + model;
}

/** Save the conversation shown with app.connection, with what resumes its session. */
function saveChat() {
  clearTimeout(app.saveTimer);
  app.saveTimer = 0;
  const connection = app.connection;
  if (!connection) return;
  const turn = app.turn;
  const state = {
    resume: connection.resumeState,
    sessionVersion: app.sessionVersion,
    turnCount: app.turnCount,
    resync: app.resync,
    history: app.history,
    log: app.log,
    turn: turn && {
      number: turn.number,
      index: app.log.indexOf(turn.entry),
      userMessage: turn.userMessage,
      stopping: turn.stopping,
      started: turn.started,
      resync: turn.resync,
    },
  };
  try {
    sessionStorage.setItem(storageKey(connection.model), JSON.stringify(state));
  } catch {
    forgetChat(connection.model); // too big for this tab's storage: a reload starts afresh
  }
}

/** Save soon: a streaming reply changes with every chunk. */
function saveSoon() {
  if (!app.saveTimer) app.saveTimer = setTimeout(saveChat, SAVE_DELAY_MS);
}

function forgetChat(model) {
  try {
    sessionStorage.removeItem(storageKey(model));
  } catch {
    // no storage here: nothing was kept
  }
}

/** This tab's saved conversation with `model`, or null. */
function savedChat(model) {
  let state;
  try {
    state = JSON.parse(sessionStorage.getItem(storageKey(model)));
  } catch {
    return null;
  }
  const text = (value) => typeof value === "string";
  const message = (m) => m && text(m.role) && text(m.content);
  const entry = (e) => e && (e.kind === "user" || e.kind === "assistant") && text(e.text)
    && (e.kind === "user" || (Array.isArray(e.errors) && Array.isArray(e.tags)));
  const valid = state && typeof state === "object"
    && Array.isArray(state.history) && state.history.every(message)
    && Array.isArray(state.log) && state.log.every(entry)
    && Number.isInteger(state.turnCount)
    && (state.resume === null || (state.resume && text(state.resume.token) && Number.isSafeInteger(state.resume.after)))
    && (state.turn === null || (state.turn && Number.isInteger(state.turn.number)
      && message(state.turn.userMessage) && state.log[state.turn.index]
      && state.log[state.turn.index].kind === "assistant"));
  return valid ? state : null;
}

function restoreChat(saved) {
  app.history = saved.history;
  app.log = saved.log;
  app.turnCount = saved.turnCount;
  app.resync = Boolean(saved.resync);
  app.sessionVersion = saved.sessionVersion || null;
  if (app.log.length) ui.empty.hidden = true;
  const open = saved.turn ? app.log[saved.turn.index] : null;
  for (const entry of app.log) {
    const element = drawMessage(entry);
    if (entry.kind !== "assistant") continue;
    const body = element.querySelector(".body");
    renderReply(body, entry.text);
    restoreActivity(entry);
    drawActivity(element, entry);
    for (const error of entry.errors) inlineError(element, error);
    if (entry === open) {
      element.classList.add("streaming");
      app.turn = {
        ...saved.turn,
        stopping: Boolean(saved.turn.stopping),
        started: Boolean(saved.turn.started),
        resync: Boolean(saved.turn.resync),
        entry,
        element,
        body,
        frame: 0,
      };
      continue;
    }
    if (entry.reason) element.dataset.reason = entry.reason;
    if (entry.refused) element.classList.add("refused");
    for (const text of entry.tags) tag(element, text);
  }
  stickToBottom(true);
}

function notice(kind, code, text) {
  ui.empty.hidden = true;
  ui.log.append(codedBox(`notice ${kind}`, code, text));
  stickToBottom(true);
}

function stickToBottom(force = false) {
  const log = ui.log;
  const near = log.scrollHeight - log.scrollTop - log.clientHeight < 120;
  if (force || near) log.scrollTop = log.scrollHeight;
}

// ------------------------------------------------------------------ API key
function askForKey() {
  ui.keyError.hidden = !apiKey(); // a stored key that was refused
  ui.keyInput.value = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

ui.keyForm.addEventListener("submit", () => {
  setApiKey(ui.keyInput.value.trim());
  ui.forgetKey.hidden = false;
  app.listing = "";
  loadModels().then(() => {
    if (app.model !== null && (!app.connection || app.connection.state === "stopped")) newChat();
  });
});

ui.forgetKey.hidden = !apiKey();
ui.forgetKey.addEventListener("click", () => {
  setApiKey("");
  location.reload();
});

// ------------------------------------------------------------------ composer
function updateComposer() {
  const connected = app.connection && app.connection.state === "connected";
  const running = app.turn !== null;
  ui.send.hidden = running;
  ui.stop.hidden = !running;
  ui.stop.disabled = running && app.turn.stopping;
  ui.stopLabel.textContent = running && app.turn.stopping ? "Stopping…" : "Stop";
  ui.send.disabled = !connected || !ui.input.value.trim();
  ui.newChat.disabled = app.model === null;
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});
ui.input.addEventListener("input", () => {
  autosize();
  updateComposer();
});
ui.stop.addEventListener("click", stopTurn);
ui.paramsInput.addEventListener("input", () => {
  showParamsError("");
  showParamsState();
});
ui.newChat.addEventListener("click", () => {
  newChat();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && app.turn) stopTurn();
});
window.addEventListener("hashchange", followHash);
window.addEventListener("pagehide", saveChat); // a reload: the next page resumes from here

loadModels();
setInterval(() => {
  if (!document.hidden) loadModels();
}, MODEL_REFRESH_MS);
