// The metering SDK a realtime frontend in Node.js embeds: the semantics of the Python SDK's
// Meter (metering/gateway/sdk.py), which is the reference.
//
// Every event is an O(1) update of in-memory Maps: no I/O on the hot path. A timer writes the
// frontend's *absolute* counts to its datacenter's Redis (only what changed since the last
// flush, at most every flushMinIntervalMs and at least every flushIntervalMs as a heartbeat),
// so a lost or repeated write heals at the next flush and Redis writes grow with frontends x
// apps, not with the event rate.
//
// Counts belong to one incarnation (`<frontend id>#<unix seconds>-<8 hex>`): a process
// restarted under the same frontend id starts a new incarnation, which takes the id over and
// removes the old one's counts at once, so nothing is inherited or counted twice.
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';

import { FLUSH_OK, FLUSH_REPLACED, FLUSH_SUPERSEDED, FLUSH_UNKNOWN, TRANSPORT_CODES } from './keys.js';
import { defaultLogger } from './log.js';

const SUFFIX = new Map(Object.entries(TRANSPORT_CODES).map(([t, c]) => [t, `|${c}`]));
const NO_MESSAGES = [0, 0, 0, 0];

function suffixOf(transport) {
  // '===' against the common case first: a Map lookup costs more than a comparison.
  if (transport === 'websocket') return '|w';
  const suffix = SUFFIX.get(transport);
  if (suffix === undefined) {
    throw new TypeError(`unknown transport ${JSON.stringify(transport)} (websocket, streaming or long_poll)`);
  }
  return suffix;
}

function epochCandidate() {
  // A fresh candidate every time: a Redis that restarted empty must get an epoch it never
  // had, so the tick knows to resync it.
  return randomBytes(8).toString('hex');
}

export class Meter {
  /**
   * @param {import('./store.js').DatacenterStore} store
   * @param {string} frontendId
   */
  constructor(
    store,
    frontendId,
    {
      livenessTimeoutMs = 3000,
      flushIntervalMs = 250,
      flushMinIntervalMs = 20,
      onSuperseded,
      logger = defaultLogger,
    } = {},
  ) {
    if (typeof frontendId !== 'string' || !frontendId || /[#|]/.test(frontendId)) {
      throw new TypeError("frontend id must be non-empty, without '#' or '|'");
    }
    this.store = store;
    this.frontendId = frontendId;
    this.incarnation = `${frontendId}#${Math.floor(Date.now() / 1000)}-${randomBytes(4).toString('hex')}`;
    this.livenessTimeoutMs = livenessTimeoutMs;
    this.flushIntervalMs = flushIntervalMs;
    this.flushMinIntervalMs = flushMinIntervalMs;
    this.onSuperseded = onSuperseded;
    this.log = logger;

    // The hot path only updates these; a flush diffs them against what it last wrote, so an
    // event costs a few Map operations and nothing more. A flush copies them synchronously
    // before its first await: events arriving during its round trip go to the next one.
    this._conns = new Map(); // '<app>|<t>' -> open connections
    this._opened = new Map(); // '<app>|<t>' -> connections opened (cumulative)
    this._channels = new Map(); // '<app>|<channel>' -> attached connections here
    this._messages = new Map(); // app -> [pub_n, pub_b, del_n, del_b]
    this._refused = new Map(); // app -> connections refused (cumulative)
    this._chRefused = new Map(); // app -> channel attaches refused (cumulative)
    this._msgRefused = new Map(); // app -> messages refused (cumulative)
    this._changed = false;
    this._sentConns = new Map();
    this._sentChannels = new Set();
    this._sentCounters = new Map(); // app -> packed totals

    this._registered = false;
    this._superseded = false;
    this._stopped = false;
    this._timer = null;
    this._queue = Promise.resolve(); // flushes run one at a time, in order
    this._failures = 0; // flushes failed in a row (an outage is logged once, then its end)
    this.flushes = 0;
  }

  // -- events: the hot path -------------------------------------------------------------

  connectionOpened(app, transport = 'websocket') {
    const field = app + suffixOf(transport);
    const conns = this._conns;
    const opened = this._opened;
    conns.set(field, (conns.get(field) ?? 0) + 1);
    opened.set(field, (opened.get(field) ?? 0) + 1);
    this._changed = true;
  }

  connectionClosed(app, transport = 'websocket') {
    const field = app + suffixOf(transport);
    const n = this._conns.get(field) ?? 0;
    if (n > 1) this._conns.set(field, n - 1);
    else if (n === 1) this._conns.delete(field);
    else return; // a close without its open (a bug in the caller) must not go negative
    this._changed = true;
  }

  /** A connection the gateway refused (enforcement): counted as `refused`. */
  connectionRefused(app) {
    this._refused.set(app, (this._refused.get(app) ?? 0) + 1);
    this._changed = true;
  }

  /** A channel attach the gateway refused (enforcement): counted as `ch_refused`. */
  channelRefused(app) {
    this._chRefused.set(app, (this._chRefused.get(app) ?? 0) + 1);
    this._changed = true;
  }

  /** `count` messages the gateway refused to publish (enforcement): `msg_refused`. */
  messageRefused(app, count = 1) {
    this._msgRefused.set(app, (this._msgRefused.get(app) ?? 0) + count);
    // Like the message counters, it rides on the next heartbeat flush: a client retrying a
    // refused publish in a loop must not make the flushes run at their highest rate.
  }

  channelAttached(app, channel) {
    const field = `${app}|${channel}`;
    const channels = this._channels;
    channels.set(field, (channels.get(field) ?? 0) + 1);
    this._changed = true;
  }

  channelDetached(app, channel) {
    const field = `${app}|${channel}`;
    const n = this._channels.get(field) ?? 0;
    if (n > 1) this._channels.set(field, n - 1);
    else if (n === 1) this._channels.delete(field);
    else return;
    this._changed = true;
  }

  messagePublished(app, channel, nbytes) {
    let m = this._messages.get(app);
    if (m === undefined) {
      m = [0, 0, 0, 0];
      this._messages.set(app, m);
    }
    m[0] += 1;
    m[1] += nbytes;
    // Counters ride on the next heartbeat flush: no hurry to wake it.
  }

  /** `count` deliveries of one message of `nbytes` (a fan-out to `count` clients). */
  messageDelivered(app, channel, nbytes, count = 1) {
    let m = this._messages.get(app);
    if (m === undefined) {
      m = [0, 0, 0, 0];
      this._messages.set(app, m);
    }
    m[2] += count;
    m[3] += nbytes * count;
  }

  /** Connections open here of any of `apps` (Meter.connections_of in sdk.py). */
  connectionsOf(apps) {
    const conns = this._conns;
    let total = 0;
    for (const app of apps) for (const suffix of SUFFIX.values()) total += conns.get(app + suffix) ?? 0;
    return total;
  }

  /** The channels ('<app>|<channel>') of any of `apps` active here (Meter.channels_of). */
  channelsOf(apps) {
    const wanted = new Set(apps);
    const out = [];
    for (const field of this._channels.keys()) {
      const bar = field.indexOf('|');
      if (wanted.has(bar < 0 ? field : field.slice(0, bar))) out.push(field);
    }
    return out;
  }

  get superseded() {
    return this._superseded;
  }

  // -- lifecycle --------------------------------------------------------------------------

  /** Register (a full flush) and start flushing in the background. */
  async start() {
    try {
      await this.flush();
    } catch (err) {
      // Counting goes on in memory; the timer registers once Redis answers.
      this._failures = 1;
      this.log.warning('metering.redis_unavailable', {
        frontend: this.frontendId,
        error: err.message,
        hint: 'counting in memory; registering once Redis answers',
      });
    }
    this._last = performance.now();
    this._backoff = this.flushMinIntervalMs;
    if (!this._superseded && !this._stopped) this._schedule();
  }

  /** Flush the final counters, then remove this incarnation's counts at once. */
  async close() {
    this._stopped = true;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    await this._queue.catch(() => {});
    if (this._superseded) return;
    try {
      await this.flush();
      if (!this._superseded) await this.store.deregister(this.incarnation);
    } catch (err) {
      this.log.warning('metering.deregister_failed', { frontend: this.frontendId, error: err.message });
    }
  }

  _schedule() {
    this._timer = setTimeout(() => this._poll(), this._backoff);
    // Like the Python SDK's daemon thread: the meter alone never keeps a process alive.
    this._timer.unref?.();
  }

  // Flush soon after a change (at most every flushMinIntervalMs), and at least every
  // flushIntervalMs as the heartbeat. Polling a flag keeps the hot path free of any timer
  // call; at 50 Hz it costs the process nothing measurable.
  async _poll() {
    this._timer = null;
    if (this._stopped) return;
    if (!this._changed && performance.now() - this._last < this.flushIntervalMs) {
      this._schedule();
      return;
    }
    try {
      await this.flush();
      this._backoff = this.flushMinIntervalMs;
      if (this._failures > 0) {
        this.log.warning('metering.redis_recovered', { frontend: this.frontendId, failed_flushes: this._failures });
        this._failures = 0;
      }
    } catch (err) {
      if (this._failures === 0) {
        this.log.warning('metering.flush_failed', {
          frontend: this.frontendId,
          error: err.message,
          hint: 'counting in memory; retrying (logged again once it recovers)',
        });
      }
      this._failures += 1;
      this._backoff = Math.min(this._backoff * 2, this.flushIntervalMs);
    }
    this._last = performance.now();
    if (this._superseded || this._stopped) return;
    this._schedule();
  }

  /** Write what changed (everything, if Redis does not know this incarnation). */
  flush() {
    const run = this._queue.catch(() => {}).then(() => this._flushNow());
    this._queue = run;
    return run;
  }

  async _flushNow() {
    if (this._superseded) return FLUSH_SUPERSEDED;
    let status = await this._flush(!this._registered);
    if (status === FLUSH_UNKNOWN) {
      // Reaped after a pause, or Redis restarted empty: send the whole state again.
      this.log.warning('metering.resync', { frontend: this.frontendId, incarnation: this.incarnation });
      status = await this._flush(true);
    }
    if (status === FLUSH_SUPERSEDED) {
      this._superseded = true;
      this.log.error('metering.superseded', {
        frontend: this.frontendId,
        incarnation: this.incarnation,
        hint: 'another process took this frontend id; this one stops counting',
      });
      if (this.onSuperseded) {
        try {
          this.onSuperseded();
        } catch (err) {
          this.log.error('metering.on_superseded_failed', { error: err.message });
        }
      }
      return status;
    }
    if (status === FLUSH_REPLACED) {
      this.log.info('metering.replaced_previous_incarnation', { frontend: this.frontendId });
    }
    this._registered = true;
    return status;
  }

  /** Cumulative counters per app, packed: opened, refused, pub_n, pub_b, del_n, del_b,
   * ch_refused, msg_refused. */
  _counters() {
    const opened = new Map();
    for (const [field, n] of this._opened) {
      const app = field.slice(0, -2); // '<app>|<t>'
      opened.set(app, (opened.get(app) ?? 0) + n);
    }
    const apps = new Set(opened.keys());
    for (const m of [this._refused, this._messages, this._chRefused, this._msgRefused]) {
      for (const app of m.keys()) apps.add(app);
    }
    const out = new Map();
    for (const app of apps) {
      const [pubN, pubB, delN, delB] = this._messages.get(app) ?? NO_MESSAGES;
      out.set(app, [
        opened.get(app) ?? 0, this._refused.get(app) ?? 0, pubN, pubB, delN, delB,
        this._chRefused.get(app) ?? 0, this._msgRefused.get(app) ?? 0,
      ].join(' '));
    }
    return out;
  }

  async _flush(full) {
    // The snapshot, taken before the first await: what the hot path does meanwhile goes to
    // the next flush.
    this._changed = false;
    const connsNow = new Map(this._conns);
    const channelsNow = new Set(this._channels.keys());
    const countersNow = this._counters();
    let conns;
    let channels;
    let counters;
    if (full) {
      conns = [...connsNow];
      channels = [...channelsNow].map((f) => [f, true]);
      counters = [...countersNow];
    } else {
      const sent = this._sentConns;
      conns = [];
      for (const [f, n] of connsNow) if (sent.get(f) !== n) conns.push([f, n]);
      for (const f of sent.keys()) if (!connsNow.has(f)) conns.push([f, 0]);
      channels = [];
      for (const f of channelsNow) if (!this._sentChannels.has(f)) channels.push([f, true]);
      for (const f of this._sentChannels) if (!channelsNow.has(f)) channels.push([f, false]);
      counters = [];
      for (const [app, packed] of countersNow) {
        if (this._sentCounters.get(app) !== packed) counters.push([app, packed]);
      }
    }
    const status = await this.store.flush(this.incarnation, {
      full,
      timeoutMs: this.livenessTimeoutMs,
      epoch: epochCandidate(),
      conns,
      channels,
      counters,
    });
    if (status === FLUSH_OK || status === FLUSH_REPLACED) {
      // Only what Redis accepted counts as sent; anything else is sent again next time.
      this._sentConns = connsNow;
      this._sentChannels = channelsNow;
      this._sentCounters = countersNow;
    }
    this.flushes += 1;
    return status;
  }
}
