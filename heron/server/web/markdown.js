// Markdown to DOM for untrusted text (model output). Safety by construction: every piece of
// text becomes a Text node or textContent; nothing is ever parsed as HTML; the only attribute
// taken from the input is a link's href, and only for http(s) and mailto URLs.
// Covers what chat models write: fenced code, headings, lists, quotes, tables, rules,
// paragraphs; inline code, bold, italic, strikethrough, links and bare URLs. An unclosed fence
// (an answer still streaming) renders as code up to the end.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

/** Render `text` as a DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

function el(tag, parent, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    const step = [fence, heading, rule, quote, list, table].map((f) => f(lines, i, parent))
      .find((next) => next !== undefined);
    i = step !== undefined ? step : paragraph(lines, i, parent);
  }
}

function fence(lines, i, parent) {
  const m = FENCE.exec(lines[i]);
  if (!m) return undefined;
  let end = i + 1;
  const close = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}\\s*$`);
  while (end < lines.length && !close.test(lines[end])) end++;
  const pre = el("pre", parent);
  const code = el("code", pre, lines.slice(i + 1, end).join("\n"));
  if (m[2]) {
    code.className = "language-" + m[2].replace(/[^\w-]/g, "");
    pre.dataset.lang = m[2];
  }
  return end + 1;
}

function heading(lines, i, parent) {
  const m = HEADING.exec(lines[i]);
  if (!m) return undefined;
  renderInline(m[2], el("h" + Math.min(m[1].length + 2, 6), parent));
  return i + 1;
}

function rule(lines, i, parent) {
  if (!RULE.test(lines[i])) return undefined;
  el("hr", parent);
  return i + 1;
}

function quote(lines, i, parent) {
  if (!QUOTE.test(lines[i])) return undefined;
  const inner = [];
  while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
  renderBlocks(inner, el("blockquote", parent));
  return i;
}

function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  if (!first) return undefined;
  const ordered = /\d/.test(first[2]);
  const indent = first[1].length;
  const node = el(ordered ? "ol" : "ul", parent);
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  const items = [];  // [{offset: where its text starts, lines: [...]}]
  for (; i < lines.length; i++) {
    const line = lines[i];
    const m = ITEM.exec(line);
    const depth = line.length - line.trimStart().length;
    const last = items[items.length - 1];
    if (m && depth === indent && /\d/.test(m[2]) === ordered) {
      items.push({ offset: m[0].length, lines: [line.slice(m[0].length)] });
    } else if (!line.trim()) {
      if (!continuesList(lines[i + 1], indent, ordered)) break;
      last.lines.push("");
    } else if (depth > indent || (!startsBlock(lines, i) && lines[i - 1].trim())) {
      last.lines.push(line.slice(Math.min(depth, last.offset)));
    } else {
      break;
    }
  }
  for (const item of items) renderBlocks(item.lines, el("li", node));
  return i;
}

/** After a blank line, does `next` still belong to the list (indented, or a sibling item)? */
function continuesList(next, indent, ordered) {
  if (next === undefined || !next.trim()) return false;
  const depth = next.length - next.trimStart().length;
  const m = ITEM.exec(next);
  return depth > indent || (m !== null && depth === indent && /\d/.test(m[2]) === ordered);
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines, i, parent) {
  if (!lines[i].includes("|") || i + 1 >= lines.length || !TABLE_SEP.test(lines[i + 1])) {
    return undefined;
  }
  if (!lines[i + 1].includes("|") && !lines[i + 1].includes("-")) return undefined;
  const head = splitRow(lines[i]);
  const node = el("table", parent);
  const headRow = el("tr", el("thead", node));
  for (const cell of head) renderInline(cell, el("th", headRow));
  const body = el("tbody", node);
  i += 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = el("tr", body);
    const cells = splitRow(lines[i++]);
    for (let c = 0; c < head.length; c++) renderInline(cells[c] || "", el("td", row));
  }
  return i;
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
    || ITEM.test(line) || (line.includes("|") && TABLE_SEP.test(lines[i + 1] || "x"));
}

function paragraph(lines, i, parent) {
  const p = el("p", parent);
  let first = true;
  do {
    if (!first) el("br", p);
    renderInline(lines[i].trim(), p);
    first = false;
    i++;
  } while (i < lines.length && lines[i].trim() && !startsBlock(lines, i));
  return i;
}

// ---- inline --------------------------------------------------------------------------------

const INLINE = [
  { re: /(`+)([\s\S]*?[^`])\1(?!`)/, make: (m, parent) => el("code", parent, m[2].trim() || m[2]) },
  { re: /\[([^\]\n]+)\]\(\s*<?([^\s()<>]*(?:\([^\s()<>]*\))?[^\s()<>]*)>?(?:\s+"[^"]*")?\s*\)/,
    make: (m, parent) => link(m[1], m[2], parent) },
  { re: /\b(https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]}])/, make: (m, parent) => link(m[1], m[1], parent, true) },
  { re: /(\*\*|__)(?=\S)([\s\S]*?\S)\1/, make: (m, parent) => renderInline(m[2], el("strong", parent)) },
  { re: /~~(?=\S)([\s\S]*?\S)~~/, make: (m, parent) => renderInline(m[1], el("del", parent)) },
  { re: /(?<![\w*])\*(?=[^\s*])([^*]*?[^\s*])\*(?![\w*])/,
    make: (m, parent) => renderInline(m[1], el("em", parent)) },
  { re: /(?<![\w_])_(?=[^\s_])([^_]*?[^\s_])_(?![\w_])/,
    make: (m, parent) => renderInline(m[1], el("em", parent)) },
];

function renderInline(text, parent) {
  while (text) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(text);
      if (m && (best === null || m.index < best.m.index)) best = { m, rule };
    }
    if (best === null) {
      parent.appendChild(document.createTextNode(unescape(text)));
      return parent;
    }
    if (best.m.index > 0) {
      parent.appendChild(document.createTextNode(unescape(text.slice(0, best.m.index))));
    }
    best.rule.make(best.m, parent);
    text = text.slice(best.m.index + best.m[0].length);
  }
  return parent;
}

function unescape(text) {
  return text.replace(/\\([\\`*_{}[\]()#+\-.!|~>])/g, "$1");
}

/** A link for http(s) and mailto URLs; anything else (javascript:, data:...) stays text. */
function link(label, href, parent, bare = false) {
  let url = null;
  try {
    url = new URL(href, document.baseURI);
  } catch {
    url = null;
  }
  if (url === null || !SAFE_PROTOCOLS.has(url.protocol) || !/^(https?|mailto):/i.test(href)) {
    parent.appendChild(document.createTextNode(bare ? label : `[${label}](${href})`));
    return;
  }
  const a = el("a", parent);
  a.href = url.href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  if (bare) a.textContent = label;
  else renderInline(label, a);
}
