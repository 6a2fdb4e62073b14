// One datacenter's Redis as a gateway writes it: flush.lua and deregister.lua, called with the
// arguments metering/live/store.py's DatacenterStore passes (docs/redis-keys.md).
import { datacenterKeys, packCounters } from './keys.js';
import { defaultScripts } from './scripts.js';

export class DatacenterStore {
  /**
   * @param client an ioredis client of the datacenter's Redis
   * @param {{scripts?: import('./scripts.js').Scripts}} [options]
   */
  constructor(client, prefix, datacenter, { scripts } = {}) {
    this.client = client;
    this.prefix = prefix;
    this.datacenter = datacenter;
    this.keys = datacenterKeys(prefix, datacenter);
    this.base = this.keys.base;
    this.scripts = scripts ?? defaultScripts();
  }

  /**
   * Run flush.lua: connection fields and counts, channel presence, and per app the eight
   * cumulative counters of this incarnation, all absolute. Resolves to its reply.
   */
  async flush(incarnation, { full, timeoutMs, epoch, conns = [], channels = [], counters = [] }) {
    const args = [incarnation, full ? '1' : '0', String(Math.round(timeoutMs)), epoch];
    args.push(String(conns.length));
    for (const [field, n] of conns) args.push(field, String(n));
    args.push(String(channels.length));
    for (const [field, present] of channels) args.push(field, present ? '1' : '0');
    args.push(String(counters.length));
    for (const [app, totals] of counters) {
      // Totals as an array of eight, or already packed (the Meter keeps them packed).
      args.push(app, typeof totals === 'string' ? totals : packCounters(totals));
    }
    return String(await this.scripts.run(this.client, 'flush', this.base, args));
  }

  /** Run deregister.lua: the incarnation's counts go at once. True if it was registered. */
  async deregister(incarnation) {
    return Boolean(Number(await this.scripts.run(this.client, 'deregister', this.base, [incarnation])));
  }

  /** Live incarnations and when each was last seen (ms, Redis clock). */
  async incarnations() {
    const flat = await this.client.zrange(this.keys.frontends, 0, -1, 'WITHSCORES');
    const out = {};
    for (let i = 0; i < flat.length; i += 2) out[flat[i]] = Number(flat[i + 1]);
    return out;
  }
}
