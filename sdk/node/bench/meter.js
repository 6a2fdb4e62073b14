// The Node.js SDK's cost per event, and how its Redis writes scale (bench/sdk_events.py's two
// measures, for the Meter of sdk/node). Needs Node.js and Redis only:
//
//   make bench-node            or   cd sdk/node && node bench/meter.js [--events 1000000] [--seconds 4]
//
// 1. Per event, in process: connection opened+closed, channel attached+detached, message
//    published+delivered, each beside a baseline measured in the same run: the same number of
//    bare `Map` updates (`m.set(k, (m.get(k) ?? 0) + 1)`, the least any in-memory counter costs).
// 2. Redis writes: a started Meter receives events at two rates for a few seconds; the fields
//    written per second depend on flushes x apps, not on the event rate. The bound printed beside
//    the figure is flushes/s x apps x 2 (per app at most its connection field and its counters).
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { Redis } from 'ioredis';

import { DatacenterStore, Meter } from '../src/index.js';

const REDIS_URL = process.env.METERING_TEST_REDIS_URL || 'redis://127.0.0.1:6379/0';
const APPS = Array.from({ length: 100 }, (_, i) => String(i));
const quiet = { debug() {}, info() {}, warning() {}, error() {} };

function row(cells, widths = [34, 14, 14, 10]) {
  return cells.map((c, i) => String(c).padEnd(widths[i] ?? 0)).join('');
}

async function deleteKeys(client, prefix) {
  let cursor = '0';
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', `{${prefix}*`, 'COUNT', 1000);
    if (keys.length) await client.del(...keys);
    cursor = next;
  } while (cursor !== '0');
}

function best(fn) {
  return Math.min(fn(), fn(), fn());
}

function perEvent(client, n) {
  const meter = new Meter(new DatacenterStore(client, 'benchunused', 'dc1'), 'bench', { logger: quiet }); // not started
  const counts = new Map();
  const keys = APPS.map((a) => `${a}|w`);
  const baseline = () => {
    const started = performance.now();
    for (let i = 0; i < n; i++) {
      const k = keys[i % 100];
      counts.set(k, (counts.get(k) ?? 0) + 1);
    }
    return (performance.now() - started) / n;
  };
  const pairs = {
    'connection opened / closed': () => {
      const started = performance.now();
      for (let i = 0; i < n / 2; i++) {
        const app = APPS[i % 100];
        meter.connectionOpened(app, 'websocket');
        meter.connectionClosed(app, 'websocket');
      }
      return (performance.now() - started) / n;
    },
    'channel attached / detached': () => {
      const started = performance.now();
      for (let i = 0; i < n / 2; i++) {
        const app = APPS[i % 100];
        meter.channelAttached(app, 'room');
        meter.channelDetached(app, 'room');
      }
      return (performance.now() - started) / n;
    },
    'message published / delivered': () => {
      const started = performance.now();
      for (let i = 0; i < n / 2; i++) {
        const app = APPS[i % 100];
        meter.messagePublished(app, 'room', 120);
        meter.messageDelivered(app, 'room', 120, 10);
      }
      return (performance.now() - started) / n;
    },
  };
  // Warm up the JIT on every loop first: the first run of a cold loop measures the compiler.
  baseline();
  for (const fn of Object.values(pairs)) fn();
  const base = best(baseline);
  console.log(`SDK cost per event (${n} events each, best of 3; node ${process.version})`);
  console.log(row(['event', 'per event', 'baseline', 'ratio']));
  console.log(row(['Map get + set (baseline)', `${(base * 1e6).toFixed(1)} ns`, '', '']));
  for (const [name, fn] of Object.entries(pairs)) {
    const t = best(fn);
    console.log(row([name, `${(t * 1e6).toFixed(1)} ns`, `${(base * 1e6).toFixed(1)} ns`, `${(t / base).toFixed(1)}x`]));
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function writes(client, seconds) {
  const widths = [20, 18, 12, 12, 26];
  console.log(`\nRedis writes with the flush timer running (${seconds} s per rate, ${APPS.length} apps)`);
  console.log(row(['events/s (target)', 'events/s (real)', 'flushes/s', 'fields/s', 'bound (flushes x apps x 2)'], widths));
  for (const rate of [10_000, 200_000]) {
    const prefix = `bench${randomBytes(4).toString('hex')}`;
    const store = new DatacenterStore(client, prefix, 'dc1');
    let fields = 0;
    const original = store.flush.bind(store);
    // Counts what each flush sends (a field per connection, channel and app's counters).
    store.flush = (incarnation, args) => {
      fields += args.conns.length + args.channels.length + args.counters.length;
      return original(incarnation, args);
    };
    const meter = new Meter(store, 'bench-writes', { logger: quiet });
    try {
      await meter.start();
      const flushes0 = meter.flushes;
      const fields0 = fields;
      let sent = 0;
      const started = performance.now();
      let elapsed;
      while ((elapsed = (performance.now() - started) / 1000) < seconds) {
        // Pace the events: bursts of 1000 pairs, then wait for the schedule (which also lets
        // the flush timer and its replies run: one thread does both, as in a gateway).
        for (let i = 0; i < 1000; i++) {
          const app = APPS[(sent + i) % 100];
          meter.connectionOpened(app);
          meter.connectionClosed(app);
        }
        sent += 2000;
        const ahead = sent / rate - elapsed;
        await sleep(ahead > 0 ? ahead * 1000 : 0);
      }
      const took = (performance.now() - started) / 1000;
      const flushes = (meter.flushes - flushes0) / took;
      const bound = flushes * APPS.length * 2;
      console.log(
        row(
          [
            rate.toLocaleString('en-US'),
            Math.round(sent / took).toLocaleString('en-US'),
            flushes.toFixed(1),
            Math.round((fields - fields0) / took).toLocaleString('en-US'),
            Math.round(bound).toLocaleString('en-US'),
          ],
          widths,
        ),
      );
    } finally {
      await meter.close();
      await deleteKeys(client, prefix);
    }
  }
  console.log('(at most 50 flushes/s, one per 20 ms: at most 10,000 fields/s for 100 apps, whatever the rate)');
}

async function main() {
  const { values } = parseArgs({ options: { events: { type: 'string' }, seconds: { type: 'string' } } });
  const n = Number(values.events ?? 1_000_000);
  const seconds = Number(values.seconds ?? 4);
  const client = new Redis(REDIS_URL);
  try {
    perEvent(client, n);
    await writes(client, seconds);
  } finally {
    await client.quit();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
