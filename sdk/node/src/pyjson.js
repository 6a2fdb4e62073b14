// JSON as the Python gateway reads and writes it, so that frames, replies and message sizes are
// byte for byte the same: json.loads (strict, the C scanner) and
// json.dumps(value, separators=(",", ":"), ensure_ascii=False).
//
// JSON.parse/JSON.stringify differ from Python where it shows on the wire: Python keeps
// integers exact (12345678901234567890) and writes floats with repr (1.0, 1e+16, 1e-05),
// keeps the order of keys that look like integers, and leaves a lone surrogate unescaped
// (then refuses it as not UTF-8). So parsed numbers keep their Python text, objects are Maps.

/** Python's float.__repr__ of a JS number (shortest round trip, Python's layout). */
export function pyFloatRepr(x) {
  if (x === Infinity) return 'Infinity'; // what json.dumps writes for float('1e400')
  if (x === -Infinity) return '-Infinity';
  if (Number.isNaN(x)) return 'NaN';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mantissa, exponent] = x.toExponential().split('e');
  const exp = Number(exponent);
  const sign = mantissa.startsWith('-') ? '-' : '';
  const digits = mantissa.replace('-', '').replace('.', '');
  if (exp >= -4 && exp < 16) {
    if (exp < 0) return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`;
    const whole = digits.slice(0, exp + 1).padEnd(exp + 1, '0');
    return `${sign}${whole}.${digits.slice(exp + 1) || '0'}`;
  }
  const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
}

/** A JSON number as Python holds it: `text` is what json.dumps writes for it. */
export class PyNumber {
  constructor(text, isFloat) {
    this.text = text;
    this.isFloat = isFloat;
  }

  valueOf() {
    return Number(this.text);
  }
}

export class JSONError extends Error {}

// Python's int() refuses strings of more digits (sys.get_int_max_str_digits(), 3.11+): json
// then raises ValueError, which the gateway answers as malformed JSON.
const MAX_INT_DIGITS = 4300;
// The Python gateway's parser runs out of recursion (then answers malformed JSON) past this
// many nested arrays and objects in a WebSocket frame (sys.getrecursionlimit() 1000, less the
// stack under it); the same bound here, for every input.
export const MAX_DEPTH = 971;

const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/y;
const WS = /[ \t\n\r]*/y;
const PLAIN = /[^"\\\x00-\x1f]*/y;
const HEX4 = /^[0-9a-fA-F]{4}$/;
const SHORT = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };

/** Parse `text` as Python's json.loads does; throws JSONError where Python raises. */
export function parse(text) {
  let i = 0;
  let depth = 0;
  const fail = (what) => {
    throw new JSONError(`${what} at ${i}`);
  };
  const ws = () => {
    WS.lastIndex = i;
    WS.exec(text);
    i = WS.lastIndex;
  };
  const string = () => {
    i += 1; // the opening quote
    let out = '';
    for (;;) {
      PLAIN.lastIndex = i;
      PLAIN.exec(text);
      out += text.slice(i, PLAIN.lastIndex);
      i = PLAIN.lastIndex;
      const c = text[i];
      if (c === '"') {
        i += 1;
        return out;
      }
      if (c !== '\\') fail(c === undefined ? 'unterminated string' : 'invalid control character');
      const e = text[i + 1];
      if (e === 'u') {
        const hex = text.slice(i + 2, i + 6);
        if (!HEX4.test(hex)) fail('invalid \\uXXXX escape');
        out += String.fromCharCode(Number.parseInt(hex, 16)); // a pair joins by itself
        i += 6;
      } else if (e !== undefined && Object.hasOwn(SHORT, e)) {
        out += SHORT[e];
        i += 2;
      } else {
        fail('invalid escape');
      }
    }
  };
  const value = () => {
    const c = text[i];
    if (c === '"') return string();
    if (c === '{' || c === '[') {
      depth += 1;
      if (depth > MAX_DEPTH) fail('too deeply nested');
      const v = c === '{' ? object() : array();
      depth -= 1;
      return v;
    }
    if (c === 'n' && text.startsWith('null', i)) return (i += 4), null;
    if (c === 't' && text.startsWith('true', i)) return (i += 4), true;
    if (c === 'f' && text.startsWith('false', i)) return (i += 5), false;
    NUMBER.lastIndex = i;
    const m = NUMBER.exec(text);
    if (m === null) fail('expecting value');
    i = NUMBER.lastIndex;
    if (m[1] === undefined && m[2] === undefined) {
      const digits = m[0].startsWith('-') ? m[0].length - 1 : m[0].length;
      if (digits > MAX_INT_DIGITS) fail('integer too long');
      return new PyNumber(digits > 15 ? BigInt(m[0]).toString() : String(Number(m[0]) || 0), false);
    }
    return new PyNumber(pyFloatRepr(Number(m[0])), true);
  };
  const array = () => {
    i += 1;
    const out = [];
    ws();
    if (text[i] === ']') return (i += 1), out;
    for (;;) {
      ws();
      out.push(value());
      ws();
      if (text[i] === ',') i += 1;
      else if (text[i] === ']') return (i += 1), out;
      else fail("expecting ',' delimiter");
    }
  };
  const object = () => {
    i += 1;
    const out = new Map();
    ws();
    if (text[i] === '}') return (i += 1), out;
    for (;;) {
      ws();
      if (text[i] !== '"') fail('expecting property name enclosed in double quotes');
      const key = string();
      ws();
      if (text[i] !== ':') fail("expecting ':' delimiter");
      i += 1;
      ws();
      out.set(key, value()); // a repeated key keeps its first place and its last value
      ws();
      if (text[i] === ',') i += 1;
      else if (text[i] === '}') return (i += 1), out;
      else fail("expecting ',' delimiter");
    }
  };
  ws();
  const v = value();
  ws();
  if (i !== text.length) fail('extra data');
  return v;
}

const ESCAPES = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' };
const NEEDS_ESCAPE = /["\\\x00-\x1f]/g;

function escapeChar(c) {
  return ESCAPES[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
}

/** A JSON string as Python writes it with ensure_ascii=False (lone surrogates left as they are). */
export function encodeString(s) {
  return `"${s.replace(NEEDS_ESCAPE, escapeChar)}"`;
}

/** json.dumps(value, separators=(",", ":"), ensure_ascii=False) of a parsed or plain value. */
export function encode(value) {
  if (value === null || value === undefined) return 'null';
  if (value === true) return 'true';
  if (value === false) return 'false';
  if (typeof value === 'string') return encodeString(value);
  if (value instanceof PyNumber) return value.text;
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : pyFloatRepr(value);
  if (typeof value === 'bigint') return value.toString();
  if (Array.isArray(value)) return `[${value.map(encode).join(',')}]`;
  const entries = value instanceof Map ? [...value] : Object.entries(value);
  return `{${entries.map(([k, v]) => `${encodeString(k)}:${encode(v)}`).join(',')}}`;
}

/** Whether `s` holds a lone surrogate: Python cannot encode it as UTF-8. */
export function hasLoneSurrogate(s) {
  return /\p{Surrogate}/u.test(s);
}

const BOM_UTF8 = [0xef, 0xbb, 0xbf];

function startsWith(b, bytes) {
  return bytes.every((x, k) => b[k] === x);
}

function utf32(b, littleEndian) {
  if (b.length % 4 !== 0) throw new JSONError('truncated UTF-32');
  let out = '';
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (let k = 0; k < b.length; k += 4) {
    const cp = view.getUint32(k, littleEndian);
    if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) throw new JSONError('invalid UTF-32');
    out += String.fromCodePoint(cp);
  }
  return out;
}

function decoded(b, encoding, skip = 0) {
  return new TextDecoder(encoding, { fatal: true, ignoreBOM: true }).decode(b.subarray(skip));
}

/** The text of a request body as json.loads(bytes) reads it: UTF-8, 16 or 32, found by its BOM
 * or its zero bytes (json.detect_encoding). Throws JSONError where Python cannot decode it. */
export function decodeBody(b) {
  try {
    if (startsWith(b, [0, 0, 0xfe, 0xff])) return utf32(b.subarray(4), false);
    if (startsWith(b, [0xff, 0xfe, 0, 0])) return utf32(b.subarray(4), true);
    if (startsWith(b, [0xfe, 0xff])) return decoded(b, 'utf-16be', 2);
    if (startsWith(b, [0xff, 0xfe])) return decoded(b, 'utf-16le', 2);
    if (startsWith(b, BOM_UTF8)) return decoded(b, 'utf-8', 3);
    if (b.length >= 4) {
      if (!b[0]) return b[1] ? decoded(b, 'utf-16be') : utf32(b, false);
      if (!b[1]) return b[2] || b[3] ? decoded(b, 'utf-16le') : utf32(b, true);
    } else if (b.length === 2) {
      if (!b[0]) return decoded(b, 'utf-16be');
      if (!b[1]) return decoded(b, 'utf-16le');
    }
    return decoded(b, 'utf-8');
  } catch (err) {
    if (err instanceof JSONError) throw err;
    throw new JSONError(`cannot decode: ${err.message}`);
  }
}

/** Python's len() of a str: code points, not UTF-16 units. */
export function pyLen(s) {
  let n = s.length;
  for (let k = 0; k < s.length; k++) {
    const c = s.charCodeAt(k);
    if (c >= 0xd800 && c <= 0xdbff) {
      const d = s.charCodeAt(k + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n -= 1;
        k += 1;
      }
    }
  }
  return n;
}

/** Python's s[:n]: the first n code points. */
export function pySlice(s, n) {
  if (s.length <= n) return s;
  let units = 0;
  for (let count = 0; count < n && units < s.length; count++) {
    const c = s.charCodeAt(units);
    const d = s.charCodeAt(units + 1);
    units += c >= 0xd800 && c <= 0xdbff && d >= 0xdc00 && d <= 0xdfff ? 2 : 1;
  }
  return s.slice(0, units);
}
