// Admission in the gateway process (metering/gateway/admission.py, whose rule this ports): may
// this account open a connection, attach a channel, publish a message? Refused only on
// evidence that the account is at or over its hard limit. This module is the only place the
// rule lives, so that it can be replaced whole.
//
// The engine keeps what gateways enforce per account in Redis (metering/limits/store.py): the
// hard limits of the concurrent metrics, a publishing block for the rest of the month, and the
// live counts at the last tick of the accounts within reach of a hard limit. A copy is kept
// here, re-read at once on a pub/sub notice (a staff change, each tick) and every
// refreshIntervalMs in any case.
//
// The accept path is in memory, with no I/O: the copy's count (the last tick's, or for an
// account the tick did not list, the most it can be: just under half the limit) plus what this
// gateway let in since, with room for one more. When that has no room it proves nothing either
// (the tick's count may hold a frontend that has since died, its clients reconnecting here), so
// the answer is CHECK, and the gateway awaits checkConnection / checkChannel, which read Redis:
//
// - connections: every frontend's own counts of the account's apps, read fresh from each
//   datacenter (evidence.lua). Below the limit, the request is let in at once. At or over it,
//   the frontends are read again one heartbeat later, and only those heard from in between
//   are evidence: a frontend killed a moment ago (whose clients are reconnecting) counts for
//   nothing.
// - channels: a channel another frontend holds, or that was active at the last tick, is not a
//   new one. Otherwise the evidence is the tick's count plus this gateway's channels new since,
//   less what silent frontends held.
//
// Concurrent checks of one account share one read; a refusal is never reused for a request
// that arrived after it was read. A gateway that takes an account within half its room of the
// limit, or refuses it, tells the others (`check <account> <sender>` notice), which then check
// that account instead of trusting their copy for FLAGGED_FOR_MS.
//
// If the copy cannot be refreshed for staleAfterMs (Redis unreachable), the gateway lets
// everything in (failOpen, the default) or refuses everything with UNAVAILABLE; a check that
// cannot read Redis decides the same way.
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';

import { CHECK_NOTICE, LIVE_NOTICE, TRANSPORT_CODES, globalBase, globalKeys } from './keys.js';
import { defaultLogger } from './log.js';

// Stable refusal codes: the HTTP status times 100, plus a detail.
export const CONNECTIONS_EXCEEDED = 40111;
export const MESSAGES_EXCEEDED = 40112;
export const CHANNELS_EXCEEDED = 40114;
export const UNAVAILABLE = 50310;

// How long past one heartbeat a live frontend may take to be heard again.
export const HEARD_MARGIN_MS = 100;
// How long an account another gateway told of is checked here: two ticks.
export const FLAGGED_FOR_MS = 2000;
// Between two checks of one account: longer than a gateway takes to flush what it let in.
export const READ_SPACING_MS = 50;

/** The in-memory copy can neither accept nor refuse: await the check* method. */
export const CHECK = Object.freeze({ check: true, toString: () => 'CHECK' });

const CONNECTIONS = Object.freeze({ code: CONNECTIONS_EXCEEDED, reason: 'account restricted (connection limits exceeded)', retryAfter: null });
const CHANNELS = Object.freeze({ code: CHANNELS_EXCEEDED, reason: 'account restricted (channel limits exceeded)', retryAfter: null });
const UNAVAILABLE_REFUSAL = Object.freeze({ code: UNAVAILABLE, reason: 'admission unavailable: the limits could not be read', retryAfter: null });

const CODES = Object.values(TRANSPORT_CODES);
const CHUNK = 10_000; // fields per HMGET (as metering/live/store.py)

/** Seconds until the next month begins (UTC), at least 1. */
export function secondsToMonthEnd(now = new Date()) {
  const end = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1);
  return Math.max(1, Math.floor((end - now.getTime()) / 1000) + 1);
}

function monthOf(now = new Date()) {
  return now.toISOString().slice(0, 7);
}

/** An account's row as stored: '<connections hard> <channels hard> <month> <by>', '-' for none. */
export function decodeRow(value) {
  const [c, ch, month, by] = String(value).split(' ');
  return {
    connectionsHard: c === '-' ? null : Number.parseInt(c, 10),
    channelsHard: ch === '-' ? null : Number.parseInt(ch, 10),
    publishBlockedMonth: month === '-' ? null : month,
    publishBlockedBy: by === '-' ? null : by,
  };
}

// -- the evidence a check reads -----------------------------------------------------------

/**
 * One datacenter's frontends as a gateway weighing a refusal sees them: evidence.lua, called
 * as DatacenterStore.frontends in metering/live/store.py. `{now, lastReap, seen: Map(inc ->
 * last seen ms), connections: Map(inc -> its connections of connFields), held: [bool per
 * channel field]}`.
 */
export async function readFrontends(dc, incarnation, connFields, channelFields) {
  const args = [incarnation, String(connFields.length), ...connFields, String(channelFields.length), ...channelFields];
  const raw = await dc.scripts.run(dc.client, 'evidence', dc.base, args);
  const m = channelFields.length;
  const held = raw.slice(2, 2 + m).map((v) => Number(v) !== 0);
  const seen = new Map();
  const connections = new Map();
  for (let i = 2 + m; i < raw.length; i += 3) {
    const inc = String(raw[i]);
    seen.set(inc, Math.trunc(Number(raw[i + 1])));
    connections.set(inc, Number(raw[i + 2]));
  }
  return { now: Number(raw[0]), lastReap: Number(raw[1]), seen, connections, held };
}

/** How many channels of `apps` an incarnation holds, not counting those in `besides` (a
 * Set): a scan of its whole hash in steps (DatacenterStore.channels_of). */
export async function channelsOfIncarnation(dc, incarnation, apps, besides = new Set()) {
  const wanted = new Set(apps);
  const key = `${dc.base}:fe:${incarnation}:channels`;
  let total = 0;
  let cursor = '0';
  do {
    const [next, flat] = await dc.client.hscan(key, cursor, 'COUNT', 1000);
    for (let i = 0; i < flat.length; i += 2) {
      const name = String(flat[i]);
      const bar = name.indexOf('|');
      const app = bar < 0 ? name : name.slice(0, bar);
      if (wanted.has(app) && !besides.has(name)) total += 1;
    }
    cursor = String(next);
  } while (cursor !== '0');
  return total;
}

/** The primary Redis's tick state, as GlobalStore.channels_at_tick reads it. */
export class GlobalLive {
  constructor(client, prefix) {
    this.client = client;
    this.base = globalBase(prefix);
  }

  /** As of the last tick, in one snapshot: [its second (0: none yet), the account's active
   * channels, which of `fields` ('<app>|<channel>') were active]. */
  async channelsAtTick(account, fields) {
    const multi = this.client.multi();
    multi.hget(`${this.base}:tick`, 'second');
    multi.hget(`${this.base}:live:accounts`, String(account));
    for (let i = 0; i < fields.length; i += CHUNK) multi.hmget(`${this.base}:live:channels`, ...fields.slice(i, i + CHUNK));
    const replies = await multi.exec();
    if (replies === null) throw new Error('the tick state could not be read (transaction aborted)');
    for (const [err] of replies) if (err) throw err;
    const [second, value] = [replies[0][1], replies[1][1]];
    const active = replies.slice(2).flatMap(([, values]) => values.map((v) => v !== null));
    const channels = value === null ? 0 : Number(String(value).trim().split(/\s+/)[3]);
    return [Number(second ?? 0), channels, active];
  }
}

// -- the counts on top of a copy -----------------------------------------------------------

/**
 * One concurrent metric's counts per account on top of a copy of the live counts.
 *
 * A copy's count comes from a tick that read the frontends up to a second before the copy
 * arrived: what this gateway opened in that time may be missing from it. So the opens of the
 * previous copy's time are kept on top of the new copy (counted twice at worst: a check rather
 * than a refusal), while closes count only from the copy on (a close counted twice could let
 * the account past its limit).
 */
class Tally {
  constructor(before = new Map()) {
    this.base = new Map(); // a check's fresh count, instead of the copy's
    this.before = before; // opened during the previous copy
    this.delta = new Map(); // opened less closed since this copy (or the check)
    this.opened = new Map(); // opened since this copy (or the check)
  }

  held(account, base) {
    return base + (this.before.get(account) ?? 0) + (this.delta.get(account) ?? 0);
  }

  took(account) {
    this.delta.set(account, (this.delta.get(account) ?? 0) + 1);
    this.opened.set(account, (this.opened.get(account) ?? 0) + 1);
  }

  left(account) {
    this.delta.set(account, (this.delta.get(account) ?? 0) - 1);
  }

  /** Go on from a count just read: it holds everything opened and closed so far. */
  settle(account, base) {
    this.base.set(account, base);
    this.delta.set(account, 0);
    this.opened.set(account, 0);
    this.before.delete(account);
  }

  renewed() {
    return new Tally(this.opened);
  }
}

function isBug(err) {
  return err instanceof TypeError || err instanceof ReferenceError || err instanceof SyntaxError;
}

/** Whether the channel asked about is already one of the account's. */
function held(frontends, tick, wanted) {
  if (wanted.length === 0) return false;
  return frontends.some((f) => f.held[0]) || tick[2][tick[2].length - 1];
}

export class Admission {
  /**
   * @param client an ioredis client of the primary Redis (the copy, and the notices)
   * @param prefix METERING_REDIS_PREFIX
   * @param options.evidence where checks read (without it, a check lets in):
   *   {datacenters: DatacenterStore[], live: GlobalLive, appsOf(account), incarnation?,
   *    connectionsHere?(apps), channelsHere?(apps)}
   * @param options.heartbeatMs the frontends' flush interval (METERING_FLUSH_INTERVAL)
   */
  constructor(
    client,
    prefix,
    {
      evidence = null,
      failOpen = true,
      refreshIntervalMs = 5000,
      staleAfterMs = 15_000,
      heartbeatMs = 250,
      clock = () => performance.now(),
      logger = defaultLogger,
    } = {},
  ) {
    this.client = client;
    this.keys = globalKeys(prefix);
    this.evidence = evidence === null ? null : {
      ...evidence,
      incarnation: evidence.incarnation ?? '',
      connectionsHere: evidence.connectionsHere ?? (() => 0),
      channelsHere: evidence.channelsHere ?? (() => []),
    };
    this.failOpen = failOpen;
    this.refreshIntervalMs = refreshIntervalMs;
    this.staleAfterMs = staleAfterMs;
    this.heardWaitMs = heartbeatMs + HEARD_MARGIN_MS;
    this.clock = clock;
    this.log = logger;
    this.sender = randomBytes(4).toString('hex');
    // Replaced whole by each refresh, never mutated there.
    this._rows = new Map(); // account -> row
    this._live = new Map(); // account -> [connections, channels]
    // Renewed with each copy: what this gateway let in on top of it, per metric and account,
    // and the accounts it already told the other gateways about.
    this._connections = new Tally();
    this._channels = new Tally();
    this._flagged = new Map(); // account -> until when (clock)
    this._told = new Set();
    this._pending = new Map(); // account -> the promise of its connection proof
    this._readAt = new Map(); // account -> its last check's first read (clock)
    this._freshAt = clock();
    this._version = null;
    this._month = monthOf();
    this._subscriber = null;
    this._timer = null;
    this._deadline = 0;
    this._refreshing = null;
    this._again = false;
    this._wantRows = false;
    this._failing = false;
    this._closed = false;
    this.checks = 0; // reads made by checks (for tests and the benchmark)
  }

  // -- decisions: the hot path --------------------------------------------------------

  /** null to accept a new connection of `account` (and count it), CHECK, or why not. */
  admitConnection(account) {
    const row = this._rows.get(account);
    if (row === undefined || row.connectionsHard === null) return this._staleRefusal();
    return this._admit(account, row.connectionsHard, this._connections, 0);
  }

  /** null to let `account` activate one more channel (and count it), CHECK, or why not. */
  admitChannel(account) {
    const row = this._rows.get(account);
    if (row === undefined || row.channelsHard === null) return this._staleRefusal();
    return this._admit(account, row.channelsHard, this._channels, 1);
  }

  _admit(account, hard, tally, metric) {
    if (this._stale()) return this.failOpen ? null : UNAVAILABLE_REFUSAL;
    if (this._flagged.size > 0 && this._checking(account)) return CHECK;
    let base = tally.base.get(account);
    if (base === undefined) {
      const live = this._live.get(account);
      // Not listed: the tick saw it below half of the limit.
      base = live !== undefined ? live[metric] : Math.floor((hard - 1) / 2);
    }
    const heldNow = tally.held(account, base);
    if (heldNow >= hard) return CHECK;
    tally.took(account);
    if (hard - heldNow - 1 <= Math.floor((hard - base) / 2)) this._tell(account, heldNow + 1 >= hard);
    return null;
  }

  /** A connection of `account` closed here: one fewer than the copy's count says (whether it
   * opened before the copy or after, the copy does not know of its close). */
  connectionClosed(account) {
    if (this._rows.has(account)) this._connections.left(account);
  }

  /** A channel of `account` has no connection attached here any more. */
  channelReleased(account) {
    if (this._rows.has(account)) this._channels.left(account);
  }

  /** null to let `account` publish, or why not (the month's messages or data). */
  admitMessage(account) {
    const row = this._rows.get(account);
    if (row !== undefined && row.publishBlockedMonth === this._month) {
      const reason = `account restricted (monthly ${row.publishBlockedBy} limit exceeded)`;
      return this._unlessStale({ code: MESSAGES_EXCEEDED, reason, retryAfter: secondsToMonthEnd() });
    }
    return this._staleRefusal();
  }

  _checking(account) {
    const until = this._flagged.get(account);
    if (until === undefined) return false;
    if (this.clock() < until) return true;
    this._flagged.delete(account);
    return false;
  }

  _stale() {
    return this.clock() - this._freshAt > this.staleAfterMs;
  }

  _staleRefusal() {
    return !this.failOpen && this._stale() ? UNAVAILABLE_REFUSAL : null;
  }

  _unlessStale(refusal) {
    // An old copy is no ground for refusing when the setting says to let traffic in.
    if (this._stale()) return this.failOpen ? null : UNAVAILABLE_REFUSAL;
    return refusal;
  }

  _unreadable(err) {
    if (isBug(err)) throw err;
    this.log.warning('gateway.admission_check_failed', { error: err.message });
    return this.failOpen ? null : UNAVAILABLE_REFUSAL;
  }

  // -- checks: the refusal path -------------------------------------------------------

  /** The answer admitConnection could not give from memory: null (let in, and counted) or
   * the refusal. */
  async checkConnection(account) {
    for (;;) {
      const row = this._rows.get(account);
      if (row === undefined || row.connectionsHard === null || this.evidence === null) return null;
      const hard = row.connectionsHard;
      const apps = this.evidence.appsOf(account);
      if (this.evidence.connectionsHere(apps) >= hard) {
        this._tell(account);
        return CONNECTIONS; // this gateway alone holds the limit: no read needed
      }
      let proof = this._pending.get(account);
      if (proof === undefined) {
        proof = this._proveConnections(account, apps, hard);
        this._pending.set(account, proof);
        const done = () => {
          if (this._pending.get(account) === proof) this._pending.delete(account);
        };
        proof.then(done, done);
      }
      let result;
      try {
        result = await proof;
      } catch (err) {
        return this._unreadable(err);
      }
      const tally = this._connections;
      const base = tally.base.get(account) ?? result.base;
      const heldNow = tally.held(account, base);
      if (heldNow < result.upto) {
        tally.took(account);
        if (hard - heldNow - 1 <= Math.floor((hard - base) / 2)) this._tell(account, heldNow + 1 >= hard);
        return null;
      }
      if (result.proven) {
        this._tell(account);
        return CONNECTIONS;
      }
      // The first read left room, others took it first: read again, twice this time.
    }
  }

  async _proveConnections(account, apps, hard) {
    const ev = this.evidence;
    const fields = apps.flatMap((app) => CODES.map((code) => `${app}|${code}`));
    const wait = (this._readAt.get(account) ?? -Infinity) + READ_SPACING_MS - this.clock();
    if (wait > 0) await sleep(wait); // let the others' last opens reach Redis first
    const first = await this._frontends(fields, []);
    this._readAt.set(account, this.clock());
    let upper = ev.connectionsHere(apps);
    for (const f of first) for (const n of f.connections.values()) upper += n;
    if (upper < hard) {
      // Other gateways may be letting the same burst in, unflushed yet: take half of the
      // room seen, then read again.
      const upto = upper + Math.floor((hard - upper + 1) / 2);
      return this._settle(this._connections, account, upper, false, upto);
    }
    await sleep(this.heardWaitMs);
    const second = await this._frontends(fields, []);
    let heard = ev.connectionsHere(apps);
    second.forEach((after, i) => {
      const before = first[i];
      for (const [inc, n] of after.connections) if (after.seen.get(inc) > before.now) heard += n;
    });
    return this._settle(this._connections, account, heard, true, hard);
  }

  /** The answer admitChannel could not give from memory, for `channel` of `app` (null: a
   * channel not named, as the admission endpoint asks). */
  async checkChannel(account, app, channel) {
    const row = this._rows.get(account);
    if (row === undefined || row.channelsHard === null || this.evidence === null) return null;
    const hard = row.channelsHard;
    let count;
    try {
      count = await this._countChannels(account, app, channel, hard);
    } catch (err) {
      return this._unreadable(err);
    }
    if (count === null) return null; // not a new channel of the account: nothing to count
    if (count < hard) {
      this._settle(this._channels, account, count, false, hard);
      this._channels.took(account);
      if (hard - count - 1 <= Math.floor((hard - count) / 2)) this._tell(account, count + 1 >= hard);
      return null;
    }
    this._tell(account);
    return CHANNELS;
  }

  /** The account's channels as evidence has them (null: `channel` is not new). */
  async _countChannels(account, app, channel, hard) {
    const ev = this.evidence;
    const apps = ev.appsOf(account);
    let mine = ev.channelsHere(apps);
    if (mine.length >= hard) return mine.length;
    const wanted = channel === null || channel === undefined ? [] : [`${app}|${channel}`];
    const [first, tick1] = await this._channelReads(account, mine, wanted);
    if (held(first, tick1, wanted)) return null;
    {
      const [, counted, active] = tick1;
      const newHere = active.slice(0, mine.length).filter((was) => !was).length;
      if (counted + newHere < hard) return counted + newHere;
    }
    await sleep(this.heardWaitMs);
    mine = ev.channelsHere(apps);
    const [second, tick2] = await this._channelReads(account, mine, wanted);
    if (held(second, tick2, wanted)) return null;
    const [secondAt, counted, active] = tick2;
    if (second.some((after) => after.lastReap >= secondAt * 1000)) {
      // Someone was reaped since the tick counted: its channels may be in the count and gone
      // now, and which they were is gone with them. Only ours are certain.
      return mine.length;
    }
    let count = counted + active.slice(0, mine.length).filter((was) => !was).length;
    const ours = new Set(mine);
    for (let i = 0; i < ev.datacenters.length; i += 1) {
      const [before, after] = [first[i], second[i]];
      for (const inc of before.seen.keys()) {
        if ((after.seen.get(inc) ?? 0) <= before.now) {
          // silent since the first read
          count -= await channelsOfIncarnation(ev.datacenters[i], inc, apps, ours);
        }
      }
    }
    return Math.max(count, mine.length); // ours are certain, whatever else went
  }

  _frontends(conns, channels) {
    this.checks += 1;
    const inc = this.evidence.incarnation;
    return Promise.all(this.evidence.datacenters.map((dc) => readFrontends(dc, inc, conns, channels)));
  }

  async _channelReads(account, mine, wanted) {
    const [frontends, tick] = await Promise.all([
      this._frontends([], wanted),
      this.evidence.live.channelsAtTick(String(account), [...mine, ...wanted]),
    ]);
    return [frontends, tick];
  }

  /** Go on from a count just read: the account's decisions start from it, afresh. */
  _settle(tally, account, base, proven, upto) {
    tally.settle(account, base);
    this._told.delete(account);
    return { base, proven, upto };
  }

  // -- telling the other gateways -------------------------------------------------------

  _tell(account, reached = true) {
    // Near the limit, once per copy: the others then check for longer than a copy lasts.
    // At it (or refusing), every time: the account may have gone below and back since.
    if (reached || !this._told.has(account)) {
      this._told.add(account);
      // ioredis sends commands in order on one connection: the notices go out in order.
      this.client.publish(this.keys.admissionNotices, `${CHECK_NOTICE} ${account} ${this.sender}`).catch((err) => {
        this.log.warning('gateway.admission_notice_failed', { error: err.message });
      });
    }
  }

  /** A notice from the engine or another gateway. */
  _heard(data) {
    if (data === LIVE_NOTICE) {
      this._refreshed(this.refresh({ rows: false }));
    } else if (data.startsWith(`${CHECK_NOTICE} `)) {
      const [, account, sender] = data.split(' ');
      if (sender !== this.sender) {
        // Until a tick has surely counted what the sender saw: a tick already under way may
        // not have, and its copy must not end the checks.
        this._flagged.set(Number(account), this.clock() + FLAGGED_FOR_MS);
      }
    } else {
      this._refreshed(this.refresh());
      this._deadline = this.clock() + this.refreshIntervalMs;
    }
  }

  // -- keeping the copy -----------------------------------------------------------------

  async _read(rows) {
    let changedRows = null;
    let version = this._version;
    if (rows) {
      // A random value per write (metering/limits/store.py). None at all: Redis lost the
      // copy (restarted empty); its absence says nothing about the limits, so the last copy
      // stands until the engine writes again.
      const current = await this.client.get(this.keys.admissionVersion);
      if (this._version === null || (current !== null && current !== this._version)) {
        const [[e1, v], [e2, all]] = await this.client.multi().get(this.keys.admissionVersion).hgetall(this.keys.admission).exec();
        if (e1 || e2) throw e1 ?? e2;
        version = v ?? '';
        changedRows = new Map(Object.entries(all).map(([a, value]) => [Number(a), decodeRow(value)]));
      }
    }
    const raw = await this.client.hgetall(this.keys.admissionLive);
    const live = new Map();
    for (const [a, value] of Object.entries(raw)) {
      const [conns, channels] = value.split(' ');
      live.set(Number(a), [Number(conns), Number(channels)]);
    }
    // Swapped in at once, with no await in between: decisions see one copy or the other.
    this._version = version;
    if (changedRows !== null) this._rows = changedRows;
    this._live = live;
    this._connections = this._connections.renewed();
    this._channels = this._channels.renewed();
    this._readAt = new Map();
    this._told = new Set();
    this._month = monthOf();
    this._freshAt = this.clock();
  }

  /** Read the copy from Redis (`rows`: the limits too, not only the live counts; they are
   * read whole only when their version moved). Reads run one at a time: one asked for while
   * another runs is done after it, and the promise resolves once both are. */
  refresh({ rows = true } = {}) {
    this._wantRows ||= rows;
    if (this._refreshing === null) {
      this._refreshing = this._drain();
    } else {
      this._again = true;
    }
    return this._refreshing;
  }

  async _drain() {
    try {
      do {
        this._again = false;
        const rows = this._wantRows;
        this._wantRows = false;
        await this._read(rows);
      } while (this._again);
    } finally {
      this._refreshing = null;
    }
  }

  _refreshed(promise) {
    promise.then(
      () => {
        if (this._failing) this.log.warning('gateway.admission_refreshed', {});
        this._failing = false;
      },
      (err) => {
        if (!this._failing) this.log.warning('gateway.admission_refresh_failed', { error: err.message });
        this._failing = true;
      },
    );
  }

  /** Read the copy, subscribe to the notices, and keep the copy current. */
  async start() {
    try {
      await this.refresh();
    } catch (err) {
      this._failing = true;
      this.log.warning('gateway.admission_unavailable', { error: err.message });
    }
    // A connection of its own: a subscribed connection can do nothing else.
    this._subscriber = this.client.duplicate({ enableOfflineQueue: true, maxRetriesPerRequest: null });
    this._subscriber.on('error', () => {}); // the main client logs the outage
    this._subscriber.on('message', (_channel, data) => this._heard(String(data)));
    // Anything missed while not subscribed (at start, and after each reconnect).
    this._subscriber.on('ready', () => this._refreshed(this.refresh()));
    this._subscriber.subscribe(this.keys.admissionNotices).catch(() => {});
    this._deadline = this.clock() + this.refreshIntervalMs;
    const every = Math.min(500, this.refreshIntervalMs);
    this._timer = setInterval(() => {
      if (this.clock() >= this._deadline) {
        this._deadline = this.clock() + this.refreshIntervalMs;
        this._refreshed(this.refresh());
      }
    }, every);
    this._timer.unref?.();
  }

  async close() {
    this._closed = true;
    if (this._timer !== null) clearInterval(this._timer);
    this._timer = null;
    if (this._subscriber !== null) {
      this._subscriber.disconnect();
      this._subscriber = null;
    }
    await this._refreshing?.catch(() => {});
  }
}
