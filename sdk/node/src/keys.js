// Redis key names, in one place, mirroring metering/live/store.py (datacenter keys),
// metering/accounts/store.py (the app registry) and metering/limits/store.py (admission).
// docs/redis-keys.md documents the layout; keep the three in step.
//
// A datacenter's keys share the hash tag `{<prefix>:<dc>}` and the global keys `{<prefix>}`,
// so each group sits in one Redis Cluster slot and every script is atomic.

/** Transport names (as the Python SDK's `Transport`) and their one-letter codes in fields. */
export const TRANSPORT_CODES = Object.freeze({ websocket: 'w', streaming: 's', long_poll: 'l' });

/** The cumulative counters per app, in the order of every packed value. */
export const COUNTERS = Object.freeze([
  'opened', 'refused', 'pub_n', 'pub_b', 'del_n', 'del_b', 'ch_refused', 'msg_refused',
]);
export const COUNTERS_PER_APP = COUNTERS.length;

export const FLUSH_OK = 'ok';
export const FLUSH_REPLACED = 'replaced';
export const FLUSH_UNKNOWN = 'unknown';
export const FLUSH_SUPERSEDED = 'superseded';

// The notices published on the admission channel (metering/limits/store.py).
export const LIMITS_NOTICE = 'limits';
export const LIVE_NOTICE = 'live';
export const CHECK_NOTICE = 'check';

/** `{<prefix>:<dc>}`: KEYS[1] of every datacenter script. */
export function datacenterBase(prefix, datacenter) {
  return `{${prefix}:${datacenter}}`;
}

/** `{<prefix>}`: the group of the global keys. */
export function globalBase(prefix) {
  return `{${prefix}}`;
}

/** A datacenter's keys (`DatacenterStore.key` in store.py). */
export function datacenterKeys(prefix, datacenter) {
  const base = datacenterBase(prefix, datacenter);
  return Object.freeze({
    base,
    frontends: `${base}:frontends`,
    frontendIds: `${base}:frontend-ids`,
    conns: (code) => `${base}:conns:${code}`,
    channels: `${base}:channels`,
    changesApps: `${base}:changes:apps`,
    changesChannels: `${base}:changes:channels`,
    counterChanges: `${base}:counter-changes`,
    seq: `${base}:seq`,
    epoch: `${base}:epoch`,
    retired: `${base}:retired`,
    superseded: (incarnation) => `${base}:superseded:${incarnation}`,
    frontend: (incarnation) => Object.freeze({
      conns: `${base}:fe:${incarnation}:conns`,
      channels: `${base}:fe:${incarnation}:channels`,
      counters: `${base}:fe:${incarnation}:counters`,
      counterApps: `${base}:fe:${incarnation}:counter-apps`,
    }),
  });
}

/** The global keys a gateway reads: the app registry and the admission copy. */
export function globalKeys(prefix) {
  const base = globalBase(prefix);
  return Object.freeze({
    base,
    apps: `${base}:apps`,
    appsSynced: `${base}:apps:synced`,
    admission: `${base}:admission`,
    admissionLive: `${base}:admission:live`,
    admissionNotices: `${base}:admission:notices`,
    admissionVersion: `${base}:admission:version`,
  });
}

/** An app's counters as stored: eight totals separated by one space each. */
export function packCounters(totals) {
  if (totals.length !== COUNTERS_PER_APP) {
    throw new RangeError(`expected ${COUNTERS_PER_APP} counter totals, got ${totals.length}`);
  }
  return totals.join(' ');
}

/** The inverse of packCounters; the six-field value of older gateways reads with zeros. */
export function unpackCounters(packed) {
  const parts = String(packed).split(' ').map(Number);
  if (parts.length === 6) parts.push(0, 0);
  return parts;
}
