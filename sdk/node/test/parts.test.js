// The parts around the Meter: settings, the scripts' loading, JSON as Python writes it, the
// app registry and admission, each against the real Redis where it reads one.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { CHECK } from '../src/admission.js';
import {
  Admission,
  AppRegistry,
  CHANNELS_EXCEEDED,
  CONNECTIONS_EXCEEDED,
  MESSAGES_EXCEEDED,
  RegistryUnavailable,
  Scripts,
  SettingsError,
  UNAVAILABLE,
  datacenterUrl,
  globalKeys,
  loadSettings,
  pyjson,
  validAppId,
} from '../src/index.js';
import { scratch, sleep, until } from './helpers.js';

const quiet = { debug() {}, info() {}, warning() {}, error() {} };

test('settings read the Python names, defaults and checks', () => {
  const s = loadSettings({});
  assert.equal(s.redisPrefix, 'metering');
  assert.equal(s.flushIntervalMs, 250);
  assert.equal(s.livenessTimeoutMs, 3000);
  assert.equal(s.maxMessageBytes, 65536);
  assert.equal(s.admissionFailOpen, true);
  const t = loadSettings({
    METERING_FLUSH_INTERVAL: 'PT0.5S',
    METERING_LIVENESS_TIMEOUT: '1.5',
    METERING_ADMISSION_FAIL_OPEN: 'off',
    METERING_DATACENTERS: ' eu=redis://a:1/0 , us=redis://b:2/0 ',
    METERING_DATACENTER: 'us',
    METERING_TEST_ANYTHING: 'x', // the test suite's own variables are no settings
    METERING_DATABASE_URL: 'postgresql://x', // a Python-only setting: known, unused here
  });
  assert.equal(t.flushIntervalMs, 500);
  assert.equal(t.livenessTimeoutMs, 1500);
  assert.equal(t.admissionFailOpen, false);
  assert.equal(datacenterUrl(t, 'us'), 'redis://b:2/0');
  assert.throws(
    () => datacenterUrl(t, 'ap'),
    (err) =>
      err instanceof SettingsError &&
      err.message ===
        "datacenter 'ap' is not one the engine reads (eu, us); set METERING_DATACENTER, or list it in METERING_DATACENTERS",
  );
  assert.equal(datacenterUrl(loadSettings({ METERING_REDIS_URL: 'redis://p/0' }), 'local'), 'redis://p/0');
  assert.throws(() => loadSettings({ METERING_FLUSH_INTERVALL: '1' }), /unknown setting METERING_FLUSH_INTERVALL/);
  assert.throws(() => loadSettings({ METERING_MAX_MESSAGE_BYTES: 'lots' }), /invalid setting METERING_MAX_MESSAGE_BYTES/);
  assert.throws(() => loadSettings({ METERING_REDIS_PREFIX: 'a:b' }), /must be non-empty, without braces/);
  assert.throws(() => loadSettings({ METERING_DATACENTERS: 'eu' }), /expected dc=url pairs/);
  assert.throws(() => loadSettings({ METERING_FLUSH_INTERVAL: '5' }), /flush_interval must be shorter than liveness_timeout/);
  assert.throws(() => loadSettings({ METERING_FLUSH_MIN_INTERVAL: '0' }), /flush_min_interval must be positive/);
});

test('scripts are the repository files with _common.lua in front, as the Python loader sends', () => {
  const scripts = new Scripts();
  const dir = new URL('../../../metering/live/lua/', import.meta.url);
  const expected = readFileSync(new URL('_common.lua', dir), 'utf8') + readFileSync(new URL('flush.lua', dir), 'utf8');
  assert.equal(scripts.source('flush'), expected);
  assert.equal(createHash('sha1').update(scripts.source('flush')).digest('hex').length, 40);
  assert.throws(() => new Scripts('/nonexistent/lua').source('flush'), /NODE_METERING_LUA_DIR/);
});

test('JSON reads and writes as Python json does', () => {
  const cases = [
    ['[1.0,1e16,1e-5,1e-4,-0.0,-0,12345678901234567890,1e400]', '[1.0,1e+16,1e-05,0.0001,-0.0,0,12345678901234567890,Infinity]'],
    ['{"b":1,"2":0,"1":0,"a":{"x":1,"x":2}}', '{"b":1,"2":0,"1":0,"a":{"x":2}}'],
    [' "\\u00e9\\n\\u0001\\/" ', '"é\\n\\u0001/"'],
    ['[true,false,null,"😀"]', '[true,false,null,"😀"]'],
  ];
  for (const [text, written] of cases) assert.equal(pyjson.encode(pyjson.parse(text)), written);
  for (const bad of ['{', '[1,]', 'NaN', 'Infinity', '01', '1.', '.5', '"\\x"', '"a\tb"', '\ufeff{}', '{"a":1}x', '']) {
    assert.throws(() => pyjson.parse(bad), pyjson.JSONError, JSON.stringify(bad));
  }
  assert.throws(() => pyjson.parse('1'.repeat(4301)), pyjson.JSONError);
  assert.equal(pyjson.encode(pyjson.parse('1'.repeat(4300))), '1'.repeat(4300));
  assert.throws(() => pyjson.parse('['.repeat(pyjson.MAX_DEPTH + 1) + ']'.repeat(pyjson.MAX_DEPTH + 1)), pyjson.JSONError);
  assert.ok(pyjson.hasLoneSurrogate(pyjson.encode(pyjson.parse('"\\ud800"'))));
  assert.equal(pyjson.decodeBody(Buffer.from('\ufeff{"a":1}', 'utf16le')), '{"a":1}');
  assert.equal(pyjson.pyLen('😀é'), 2);
  assert.equal(pyjson.pySlice('😀😀😀', 2), '😀😀');
});

async function publishRegistry(client, prefix, owners, { complete }) {
  const keys = globalKeys(prefix);
  await client.hset(keys.apps, owners);
  if (complete) await client.set(keys.appsSynced, String(Date.now() / 1000));
}

test('the registry answers known apps from memory, unknown ones only on evidence', async (t) => {
  const { prefix, client } = await scratch(t);
  assert.ok(validAppId('1') && validAppId('9'.repeat(20)));
  for (const bad of ['', '9'.repeat(21), '-1', '1.0', ' 1', 'x', '\u0661']) assert.ok(!validAppId(bad), bad);

  await publishRegistry(client, prefix, { 1: '10' }, { complete: false });
  const registry = new AppRegistry(client, prefix, { refreshIntervalMs: 3_600_000, negativeTtlMs: 200, refillWaitMs: 300, logger: quiet });
  await registry.start();
  t.after(() => registry.close());
  assert.equal(await registry.resolve('1'), 10);
  assert.equal(registry.lookups, 0);
  // An incomplete mirror is no evidence that an app does not exist.
  await assert.rejects(registry.resolve('3'), RegistryUnavailable);

  await publishRegistry(client, prefix, { 2: '20' }, { complete: true });
  assert.deepEqual(await Promise.all([1, 2, 3].map(() => registry.resolve('2'))), [20, 20, 20]);
  const lookups = registry.lookups;
  for (let i = 0; i < 5; i++) assert.equal(await registry.resolve('3'), null);
  assert.equal(registry.lookups, lookups + 1, 'the miss is remembered');
  for (const bad of ['x', '', '-3']) assert.equal(await registry.resolve(bad), null);
  await client.hset(globalKeys(prefix).apps, '3', '30');
  await sleep(250);
  assert.equal(await registry.resolve('3'), 30, 'remembered for a short while only');
});

async function writeAdmission(client, prefix, rows, live) {
  // As metering/limits/store.py's AdmissionStore.write and write_live.
  const keys = globalKeys(prefix);
  if (rows) {
    await client.hset(keys.admission, rows);
    await client.set(keys.admissionVersion, Math.random().toString(16).slice(2)); // as store.py
    await client.publish(keys.admissionNotices, 'limits');
  }
  if (live) {
    await client.hset(keys.admissionLive, live);
    await client.publish(keys.admissionNotices, 'live');
  }
}

test('admission refuses at the hard limit, counting what this gateway let in since the tick', async (t) => {
  const { prefix, client } = await scratch(t);
  const month = new Date().toISOString().slice(0, 7);
  await writeAdmission(client, prefix, { 7: '4 2 - -', 8: `- - ${month} messages` }, null);
  const admission = new Admission(client, prefix, { refreshIntervalMs: 60_000, logger: quiet });
  await admission.start();
  t.after(() => admission.close());

  // Not in the live counts: below half of 4, taken as 1 held; 3 more fit here. Then the copy
  // has no room, which proves nothing: a check must read (never a refusal from the copy).
  assert.equal(admission.admitConnection(7), null);
  assert.equal(admission.admitConnection(7), null);
  assert.equal(admission.admitConnection(7), null);
  assert.equal(admission.admitConnection(7), CHECK);
  admission.connectionClosed(7);
  assert.equal(admission.admitConnection(7), null);
  assert.equal(admission.admitConnection(99), null, 'an account with nothing enforced');
  assert.equal(admission.admitMessage(8).code, MESSAGES_EXCEEDED);
  assert.match(admission.admitMessage(8).reason, /monthly messages limit exceeded/);
  assert.ok(admission.admitMessage(8).retryAfter >= 1);

  // A tick's live counts, by notice: 2 channels held, the hard limit.
  await writeAdmission(client, prefix, null, { 7: '1 2' });
  await until(() => admission.admitChannel(7) !== null, { what: 'the live notice' });
  assert.equal(admission.admitChannel(7), CHECK);
  await writeAdmission(client, prefix, null, { 7: '1 1' });
  await until(() => admission.admitChannel(7) === null, { what: 'the lower count' });
  assert.equal(admission.admitChannel(7), CHECK, 'the one it let in counts');
  admission.channelReleased(7);
  assert.equal(admission.admitChannel(7), null);
});

test('admission with a copy gone stale fails open, or refuses everything when told to', async (t) => {
  const { prefix, client } = await scratch(t);
  await writeAdmission(client, prefix, { 7: '1 - - -' }, { 7: '1 0' });
  let now = 0;
  const clock = () => now;
  const open = new Admission(client, prefix, { clock, staleAfterMs: 1000, logger: quiet });
  const closed = new Admission(client, prefix, { clock, staleAfterMs: 1000, failOpen: false, logger: quiet });
  await open.refresh();
  await closed.refresh();
  assert.equal(open.admitConnection(7), CHECK);
  now = 2000; // no refresh for longer than staleAfterMs
  assert.equal(open.admitConnection(7), null);
  assert.equal(closed.admitConnection(7).code, UNAVAILABLE);
  assert.equal(closed.admitConnection(99).code, UNAVAILABLE);
  assert.equal(open.admitConnection(99), null);
});
