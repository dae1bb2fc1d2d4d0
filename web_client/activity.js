// What a model reports besides text ("event" frames, design.md "Model events"), kept in its
// reply's entry and shown in the reply's message:
//
//   status   the latest one, a muted line under the reply (replaced by the next one)
//   queued   the same line, "Queued (position P)", until the turn runs
//   step     a collapsible item per step (<details>: name and a status icon; input and
//            output as text), nested under the step that was running when it began
//   others   a muted line: the name, then the data as compact JSON
//
// Everything a model sends is text here: it goes into the page through textContent only.
// Recording is idempotent, as a replay after a resume may bring an event again: a step is
// kept once per id (its end updates it), another event once per seq.

const VALUE_LIMIT = 16384; // characters of a step's input or output kept and shown
const NOTE_LIMIT = 300; // characters of another event's data shown
const STEP_STATUSES = ["running", "done", "error"];
const STEP_ICONS = { running: "", done: "✓", error: "✗" };

const drawn = new WeakMap(); // message element -> Map(step id -> its <details>)

/** Record event `frame` in reply `entry`; what changed, for showEvent: null when nothing
 * (an event seen before, or one that makes no sense). */
export function recordEvent(entry, frame) {
  const data = frame.data !== null && typeof frame.data === "object" && !Array.isArray(frame.data)
    ? frame.data : {};
  const name = String(frame.name);
  if (name === "status") {
    entry.status = oneLine(typeof data.text === "string" ? data.text : "");
    entry.queued = false;
    return { kind: "status" };
  }
  if (name === "queued") {
    entry.status = `Queued (position ${Number.isFinite(data.position) ? data.position : "?"})`;
    entry.queued = true;
    return { kind: "status" };
  }
  const unqueued = leaveQueue(entry);
  if (name === "step" && (typeof data.id === "string" || Number.isFinite(data.id))) {
    const id = String(data.id);
    const status = STEP_STATUSES.includes(data.status) ? data.status : "running";
    const index = indexOf(entry);
    let step = index.get(`step ${id}`);
    if (step && step.status !== "running" && status === "running") return unqueued; // seen
    if (!step) {
      const parent = typeof data.parent_id === "string" || Number.isFinite(data.parent_id)
        ? String(data.parent_id) : null;
      const stepName = oneLine(String(data.name ?? "step"));
      step = { type: "step", id, parent, name: stepName, input: null, output: null };
      entry.activity.push(step);
      index.set(`step ${id}`, step);
    }
    step.status = status;
    if (data.input != null) step.input = shown(data.input, VALUE_LIMIT);
    if (data.output != null) step.output = shown(data.output, VALUE_LIMIT);
    return { kind: "step", step, unqueued: Boolean(unqueued) };
  }
  const seq = Number.isSafeInteger(frame.seq) ? frame.seq : null;
  if (seq !== null && indexOf(entry).has(`note ${seq}`)) return unqueued;
  const note = { type: "note", seq, name: oneLine(name), text: oneLine(shown(data, NOTE_LIMIT, 0)) };
  entry.activity.push(note);
  if (seq !== null) indexOf(entry).set(`note ${seq}`, note);
  return { kind: "note", note, unqueued: Boolean(unqueued) };
}

// Each entry's steps by id and notes by seq, so that an event is found at once however
// many came before (kept beside the entry: what is saved stays plain JSON).
const indexes = new WeakMap();

function indexOf(entry) {
  let index = indexes.get(entry);
  if (!index) {
    index = new Map();
    for (const item of entry.activity) {
      index.set(item.type === "step" ? `step ${item.id}` : `note ${item.seq}`, item);
    }
    indexes.set(entry, index);
  }
  return index;
}

/** A turn that was waiting for a slot runs (or ended): its "Queued" line goes. What
 * changed, for showEvent, or null. */
export function leaveQueue(entry) {
  if (!entry.queued) return null;
  entry.queued = false;
  entry.status = "";
  return { kind: "status" };
}

/** Show a change recordEvent (or leaveQueue) made to `entry`, in its message `element`. */
export function showEvent(element, entry, change) {
  if (!change) return;
  if (change.kind === "status" || change.unqueued) showStatus(element, entry);
  if (change.kind === "step") showStep(element, change.step);
  if (change.kind === "note") activityBox(element).append(noteLine(change.note));
}

/** Show everything `entry` holds (a reply drawn again after a reload). */
export function drawActivity(element, entry) {
  for (const item of entry.activity) {
    if (item.type === "step") showStep(element, item);
    else activityBox(element).append(noteLine(item));
  }
  showStatus(element, entry);
}

/** An entry's recorded events as saved (sessionStorage) may be anything: keep what is
 * well-formed, so a reload never fails on them. */
export function restoreActivity(entry) {
  const text = (value) => typeof value === "string";
  const textOrNull = (value) => value === null || text(value);
  const valid = (item) => item && ((item.type === "step" && text(item.id) && textOrNull(item.parent)
      && text(item.name) && STEP_STATUSES.includes(item.status)
      && textOrNull(item.input) && textOrNull(item.output))
    || (item.type === "note" && text(item.name) && text(item.text)
      && (item.seq === null || Number.isSafeInteger(item.seq))));
  entry.activity = Array.isArray(entry.activity) ? entry.activity.filter(valid) : [];
  entry.status = text(entry.status) ? entry.status : "";
  entry.queued = entry.queued === true;
}

function showStatus(element, entry) {
  let line = element.querySelector(":scope > .status-line");
  if (!entry.status) {
    if (line) line.remove();
    return;
  }
  if (!line) {
    line = document.createElement("div");
    line.className = "status-line";
    line.setAttribute("role", "status");
    element.querySelector(":scope > .body").after(line);
  }
  line.textContent = entry.status;
  line.classList.toggle("queued", Boolean(entry.queued));
}

function showStep(element, step) {
  let steps = drawn.get(element);
  if (!steps) drawn.set(element, (steps = new Map()));
  let details = steps.get(step.id);
  if (!details) {
    details = stepItem(step);
    steps.set(step.id, details);
    const parent = step.parent !== null ? steps.get(step.parent) : undefined;
    const into = parent && parent.querySelector(":scope > .step-detail > .step-children");
    (into || activityBox(element)).append(details);
  }
  details.dataset.status = step.status;
  const icon = details.querySelector(":scope > summary > .step-icon");
  icon.textContent = STEP_ICONS[step.status];
  icon.title = step.status;
  icon.setAttribute("aria-label", step.status);
  field(details, "step-input", step.input);
  field(details, "step-output", step.output);
}

function stepItem(step) {
  const details = document.createElement("details");
  details.className = "step";
  details.dataset.stepId = step.id;
  const summary = document.createElement("summary");
  const icon = document.createElement("span");
  icon.className = "step-icon";
  icon.setAttribute("role", "img");
  const name = document.createElement("span");
  name.className = "step-name";
  name.textContent = step.name;
  summary.append(icon, name);
  const detail = document.createElement("div");
  detail.className = "step-detail";
  const children = document.createElement("div");
  children.className = "step-children";
  detail.append(fieldBox("step-input", "input"), children, fieldBox("step-output", "output"));
  details.append(summary, detail);
  return details;
}

function fieldBox(className, label) {
  const box = document.createElement("div");
  box.className = `step-field ${className}`;
  box.hidden = true;
  const name = document.createElement("span");
  name.className = "step-label";
  name.textContent = label;
  box.append(name, document.createElement("pre"));
  return box;
}

function field(details, className, value) {
  const box = details.querySelector(`:scope > .step-detail > .${className}`);
  box.hidden = value === null;
  box.querySelector("pre").textContent = value ?? "";
}

function noteLine(note) {
  const line = document.createElement("div");
  line.className = "event-note";
  const name = document.createElement("span");
  name.className = "event-name";
  name.textContent = note.name;
  const data = document.createElement("span");
  data.textContent = note.text;
  line.append(name, document.createTextNode(" "), data);
  return line;
}

function activityBox(element) {
  let box = element.querySelector(":scope > .activity");
  if (!box) {
    box = document.createElement("div");
    box.className = "activity";
    element.querySelector(":scope > .body").before(box);
  }
  return box;
}

/** A value a model sent, as text: a string as it is, anything else as JSON; at most
 * `limit` characters. */
function shown(value, limit, indent = 2) {
  let text = typeof value === "string" ? value : JSON.stringify(value, null, indent);
  if (text === undefined) text = String(value);
  if (text.length > limit) text = `${text.slice(0, limit)}… (${text.length - limit} more characters)`;
  return text;
}

function oneLine(text) {
  return text.replace(/\s+/g, " ").trim();
}
