// Turns a model's reply (plain text with a little Markdown) into DOM nodes.
//
// Safety by construction: every piece of model output becomes a text node (textContent),
// never markup, so nothing a model yields can inject HTML or script. Links are made only
// for http(s) URLs, which are checked with the URL parser.
//
// Understood: ``` fenced code blocks (an unterminated fence, as while streaming, runs to
// the end), `inline code`, **bold**, and bare http(s) links. Everything else is text, with
// its line breaks and spacing kept (CSS white-space: pre-wrap).

const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(https?:\/\/[^\s<>"'`\]]+)/g;

/** Split text into [{kind: "text"|"code", text, lang}] on ``` fence lines. */
export function segments(text) {
  const out = [];
  let buffer = [];
  let code = null; // {lang, lines} while inside a fence
  for (const line of text.split("\n")) {
    const fence = line.match(FENCE);
    if (code === null && fence) {
      if (buffer.length) out.push({ kind: "text", text: buffer.join("\n") });
      buffer = [];
      code = { lang: fence[1], lines: [] };
    } else if (code !== null && fence && fence[1] === "") {
      out.push({ kind: "code", text: code.lines.join("\n"), lang: code.lang, open: false });
      code = null;
    } else if (code !== null) {
      code.lines.push(line);
    } else {
      buffer.push(line);
    }
  }
  if (code !== null) out.push({ kind: "code", text: code.lines.join("\n"), lang: code.lang, open: true });
  else if (buffer.length) out.push({ kind: "text", text: buffer.join("\n") });
  return out.filter((s) => s.kind === "code" || s.text !== "");
}

function inline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
    const [whole, code, bold, url] = match;
    if (code) {
      const el = document.createElement("code");
      el.textContent = code.slice(1, -1);
      nodes.push(el);
    } else if (bold) {
      const el = document.createElement("strong");
      el.textContent = bold.slice(2, -2);
      nodes.push(el);
    } else if (url) {
      const [href, trailing] = splitTrailing(url);
      nodes.push(link(href));
      if (trailing) nodes.push(document.createTextNode(trailing));
    }
    last = match.index + whole.length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

/** A URL's own characters and the punctuation after it: "(see https://x.y/a_(b))." keeps
 * the balanced ")" of the URL and leaves out the sentence's ")." */
function splitTrailing(url) {
  let end = url.length;
  for (;;) {
    const last = url[end - 1];
    if (".,;:!?".includes(last)) {
      end -= 1;
    } else if (last === ")") {
      const head = url.slice(0, end);
      if ((head.match(/\(/g) || []).length >= (head.match(/\)/g) || []).length) break;
      end -= 1;
    } else {
      break;
    }
  }
  return [url.slice(0, end), url.slice(end)];
}

function link(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    return document.createTextNode(url);
  }
  const web = parsed.protocol === "http:" || parsed.protocol === "https:";
  // "http://trusted.example@evil.example/" reads as one host and goes to another: text.
  if (!web || parsed.username || parsed.password) return document.createTextNode(url);
  const a = document.createElement("a");
  a.href = parsed.href;
  a.textContent = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}

function codeBlock(segment) {
  const figure = document.createElement("figure");
  figure.className = "code-block";
  const bar = document.createElement("figcaption");
  const lang = document.createElement("span");
  lang.textContent = segment.lang || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(segment.text, copy));
  bar.append(lang, copy);
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  code.textContent = segment.text;
  if (segment.lang) code.dataset.lang = segment.lang;
  pre.append(code);
  figure.append(bar, pre);
  return figure;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and copy";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

const rendered = new WeakMap(); // element -> [{key, node}] of its last rendering

/** Render `text` into `element`. Called again as a reply grows, it rebuilds only the parts
 * that changed (usually the last), so a selection or a Copy click elsewhere survives. */
export function renderReply(element, text) {
  const before = rendered.get(element) || [];
  const after = segments(text).map((segment, index) => {
    const key = [segment.kind, segment.lang, segment.open, segment.text].join("\u0000");
    if (before[index] && before[index].key === key) return before[index];
    return { key, node: segment.kind === "code" ? codeBlock(segment) : textBlock(segment.text) };
  });
  rendered.set(element, after);
  after.forEach(({ node }, index) => {
    const current = element.children[index];
    if (current === node) return;
    if (current) current.replaceWith(node);
    else element.append(node);
  });
  while (element.children.length > after.length) element.lastElementChild.remove();
}

function textBlock(text) {
  const block = document.createElement("div");
  block.className = "text";
  block.append(...inline(text));
  return block;
}

/** Plain text, as typed (user messages): no Markdown, just the characters. */
export function renderPlain(element, text) {
  const p = document.createElement("div");
  p.className = "text";
  p.textContent = text;
  element.replaceChildren(p);
}
