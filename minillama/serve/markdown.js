// minillama's Markdown renderer for the chat page: a small subset (fenced code, inline code, headings, lists,
// quotes, bold, italic, links), written for this page and served by it (no CDN). Safe by construction: the text is
// HTML-escaped first and only the tags made here are emitted; links must be http(s).
// The separators between blocks are kept as text (the page renders with white-space: pre-wrap), so the rendered
// text reads like the raw answer minus the Markdown marks, also while an answer is still streaming in.
"use strict";

const MD_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};

function mdEscape(s) {
  return s.replace(/[&<>"']/g, (c) => MD_ESCAPES[c]);
}

function mdInline(s) {
  // s is escaped; code spans are cut out first so their contents are not formatted
  const codes = [];
  s = s.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
       .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
       .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
       .replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>")
       .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
}

function mdBlock(lines) {
  // one block of non-blank lines (escaped) -> html
  const first = lines[0];
  let m;
  if ((m = first.match(/^(#{1,6}) +(.*)$/)) && lines.length === 1) {
    return "<h" + m[1].length + ">" + mdInline(m[2]) + "</h" + m[1].length + ">";
  }
  if (lines.every((l) => /^&gt; ?/.test(l))) {
    return "<blockquote>" + mdInline(lines.map((l) => l.replace(/^&gt; ?/, "")).join("\n")) + "</blockquote>";
  }
  const bullet = /^\s*[-*+] +/, number = /^\s*\d+[.)] +/;
  for (const [re, tag] of [[bullet, "ul"], [number, "ol"]]) {
    if (re.test(first)) {
      const items = [];
      for (const l of lines) {
        if (re.test(l)) items.push(l.replace(re, ""));
        else if (items.length) items[items.length - 1] += "\n" + l.trim();
      }
      return "<" + tag + ">" + items.map((it) => "<li>" + mdInline(it) + "</li>").join("\n") + "</" + tag + ">";
    }
  }
  return "<p>" + mdInline(lines.join("\n")) + "</p>";
}

function renderMarkdown(text) {
  if (!text) return "";
  const out = [];
  const lines = mdEscape(text).split("\n");
  let i = 0, para = [];
  const flush = () => { if (para.length) { out.push(mdBlock(para)); para = []; } };
  while (i < lines.length) {
    const fence = lines[i].match(/^\s*```\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
      i++;  // the closing fence (absent while the answer is still streaming)
      const lang = fence[1] ? ' data-lang="' + fence[1] + '"' : "";
      out.push('<pre class="code"' + lang + "><code>" + body.join("\n") + "</code></pre>");
      continue;
    }
    if (lines[i].trim() === "") {
      flush();
      out.push("\n");
    } else {
      para.push(lines[i]);
    }
    i++;
  }
  flush();
  return out.join("");
}
