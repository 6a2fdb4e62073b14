// The gateway's view of the app registry (metering/gateway/registry.py): which app ids exist,
// and their accounts, from the Redis mirror metering/accounts/store.py writes.
//
// Known apps are answered from memory (loaded at start, refreshed on a timer), so a connect
// costs no Redis round trip. A miss asks Redis once; misses are remembered briefly so that a
// client retrying an unknown id cannot hammer Redis.
//
// An app is refused as unknown only on evidence: the mirror, written whole by a sync from the
// database (`{p}:apps:synced` set), lacks it. A mirror that is not such a copy (Redis
// restarted empty, or unreachable) is no evidence: the last good copy is kept, a miss waits a
// little for the engine to refill the mirror, and if it cannot tell by then the request is
// answered as unavailable, never as unknown.
import { performance } from 'node:perf_hooks';

import { globalKeys } from './keys.js';
import { defaultLogger } from './log.js';

export const MAX_APP_ID_LENGTH = 20; // digits of the largest unsigned 64-bit integer
const REFILL_POLL_MS = 250; // between looks at a mirror being refilled

/** App ids are decimal integers written as strings. */
export function validAppId(app) {
  return typeof app === 'string' && app.length > 0 && app.length <= MAX_APP_ID_LENGTH && /^[0-9]+$/.test(app);
}

/** Whether the app exists cannot be told now (Redis unreachable, or its mirror incomplete and
 * not refilled in time). */
export class RegistryUnavailable extends Error {}

function byAccount(apps) {
  const out = new Map();
  for (const [app, account] of apps) {
    const owned = out.get(account);
    if (owned) owned.push(app);
    else out.set(account, [app]);
  }
  return out;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class AppRegistry {
  constructor(
    client,
    prefix,
    { refreshIntervalMs = 30_000, negativeTtlMs = 2000, negativeMax = 10_000, refillWaitMs = 5000, logger = defaultLogger } = {},
  ) {
    this.client = client;
    this.keys = globalKeys(prefix);
    this.refreshIntervalMs = refreshIntervalMs;
    this.negativeTtlMs = negativeTtlMs;
    this.negativeMax = negativeMax;
    this.refillWaitMs = refillWaitMs;
    this.log = logger;
    this._apps = new Map(); // app -> account
    this._accounts = new Map(); // account -> apps
    this._missing = new Map(); // app -> expiry (performance.now()), oldest first
    this._pending = new Map(); // app -> the lookup under way
    this._timer = null;
    this._failing = false;
    this.complete = false; // the copy came whole from a sync of the database
    this.lookups = 0; // Redis lookups made on a miss
  }

  get size() {
    return this._apps.size;
  }

  /** Load every app, then keep refreshing. */
  async start() {
    try {
      await this.refresh();
    } catch (err) {
      // Misses still ask Redis one by one; the timer loads the rest once it answers.
      this.log.warning('gateway.registry_unavailable', { error: err.message });
    }
    const every = Math.max(this.refreshIntervalMs, 10);
    this._timer = setInterval(() => {
      this.refresh().then(
        () => {
          this._failing = false;
        },
        (err) => {
          // Keep serving the last copy: known apps keep working while Redis is away.
          if (!this._failing) this.log.warning('gateway.registry_refresh_failed', { error: err.message });
          this._failing = true;
        },
      );
    }, every);
    this._timer.unref?.();
  }

  close() {
    if (this._timer !== null) clearInterval(this._timer);
    this._timer = null;
  }

  async _snapshot() {
    const [[e1, apps], [e2, complete]] = await this.client
      .multi()
      .hgetall(this.keys.apps)
      .exists(this.keys.appsSynced)
      .exec();
    if (e1 || e2) throw e1 ?? e2;
    return { apps: new Map(Object.entries(apps).map(([a, acc]) => [a, Number(acc)])), complete: Boolean(complete) };
  }

  /** Reload the registry; resolves to its size. From a complete mirror the copy is replaced
   * (an app deleted there stops resolving); from an incomplete one it only gains apps. */
  async refresh() {
    const snapshot = await this._snapshot();
    let apps;
    if (snapshot.complete) {
      apps = snapshot.apps;
      this._missing = new Map(); // an app created since its miss resolves at once
    } else {
      if (this.complete || (this._apps.size && snapshot.apps.size < this._apps.size)) {
        this.log.warning('gateway.registry_incomplete', {
          kept: this._apps.size,
          mirror: snapshot.apps.size,
          hint: 'the Redis mirror was not written by a full sync (emptied?): keeping the last copy until the engine refills it',
        });
      }
      apps = new Map([...this._apps, ...snapshot.apps]);
    }
    this._apps = apps;
    this._accounts = byAccount(apps);
    this.complete = snapshot.complete;
    return apps.size;
  }

  /** The account of `app` if it is in memory (no I/O); undefined otherwise. */
  known(app) {
    return this._apps.get(app);
  }

  /** The apps of `account` this copy knows (no I/O). */
  appsOf(account) {
    return this._accounts.get(account) ?? [];
  }

  /** The account that owns `app`, or null if the app is unknown: not a valid id, or missing
   * from a complete mirror. Rejects with RegistryUnavailable when that cannot be told. */
  async resolve(app) {
    const account = this._apps.get(app);
    if (account !== undefined) return account;
    if (!validAppId(app)) return null;
    const expiry = this._missing.get(app);
    if (expiry !== undefined) {
      if (expiry > performance.now()) return null;
      this._missing.delete(app);
    }
    // Concurrent misses for the same app (a crowd reconnecting) share one lookup.
    let lookup = this._pending.get(app);
    if (lookup === undefined) {
      lookup = this._lookup(app).finally(() => this._pending.delete(app));
      this._pending.set(app, lookup);
    }
    return lookup;
  }

  async _lookup(app) {
    const deadline = performance.now() + this.refillWaitMs;
    for (;;) {
      this.lookups += 1;
      let value;
      let complete;
      try {
        const [[e1, v], [e2, c]] = await this.client.multi().hget(this.keys.apps, app).exists(this.keys.appsSynced).exec();
        if (e1 || e2) throw e1 ?? e2;
        value = v;
        complete = Boolean(c);
      } catch (err) {
        this.log.warning('gateway.registry_lookup_failed', { app, error: err.message });
        throw new RegistryUnavailable(`the app registry is unreachable: ${err.message}`);
      }
      if (value !== null) {
        const account = Number(value);
        this._apps.set(app, account);
        this._accounts.set(account, [...(this._accounts.get(account) ?? []), app]);
        return account;
      }
      if (complete) {
        this._missing.set(app, performance.now() + this.negativeTtlMs);
        while (this._missing.size > this.negativeMax) {
          this._missing.delete(this._missing.keys().next().value);
        }
        return null;
      }
      if (performance.now() >= deadline) {
        this.log.warning('gateway.registry_not_refilled', { app, waited: this.refillWaitMs / 1000 });
        throw new RegistryUnavailable('the app registry is being refilled: try again');
      }
      await sleep(REFILL_POLL_MS);
    }
  }
}
