// The metering SDK for realtime gateways in Node.js (the Python SDK, metering/gateway/sdk.py,
// is the reference; docs/redis-keys.md the protocol).
export { Meter } from './meter.js';
export { DatacenterStore } from './store.js';
export { Scripts, ScriptError, defaultScripts } from './scripts.js';
export { AppRegistry, RegistryUnavailable, validAppId, MAX_APP_ID_LENGTH } from './registry.js';
export {
  Admission,
  CHECK,
  GlobalLive,
  CHANNELS_EXCEEDED,
  CONNECTIONS_EXCEEDED,
  MESSAGES_EXCEEDED,
  UNAVAILABLE,
  decodeRow,
  secondsToMonthEnd,
} from './admission.js';
export {
  EMBEDDED_REDIS_URL,
  KNOWN,
  LUA_DIR_VARIABLE,
  SettingsError,
  datacenterUrl,
  datacenterUrls,
  defaultLuaDir,
  loadSettings,
  pyRepr,
} from './settings.js';
export { createClient, ready } from './redis.js';
export { createLogger, defaultLogger } from './log.js';
export * from './keys.js';
export * as pyjson from './pyjson.js';
