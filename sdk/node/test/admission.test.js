// The gateway's admission checks (src/admission.js, a port of metering/gateway/admission.py)
// against the real Redis, with the other frontends played by real Meters: the scenarios of
// tests/gateway/test_admission.py. The tick is played by writing what it writes.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Admission, CHANNELS_EXCEEDED, CONNECTIONS_EXCEEDED, DatacenterStore, Meter, globalKeys } from '../src/index.js';
import { CHECK, GlobalLive } from '../src/admission.js';
import { scratch, sleep, until } from './helpers.js';

const ACCOUNT = 7;
const APPS = ['71', '72'];
const HEARTBEAT_MS = 100;
const quiet = { debug() {}, info() {}, warning() {}, error() {} };

async function scene(t) {
  const { prefix, client } = await scratch(t);
  const dc = new DatacenterStore(client, prefix, 'dc1');
  const meters = [];
  t.after(async () => {
    for (const m of meters) await m.close().catch(() => {});
  });
  const s = {
    prefix,
    client,
    dc,
    async meter(frontend, { start = true } = {}) {
      const m = new Meter(dc, frontend, { flushIntervalMs: HEARTBEAT_MS, livenessTimeoutMs: 3000, logger: quiet });
      if (start) await m.start();
      meters.push(m);
      return m;
    },
    /** An Admission as the gateway builds it, its own counts from `meter`. */
    async gateway(meter, options = {}) {
      const adm = new Admission(client, prefix, {
        evidence: {
          datacenters: [dc],
          live: new GlobalLive(client, prefix),
          appsOf: (a) => (a === ACCOUNT ? APPS : []),
          incarnation: meter?.incarnation ?? '',
          connectionsHere: meter ? (apps) => meter.connectionsOf(apps) : undefined,
          channelsHere: meter ? (apps) => meter.channelsOf(apps) : undefined,
        },
        heartbeatMs: HEARTBEAT_MS,
        logger: quiet,
        ...options,
      });
      await adm.refresh();
      return adm;
    },
    /** The limits (as AdmissionStore.write) and the live counts (write_live). */
    async limits(rows, live) {
      const keys = globalKeys(prefix);
      if (rows) {
        await client.hset(keys.admission, rows);
        await client.set(keys.admissionVersion, Math.random().toString(16).slice(2));
      }
      if (live) await client.hset(keys.admissionLive, live);
    },
    /** What a tick leaves for the checks: its second, the account's value, active channels. */
    async tick(channels, { connections = 0 } = {}) {
      const base = `{${prefix}}`;
      await client.hset(`${base}:tick`, 'second', String(Math.floor(Date.now() / 1000)));
      await client.hset(`${base}:live:accounts`, String(ACCOUNT), `${connections} 0 0 ${channels.length}`);
      await client.del(`${base}:live:channels`);
      if (channels.length) await client.hset(`${base}:live:channels`, Object.fromEntries(channels.map((c) => [c, '1'])));
    },
  };
  return s;
}

async function connect(adm, meter, app = APPS[0]) {
  let refusal = adm.admitConnection(ACCOUNT);
  if (refusal === CHECK) refusal = await adm.checkConnection(ACCOUNT);
  if (refusal === null && meter) meter.connectionOpened(app);
  return refusal === null ? null : refusal.code;
}

async function attach(adm, meter, channel, app = APPS[0]) {
  let refusal = adm.admitChannel(ACCOUNT);
  if (refusal === CHECK) refusal = await adm.checkChannel(ACCOUNT, app, channel);
  if (refusal === null && meter) meter.channelAttached(app, channel);
  return refusal === null ? null : refusal.code;
}

async function connects(adm, meter, n) {
  const out = [];
  for (let i = 0; i < n; i += 1) out.push(await connect(adm, meter));
  return out;
}

const fill = (n, v) => Array.from({ length: n }, () => v);

test('a burst from nothing to the hard limit is accepted whole, then refused', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '6 - - -' });
  const here = await s.meter('gw-a');
  const adm = await s.gateway(here);
  // Not listed: the copy alone lets in 4 (it may hold 2); the rest by reads that find only
  // this gateway's own; the 7th is this gateway's own proof.
  assert.deepEqual(await connects(adm, here, 7), [...fill(6, null), CONNECTIONS_EXCEEDED]);
  const reads = adm.checks;
  assert.equal(await connect(adm, here), CONNECTIONS_EXCEEDED);
  assert.equal(adm.checks, reads, 'this gateway alone holds the limit: no read for that');
  here.connectionClosed(APPS[0]);
  adm.connectionClosed(ACCOUNT);
  assert.equal(await connect(adm, here), null, 'one closed: room for one');
  assert.equal(await connect(adm, here), CONNECTIONS_EXCEEDED);
});

test('refused at the limit held by a live frontend, and let in below it', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '10 - - -' });
  const other = await s.meter('gw-b');
  for (const app of [APPS[0], APPS[1], APPS[1]]) other.connectionOpened(app);
  await other.flush();
  const here = await s.meter('gw-a');
  const adm = await s.gateway(here);
  assert.deepEqual(await connects(adm, here, 8), [...fill(7, null), CONNECTIONS_EXCEEDED]);
  other.connectionClosed(APPS[1]);
  await other.flush();
  // The copy has no room, so the check reads: the other frontend's close is seen at once.
  assert.equal(await connect(adm, here), null);
  assert.equal(await connect(adm, here), CONNECTIONS_EXCEEDED);
});

test('a frontend that went silent (flushed once, then stopped) is no evidence', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '10 - - -' });
  const dead = await s.meter('gw-dead', { start: false });
  for (let i = 0; i < 8; i += 1) dead.connectionOpened(APPS[0]);
  await dead.flush(); // its last heartbeat: then killed, not reaped for 3 s
  await s.limits(null, { [ACCOUNT]: '8 0' }); // the tick saw the 8
  const here = await s.meter('gw-a');
  const adm = await s.gateway(here);
  // Its 8 clients reconnect here at once: all let in, though the tick counts the dead 8.
  assert.deepEqual(await connects(adm, here, 8), fill(8, null));
  assert.deepEqual(await connects(adm, here, 3), [null, null, CONNECTIONS_EXCEEDED]);
});

test('concurrent checks of one account share one read', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '4 - - -' }, { [ACCOUNT]: '4 0' });
  const other = await s.meter('gw-b');
  for (let i = 0; i < 4; i += 1) other.connectionOpened(APPS[0]);
  await other.flush();
  const adm = await s.gateway(await s.meter('gw-a'));
  for (let i = 0; i < 20; i += 1) assert.equal(adm.admitConnection(ACCOUNT), CHECK);
  const got = await Promise.all(fill(20, null).map(() => adm.checkConnection(ACCOUNT)));
  assert.deepEqual(got.map((r) => r?.code ?? null), fill(20, CONNECTIONS_EXCEEDED));
  assert.equal(adm.checks, 2, 'one proof (two reads) for all twenty');
});

test('a channel held elsewhere is not counted again', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '- 3 - -' });
  const other = await s.meter('gw-b');
  other.connectionOpened(APPS[0]);
  for (const c of ['a', 'b', 'c']) other.channelAttached(APPS[0], c);
  await other.flush();
  await s.tick(['71|a', '71|b', '71|c'], { connections: 1 });
  await s.limits(null, { [ACCOUNT]: '1 3' });
  const here = await s.meter('gw-a');
  const adm = await s.gateway(here);
  // Held elsewhere: the account still has three channels, whatever this gateway attaches.
  for (const c of ['a', 'b', 'c']) assert.equal(await attach(adm, here, c), null, c);
  assert.equal(await attach(adm, here, 'd'), CHANNELS_EXCEEDED, 'a fourth, on evidence');
  for (const m of [other, here]) {
    m.channelDetached(APPS[0], 'c');
    await m.flush();
  }
  await s.tick(['71|a', '71|b'], { connections: 1 }); // the tick sees two: room for one more
  assert.equal(await attach(adm, here, 'd'), null);
});

test('channels of a frontend gone silent are no evidence', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '- 3 - -' });
  const dead = await s.meter('gw-dead', { start: false });
  dead.connectionOpened(APPS[0]);
  for (const c of ['a', 'b', 'c']) dead.channelAttached(APPS[0], c);
  await dead.flush();
  await sleep(1000 - (Date.now() % 1000) + 10); // a tick second after any reap
  await s.tick(['71|a', '71|b', '71|c'], { connections: 1 });
  await s.limits(null, { [ACCOUNT]: '1 3' });
  const here = await s.meter('gw-a');
  const adm = await s.gateway(here);
  for (const c of ['x', 'y', 'z']) assert.equal(await attach(adm, here, c), null, c);
  await here.flush();
  assert.equal(await attach(adm, here, 'w'), CHANNELS_EXCEEDED, "this gateway's own three");
});

test('a gateway near the limit makes the others check; its own notices it ignores', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '10 - - -' });
  const [aMeter, bMeter] = [await s.meter('gw-a'), await s.meter('gw-b')];
  const a = await s.gateway(aMeter, { refreshIntervalMs: 60_000 });
  const b = await s.gateway(bMeter, { refreshIntervalMs: 60_000 });
  await a.start();
  await b.start();
  t.after(async () => {
    await a.close();
    await b.close();
  });
  await sleep(100); // subscribed
  assert.deepEqual(await connects(a, aMeter, 10), fill(10, null));
  await aMeter.flush();
  await until(
    () => {
      if (b.admitConnection(ACCOUNT) === CHECK) return true;
      b.connectionClosed(ACCOUNT); // undo the count of the accepted probe
      return false;
    },
    { what: 'the notice at the other gateway' },
  );
  assert.notEqual(await b.checkConnection(ACCOUNT), null);
  assert.equal(a._flagged.size, 0, 'its own notices are not a reason to check');
});

test('without evidence a copy with no room lets in after the check', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '2 2 - -' }, { [ACCOUNT]: '2 2' });
  const adm = new Admission(s.client, s.prefix, { logger: quiet });
  await adm.refresh();
  for (let i = 0; i < 3; i += 1) {
    assert.equal(adm.admitConnection(ACCOUNT), CHECK);
    assert.equal(await adm.checkConnection(ACCOUNT), null);
    assert.equal(adm.admitChannel(ACCOUNT), CHECK);
    assert.equal(await adm.checkChannel(ACCOUNT, APPS[0], null), null);
  }
});

test('a check that cannot read Redis fails open, or closed when told to', async (t) => {
  const s = await scene(t);
  await s.limits({ [ACCOUNT]: '1 - - -' }, { [ACCOUNT]: '1 0' });
  const broken = { base: '{x}', client: s.client, scripts: { run: () => Promise.reject(new Error('down')) } };
  for (const failOpen of [true, false]) {
    const adm = await s.gateway(null, { failOpen });
    adm.evidence.datacenters = [broken];
    assert.equal(adm.admitConnection(ACCOUNT), CHECK);
    const got = await adm.checkConnection(ACCOUNT);
    assert.equal(got === null ? null : got.code, failOpen ? null : 50310);
  }
});
