// Settings from the same METERING_* environment variables as metering/core/settings.py, under
// the same names, defaults and checks, for the ones a gateway reads. The Python class is the
// reference: tests/conformance checks that KNOWN below lists exactly its fields.

/** Every field of the Python Settings class (an unknown METERING_* variable is an error). */
export const KNOWN = Object.freeze([
  'database_url', 'redis_url', 'datacenter', 'datacenters', 'redis_prefix',
  'liveness_timeout', 'flush_interval', 'flush_min_interval', 'tick_interval',
  'sample_retention', 'registry_refresh_interval', 'aggregate_interval',
  'aggregate_max_samples', 'retention_minute', 'retention_hour', 'retention_day',
  'retention_month', 'retention_interval', 'billing_grace', 'billing_close_interval',
  'key_cache_ttl', 'count_cache_ttl', 'api_host', 'api_port', 'gateway_host', 'gateway_port',
  'gateway_frontend_id', 'gateway_ws_ping_interval', 'gateway_ws_ping_timeout',
  'max_message_bytes', 'max_channel_length', 'max_channels_per_connection',
  'limits_refresh_interval', 'alert_webhook_url', 'alert_webhook_secret',
  'alert_webhook_timeout', 'smtp_host', 'smtp_port', 'smtp_starttls', 'smtp_username',
  'smtp_password', 'smtp_timeout', 'alert_email_from', 'alert_email_to', 'alert_max_attempts',
  'alert_retry_base', 'alert_retry_max', 'alert_sweep_interval', 'admission_fail_open',
  'admission_refresh_interval', 'admission_stale_after', 'log_level', 'log_json',
]);

export const EMBEDDED_REDIS_URL = 'memory://';
// Variables of the test suite and tooling, not of the engine (as in settings.py).
const TEST_VARS = 'METERING_TEST_';
// Not a METERING_* name: the Python side would reject it as an unknown setting.
export const LUA_DIR_VARIABLE = 'NODE_METERING_LUA_DIR';

/** A setting that cannot be read; `message` is the line the Python CLI would print. */
export class SettingsError extends Error {}

/** Python's repr() of a str, for messages worded as the Python side words them. */
export function pyRepr(value) {
  const quote = value.includes("'") && !value.includes('"') ? '"' : "'";
  const escaped = value.replaceAll('\\', '\\\\').replaceAll('\n', '\\n').replaceAll('\r', '\\r')
    .replaceAll('\t', '\\t');
  return quote + (quote === "'" ? escaped.replaceAll("'", "\\'") : escaped) + quote;
}

// float() of Python: digits with underscores, an optional fraction and exponent, spaces around.
const PY_FLOAT = /^\s*[+-]?(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][+-]?\d(?:_?\d)*)?\s*$/;
const ISO_DURATION =
  /^P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$/i;

function invalid(name, message) {
  return new SettingsError(`invalid setting METERING_${name.toUpperCase()}: ${message}`);
}

/** A duration in milliseconds: seconds (`0.25`) or ISO 8601 (`PT3S`); null for empty. */
function duration(name, raw) {
  if (!raw.trim()) return null;
  if (PY_FLOAT.test(raw)) return Number(raw.replaceAll('_', '')) * 1000;
  const m = ISO_DURATION.exec(raw.trim());
  if (m && raw.trim().toUpperCase() !== 'P' && !raw.trim().toUpperCase().endsWith('T')) {
    const [w, d, h, min, s] = m.slice(1).map((x) => Number(x ?? 0));
    return ((((w * 7 + d) * 24 + h) * 60 + min) * 60 + s) * 1000;
  }
  throw invalid(name, 'Input should be a valid timedelta, invalid duration format');
}

function integer(name, raw) {
  if (!/^\s*[+-]?\d+\s*$/.test(raw)) {
    throw invalid(name, 'Input should be a valid integer, unable to parse string as an integer');
  }
  return Number.parseInt(raw, 10);
}

const TRUE = new Set(['1', 'on', 't', 'true', 'y', 'yes']);
const FALSE = new Set(['0', 'off', 'f', 'false', 'n', 'no']);

function boolean(name, raw) {
  const v = raw.trim().toLowerCase();
  if (TRUE.has(v)) return true;
  if (FALSE.has(v)) return false;
  throw invalid(name, 'Input should be a valid boolean, unable to interpret input');
}

// Prefixes and datacenter names go inside a Redis Cluster hash tag, where braces and ':'
// would change the slot.
function hashTagSafe(value) {
  if (!value || /[{}: ]/.test(value)) {
    throw new Error(`${pyRepr(value)} must be non-empty, without braces, colons or spaces`);
  }
  return value;
}

function datacenterPairs(raw) {
  const pairs = {};
  for (const part of raw.split(',').map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf('=');
    const name = at < 0 ? '' : part.slice(0, at).trim();
    const url = at < 0 ? '' : part.slice(at + 1).trim();
    if (at < 0 || !name || !url) {
      throw new Error(`expected dc=url pairs separated by commas, got ${pyRepr(part)}`);
    }
    pairs[hashTagSafe(name)] = url;
  }
  return pairs;
}

const POSITIVE = [
  'livenessTimeout', 'flushInterval', 'flushMinInterval', 'admissionRefreshInterval',
  'admissionStaleAfter', 'gatewayWsPingInterval', 'gatewayWsPingTimeout',
];

/**
 * The settings a gateway reads, from `env` (default: process.env). Durations are in
 * milliseconds (`...Ms`). Throws SettingsError with the message the Python CLI prints.
 */
export function loadSettings(env = process.env) {
  const known = new Set(KNOWN.map((f) => `METERING_${f.toUpperCase()}`));
  const unknown = Object.keys(env)
    .filter((k) => k.startsWith('METERING_') && !k.startsWith(TEST_VARS) && !known.has(k))
    .sort();
  if (unknown.length) {
    throw new SettingsError(`invalid settings: Value error, unknown setting ${unknown.join(', ')}`);
  }
  const read = (name, parse, fallback) => {
    const raw = env[`METERING_${name.toUpperCase()}`];
    if (raw === undefined) return fallback;
    try {
      return parse(name, raw);
    } catch (err) {
      if (err instanceof SettingsError) throw err;
      throw invalid(name, `Value error, ${err.message}`);
    }
  };
  const str = (_name, raw) => raw;
  const settings = {
    redisUrl: read('redis_url', str, EMBEDDED_REDIS_URL),
    datacenter: read('datacenter', (_n, raw) => hashTagSafe(raw), 'local'),
    datacenters: read('datacenters', (_n, raw) => datacenterPairs(raw), {}),
    redisPrefix: read('redis_prefix', (_n, raw) => hashTagSafe(raw), 'metering'),
    livenessTimeoutMs: read('liveness_timeout', duration, 3000),
    flushIntervalMs: read('flush_interval', duration, 250),
    flushMinIntervalMs: read('flush_min_interval', duration, 20),
    registryRefreshIntervalMs: read('registry_refresh_interval', duration, 30_000),
    gatewayHost: read('gateway_host', str, '127.0.0.1'),
    gatewayPort: read('gateway_port', integer, 8001),
    gatewayFrontendId: read('gateway_frontend_id', str, 'gw-1'),
    gatewayWsPingIntervalMs: read('gateway_ws_ping_interval', duration, 20_000),
    gatewayWsPingTimeoutMs: read('gateway_ws_ping_timeout', duration, 20_000),
    maxMessageBytes: read('max_message_bytes', integer, 64 * 1024),
    maxChannelLength: read('max_channel_length', integer, 256),
    maxChannelsPerConnection: read('max_channels_per_connection', integer, 200),
    admissionFailOpen: read('admission_fail_open', boolean, true),
    admissionRefreshIntervalMs: read('admission_refresh_interval', duration, 5000),
    admissionStaleAfterMs: read('admission_stale_after', duration, 15_000),
    logLevel: read('log_level', str, 'INFO'),
    logJson: read('log_json', boolean, false),
    luaDir: env[LUA_DIR_VARIABLE] || undefined,
  };
  for (const name of POSITIVE) {
    const value = settings[`${name}Ms`];
    const snake = name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    if (value === null) throw invalid(snake, 'Input should be a valid timedelta');
    if (!(value > 0)) throw new SettingsError(`invalid settings: Value error, ${snake} must be positive`);
  }
  if (settings.registryRefreshIntervalMs === null) {
    throw invalid('registry_refresh_interval', 'Input should be a valid timedelta');
  }
  if (settings.flushIntervalMs >= settings.livenessTimeoutMs) {
    throw new SettingsError(
      'invalid settings: Value error, flush_interval must be shorter than liveness_timeout',
    );
  }
  return Object.freeze(settings);
}

/** Each datacenter and its Redis URL; by default this one, in the primary Redis. */
export function datacenterUrls(settings) {
  return Object.keys(settings.datacenters).length
    ? { ...settings.datacenters }
    : { [settings.datacenter]: settings.redisUrl };
}

/**
 * The Redis of datacenter `name`; an error for one the engine does not read (counts written
 * to a datacenter missing here would be read by no tick and no API).
 */
export function datacenterUrl(settings, name) {
  const urls = datacenterUrls(settings);
  if (!Object.hasOwn(urls, name)) {
    throw new SettingsError(
      `datacenter ${pyRepr(name)} is not one the engine reads (${Object.keys(urls).sort().join(', ')}); ` +
        'set METERING_DATACENTER, or list it in METERING_DATACENTERS',
    );
  }
  return urls[name];
}

/** Where the engine's Lua scripts are: NODE_METERING_LUA_DIR, else this repository's. */
export function defaultLuaDir(env = process.env) {
  return env[LUA_DIR_VARIABLE] || new URL('../../../metering/live/lua/', import.meta.url);
}
