// Structured key-value logs on stderr, in the shape of the Python side's structlog console
// renderer (or one JSON object a line), so operators read both kinds of gateway alike.

const LEVELS = { debug: 10, info: 20, warning: 30, error: 40, critical: 50 };

function show(value) {
  if (typeof value !== 'string') return typeof value === 'object' ? JSON.stringify(value) : String(value);
  // As structlog: a plain word as it is, anything with spaces, quotes or '=' quoted.
  return /[\s="']/.test(value) ? `'${value.replaceAll('\\', '\\\\').replaceAll("'", "\\'")}'` : value;
}

function timestamp() {
  return new Date().toISOString().replace(/\.(\d{3})Z$/, '.$1000Z');
}

/** A logger writing `event key=value ...` lines at `level` and above. */
export function createLogger({ level = 'INFO', json = false, write } = {}) {
  const threshold = LEVELS[String(level).toLowerCase()] ?? LEVELS.info;
  const out = write ?? ((line) => process.stderr.write(`${line}\n`));
  const emit = (name) => (event, fields = {}) => {
    if (LEVELS[name] < threshold) return;
    if (json) {
      out(JSON.stringify({ ...fields, event, level: name, timestamp: timestamp() }));
      return;
    }
    const pairs = Object.keys(fields).sort().map((k) => `${k}=${show(fields[k])}`);
    out(`${timestamp()} [${name.padEnd(9)}] ${event.padEnd(30)} ${pairs.join(' ')}`.trimEnd());
  };
  return {
    debug: emit('debug'),
    info: emit('info'),
    warning: emit('warning'),
    error: emit('error'),
  };
}

/** The logger used when none is given: warnings and errors only, like a library should. */
export const defaultLogger = createLogger({ level: 'WARNING' });
