// ANSI escape sequences to styled DOM text. Text only ever reaches the page through text nodes
// (never parsed as HTML), so a command's output cannot inject markup. SGR (colours, bold, ...) is
// rendered; every other control sequence is dropped. A sequence split across chunks is carried.

const ESC = '\x1b';

function defaultStyle() {
  return { bold: false, dim: false, italic: false, underline: false, fg: null, bg: null };
}

// xterm's 256-colour cube and grey ramp, for `38;5;n` / `48;5;n` past the first 16.
function palette256(n) {
  if (n >= 232) {
    const v = 8 + (n - 232) * 10;
    return `rgb(${v},${v},${v})`;
  }
  const i = n - 16;
  const level = (c) => (c === 0 ? 0 : 55 + c * 40);
  return `rgb(${level(Math.floor(i / 36))},${level(Math.floor(i / 6) % 6)},${level(i % 6)})`;
}

/** Applies SGR parameters to a style; returns the new style. */
export function applySgr(style, params) {
  const s = { ...style };
  const codes = params === '' ? [0] : params.split(';').map((p) => (p === '' ? 0 : Number(p)));
  for (let i = 0; i < codes.length; i++) {
    const c = codes[i];
    if (c === 0) Object.assign(s, defaultStyle());
    else if (c === 1) s.bold = true;
    else if (c === 2) s.dim = true;
    else if (c === 3) s.italic = true;
    else if (c === 4) s.underline = true;
    else if (c === 22) { s.bold = false; s.dim = false; }
    else if (c === 23) s.italic = false;
    else if (c === 24) s.underline = false;
    else if (c >= 30 && c <= 37) s.fg = c - 30;
    else if (c >= 90 && c <= 97) s.fg = c - 90 + 8;
    else if (c === 39) s.fg = null;
    else if (c >= 40 && c <= 47) s.bg = c - 40;
    else if (c >= 100 && c <= 107) s.bg = c - 100 + 8;
    else if (c === 49) s.bg = null;
    else if (c === 38 || c === 48) {
      let colour = null;
      if (codes[i + 1] === 5 && Number.isInteger(codes[i + 2])) {
        const n = codes[i + 2];
        colour = n < 16 ? n : palette256(Math.min(n, 255));
        i += 2;
      } else if (codes[i + 1] === 2 && codes.length >= i + 5) {
        const [r, g, b] = codes.slice(i + 2, i + 5).map((v) => Math.max(0, Math.min(255, v | 0)));
        colour = `rgb(${r},${g},${b})`;
        i += 4;
      }
      if (colour !== null) {
        if (c === 38) s.fg = colour;
        else s.bg = colour;
      }
    }
  }
  return s;
}

/**
 * Splits text into styled runs, keeping an incomplete escape sequence for the next call.
 * Returns { runs: [{ text, style }], style, rest }.
 */
export function parseAnsi(text, style) {
  const runs = [];
  let current = style;
  let plain = '';
  let i = 0;
  const flush = () => {
    if (plain) runs.push({ text: plain, style: current });
    plain = '';
  };
  while (i < text.length) {
    const at = text.indexOf(ESC, i);
    if (at === -1) {
      plain += text.slice(i);
      break;
    }
    plain += text.slice(i, at);
    if (at + 1 >= text.length) return { runs: (flush(), runs), style: current, rest: text.slice(at) };
    const kind = text[at + 1];
    if (kind === '[') {
      // CSI: parameters and intermediates, then one final byte in @-~.
      let end = at + 2;
      while (end < text.length && !(text.charCodeAt(end) >= 0x40 && text.charCodeAt(end) <= 0x7e)) end++;
      if (end >= text.length) return { runs: (flush(), runs), style: current, rest: text.slice(at) };
      if (text[end] === 'm') {
        flush();
        current = applySgr(current, text.slice(at + 2, end));
      }
      i = end + 1;
    } else if (kind === ']') {
      // OSC (titles, hyperlinks): up to BEL or ESC \. Dropped.
      const bel = text.indexOf('\x07', at + 2);
      const st = text.indexOf(ESC + '\\', at + 2);
      const ends = [bel === -1 ? Infinity : bel + 1, st === -1 ? Infinity : st + 2];
      const end = Math.min(...ends);
      if (end === Infinity) return { runs: (flush(), runs), style: current, rest: text.slice(at) };
      i = end;
    } else {
      i = at + 2; // a two-byte escape: dropped
    }
  }
  flush();
  return { runs, style: current, rest: '' };
}

function styleKey(style) {
  return `${style.bold}|${style.dim}|${style.italic}|${style.underline}|${style.fg}|${style.bg}`;
}

/** Appends one stream's output (stdout or stderr) to a shared element, styled. */
export class AnsiWriter {
  constructor(target, streamClass) {
    this.target = target;
    this.streamClass = streamClass;
    this.style = defaultStyle();
    this.rest = '';
  }

  write(text) {
    const parsed = parseAnsi(this.rest + text, this.style);
    this.style = parsed.style;
    this.rest = parsed.rest;
    for (const run of parsed.runs) this.append(run.text, run.style);
  }

  append(text, style) {
    const key = `${this.streamClass}|${styleKey(style)}`;
    const last = this.target.lastChild;
    if (last && last.dataset && last.dataset.key === key) {
      last.firstChild.appendData(text);
      return;
    }
    const span = document.createElement('span');
    span.dataset.key = key;
    span.className = this.streamClass;
    if (style.bold) span.classList.add('ansi-bold');
    if (style.dim) span.classList.add('ansi-dim');
    if (style.italic) span.classList.add('ansi-italic');
    if (style.underline) span.classList.add('ansi-underline');
    if (typeof style.fg === 'number') span.classList.add(`ansi-fg-${style.fg}`);
    else if (style.fg) span.style.color = style.fg;
    if (typeof style.bg === 'number') span.classList.add(`ansi-bg-${style.bg}`);
    else if (style.bg) span.style.backgroundColor = style.bg;
    span.appendChild(document.createTextNode(text));
    this.target.appendChild(span);
  }
}
