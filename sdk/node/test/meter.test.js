// The Meter against the real Redis, run with the engine's own Lua scripts: what it writes is
// read back as docs/redis-keys.md lays it out (tests/conformance reads it with the Python
// store as well).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Redis } from 'ioredis';

import { DatacenterStore, Meter, createClient, datacenterKeys } from '../src/index.js';
import { deleteKeys, freePort, hashNumbers, scratch, sleep, startRedis, until } from './helpers.js';

const DC = 'dc1';
const quiet = { debug() {}, info() {}, warning() {}, error() {} };

function meterOf(client, prefix, frontendId = 'gw-t', options = {}) {
  const store = new DatacenterStore(client, prefix, DC);
  return new Meter(store, frontendId, { logger: quiet, ...options });
}

test('a flush writes absolute counts per app, transport, channel and counter', async (t) => {
  const { prefix, client } = await scratch(t);
  const keys = datacenterKeys(prefix, DC);
  const meter = meterOf(client, prefix);
  for (let i = 0; i < 3; i++) meter.connectionOpened('1');
  meter.connectionOpened('1', 'streaming');
  meter.connectionOpened('2', 'long_poll');
  meter.connectionOpened('2');
  meter.connectionClosed('2');
  meter.channelAttached('1', 'room');
  meter.channelAttached('1', 'room');
  meter.channelAttached('1', 'a|b'); // channel names may hold '|'
  meter.channelAttached('2', 'room');
  meter.messagePublished('1', 'room', 100);
  meter.messageDelivered('1', 'room', 100, 3);
  meter.connectionRefused('2');
  meter.channelRefused('2');
  meter.messageRefused('2', 4);

  assert.equal(await meter.flush(), 'ok');

  assert.deepEqual(await hashNumbers(client, keys.conns('w')), { 1: 3 });
  assert.deepEqual(await hashNumbers(client, keys.conns('s')), { 1: 1 });
  assert.deepEqual(await hashNumbers(client, keys.conns('l')), { 2: 1 });
  assert.deepEqual(await hashNumbers(client, keys.channels), { '1|room': 1, '1|a|b': 1, '2|room': 1 });
  const fe = keys.frontend(meter.incarnation);
  assert.deepEqual(await hashNumbers(client, fe.conns), { '1|w': 3, '1|s': 1, '2|l': 1 });
  assert.deepEqual(await client.hgetall(fe.counters), {
    1: '4 0 1 100 3 300 0 0',
    2: '2 1 0 0 0 0 1 4',
  });
  assert.equal(await client.hget(keys.frontendIds, 'gw-t'), meter.incarnation);
  assert.ok(await client.zscore(keys.frontends, meter.incarnation));
  assert.match(meter.incarnation, /^gw-t#\d{10}-[0-9a-f]{8}$/);
});

test('a flush sends only what changed since the last one', async (t) => {
  const { prefix, client } = await scratch(t);
  const keys = datacenterKeys(prefix, DC);
  const meter = meterOf(client, prefix);
  meter.connectionOpened('1');
  meter.connectionOpened('2');
  meter.channelAttached('1', 'kept');
  assert.equal(await meter.flush(), 'ok');
  const before = Object.fromEntries(
    (await client.zrange(keys.changesApps, 0, -1, 'WITHSCORES')).flatMap((v, i, a) => (i % 2 ? [] : [[v, a[i + 1]]])),
  );
  const countersBefore = await client.zscore(keys.frontend(meter.incarnation).counterApps, '1');

  // A heartbeat with nothing new writes no field: the change sequence does not move.
  const seq = await client.get(keys.seq);
  assert.equal(await meter.flush(), 'ok');
  assert.equal(await client.get(keys.seq), seq);

  meter.connectionOpened('2');
  assert.equal(await meter.flush(), 'ok');
  const after = await client.zrange(keys.changesApps, 0, -1, 'WITHSCORES');
  const scores = Object.fromEntries(after.flatMap((v, i, a) => (i % 2 ? [] : [[v, a[i + 1]]])));
  assert.equal(scores['1'], before['1'], 'app 1 did not change: not written');
  assert.notEqual(scores['2'], before['2']);
  assert.equal(await client.zscore(keys.frontend(meter.incarnation).counterApps, '1'), countersBefore);
  assert.deepEqual(await hashNumbers(client, keys.conns('w')), { 1: 1, 2: 2 });

  // Gone to zero: the field is removed, not left at 0.
  meter.connectionClosed('1');
  meter.channelDetached('1', 'kept');
  assert.equal(await meter.flush(), 'ok');
  assert.deepEqual(await hashNumbers(client, keys.conns('w')), { 2: 2 });
  assert.deepEqual(await client.hgetall(keys.channels), {});
  assert.deepEqual(await hashNumbers(client, keys.frontend(meter.incarnation).conns), { '2|w': 2 });
});

test('a close without its open never goes negative', async (t) => {
  const { prefix, client } = await scratch(t);
  const meter = meterOf(client, prefix);
  meter.connectionClosed('1');
  meter.channelDetached('1', 'x');
  meter.connectionOpened('1');
  assert.equal(await meter.flush(), 'ok');
  assert.deepEqual(await hashNumbers(client, datacenterKeys(prefix, DC).conns('w')), { 1: 1 });
  assert.throws(() => meter.connectionOpened('1', 'carrier-pigeon'), /unknown transport/);
});

test('a restart under the same frontend id replaces the old incarnation at once', async (t) => {
  const { prefix, client } = await scratch(t);
  const keys = datacenterKeys(prefix, DC);
  let superseded = 0;
  const old = meterOf(client, prefix, 'gw-same', { onSuperseded: () => (superseded += 1) });
  for (let i = 0; i < 4; i++) old.connectionOpened('1');
  old.channelAttached('1', 'room');
  assert.equal(await old.flush(), 'ok');

  const next = meterOf(client, prefix, 'gw-same');
  next.connectionOpened('1');
  assert.equal(await next.flush(), 'replaced');
  // Never both: the old counts went in the same script call that added the new ones.
  assert.deepEqual(await hashNumbers(client, keys.conns('w')), { 1: 1 });
  assert.deepEqual(await client.hgetall(keys.channels), {});
  assert.deepEqual(Object.keys(await next.store.incarnations()), [next.incarnation]);
  assert.equal(await client.get(keys.superseded(old.incarnation)), next.incarnation);

  // The old process, still running (two given one id), learns it and stops counting.
  old.connectionOpened('1');
  assert.equal(await old.flush(), 'superseded');
  assert.equal(old.superseded, true);
  assert.equal(superseded, 1);
  assert.equal(await old.flush(), 'superseded');
  assert.equal(superseded, 1, 'told once');
  await old.close(); // does not deregister the new one
  assert.deepEqual(await hashNumbers(client, keys.conns('w')), { 1: 1 });
  assert.equal(await next.flush(), 'ok');
});

test('close flushes the last events and removes the counts at once; counters stay', async (t) => {
  const { prefix, client } = await scratch(t);
  const keys = datacenterKeys(prefix, DC);
  const meter = meterOf(client, prefix);
  await meter.start();
  meter.connectionOpened('1');
  meter.channelAttached('1', 'room');
  meter.messagePublished('1', 'room', 7);
  await meter.close();
  assert.deepEqual(await client.zrange(keys.frontends, 0, -1), []);
  assert.deepEqual(await client.hgetall(keys.conns('w')), {});
  assert.deepEqual(await client.hgetall(keys.channels), {});
  assert.equal(await client.hget(keys.frontendIds, 'gw-t'), null);
  // The aggregator reads the final totals after the reaping.
  assert.equal(await client.hget(keys.frontend(meter.incarnation).counters, '1'), '1 0 1 7 0 0 0 0');
  assert.ok(await client.zscore(keys.retired, meter.incarnation));
});

test('an incarnation Redis no longer knows sends its whole state again', async (t) => {
  const { prefix, client } = await scratch(t);
  const keys = datacenterKeys(prefix, DC);
  const meter = meterOf(client, prefix);
  meter.connectionOpened('1');
  meter.connectionOpened('1', 'streaming');
  meter.channelAttached('1', 'room');
  meter.messagePublished('1', 'room', 5);
  assert.equal(await meter.flush(), 'ok');

  await deleteKeys(client, prefix); // as a Redis restarted empty (only this test's keys)
  meter.connectionOpened('2'); // one change, but the flush must resend everything
  assert.equal(await meter.flush(), 'ok');
  assert.deepEqual(await hashNumbers(client, keys.conns('w')), { 1: 1, 2: 1 });
  assert.deepEqual(await hashNumbers(client, keys.conns('s')), { 1: 1 });
  assert.deepEqual(await hashNumbers(client, keys.channels), { '1|room': 1 });
  assert.deepEqual(await client.hgetall(keys.frontend(meter.incarnation).counters), {
    1: '2 0 1 5 0 0 0 0',
    2: '1 0 0 0 0 0 0 0',
  });
  assert.ok(await client.get(keys.epoch), 'the epoch is set again: the tick knows to resync');
});

test('an incarnation silent past the liveness timeout is told unknown and re-registers', async (t) => {
  const { prefix, client } = await scratch(t);
  const keys = datacenterKeys(prefix, DC);
  const meter = meterOf(client, prefix, 'gw-t', { livenessTimeoutMs: 300, flushIntervalMs: 100 });
  meter.connectionOpened('1');
  assert.equal(await meter.flush(), 'ok');
  await sleep(400); // a pause (a long GC, a stopped VM): it is dead as far as counting goes
  assert.equal(await meter.flush(), 'ok'); // 'unknown', then the full resync
  assert.deepEqual(await hashNumbers(client, keys.conns('w')), { 1: 1 });
});

test('the timer flushes soon after a change and heartbeats in between', async (t) => {
  const { prefix, client } = await scratch(t);
  const keys = datacenterKeys(prefix, DC);
  const meter = meterOf(client, prefix);
  await meter.start();
  t.after(() => meter.close());
  const started = Date.now();
  meter.connectionOpened('1');
  await until(async () => (await client.hget(keys.conns('w'), '1')) === '1', { what: 'the flush' });
  assert.ok(Date.now() - started < 200, 'soon after the change, not at the next heartbeat');
  const seen = Number(await client.zscore(keys.frontends, meter.incarnation));
  await sleep(400);
  assert.ok(Number(await client.zscore(keys.frontends, meter.incarnation)) > seen, 'heartbeat');
  const flushes = meter.flushes;
  await sleep(500);
  // The heartbeat alone: about 2 in 500 ms, never one per poll.
  assert.ok(meter.flushes - flushes <= 3, `${meter.flushes - flushes} flushes in 500 ms`);
});

test('with Redis away it counts in memory and registers once Redis is there', async (t) => {
  const port = await freePort();
  const url = `redis://127.0.0.1:${port}/0`;
  const warnings = [];
  const logger = { ...quiet, warning: (event) => warnings.push(event) };
  const client = createClient(url, { logger });
  const meter = new Meter(new DatacenterStore(client, 'tnodeaway', DC), 'gw-away', { logger });
  await meter.start();
  assert.ok(warnings.includes('metering.redis_unavailable'), warnings.join());
  meter.connectionOpened('1');
  meter.connectionOpened('1');
  meter.connectionClosed('1');
  await sleep(300);
  const server = await startRedis(port);
  t.after(() => server.kill());
  const reader = new Redis(url);
  t.after(async () => {
    await meter.close();
    client.disconnect();
    await reader.quit();
  });
  const keys = datacenterKeys('tnodeaway', DC);
  await until(async () => (await reader.hget(keys.conns('w'), '1')) === '1', { timeoutMs: 5000, what: 'the registration' });
  assert.equal(await reader.hget(keys.frontend(meter.incarnation).counters, '1'), '2 0 0 0 0 0 0 0');
  assert.ok(warnings.includes('metering.redis_recovered'), warnings.join());
});
