// Shared by the unit tests: the real Redis of the test suite, a key prefix of each test's own.
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';

import { Redis } from 'ioredis';

export const REDIS_URL = process.env.METERING_TEST_REDIS_URL || 'redis://127.0.0.1:6379/0';

/** A fresh prefix and a client; every key under the prefix is deleted when the test ends. */
export async function scratch(t) {
  const prefix = `tnode${randomBytes(5).toString('hex')}`;
  const client = new Redis(REDIS_URL, { lazyConnect: true });
  await client.connect();
  t.after(async () => {
    await deleteKeys(client, prefix);
    await client.quit();
  });
  return { prefix, client };
}

/** Every key under a prefix (both hash-tag groups), never anything else: Redis is shared. */
export async function deleteKeys(client, prefix) {
  let cursor = '0';
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', `{${prefix}*`, 'COUNT', 1000);
    if (keys.length) await client.del(...keys);
    cursor = next;
  } while (cursor !== '0');
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Poll `check` until it returns something truthy; fails after `timeoutMs`. */
export async function until(check, { timeoutMs = 3000, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** A TCP port nothing listens on now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on('error', reject);
  });
}

/** A throwaway redis-server on `port` (the suite's Redis is shared: never stop that one). */
export async function startRedis(port) {
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  await new Promise((resolve, reject) => {
    let out = '';
    proc.on('error', (err) => reject(new Error(`redis-server is needed (apt-get install redis-server): ${err.message}`)));
    proc.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('Ready to accept connections')) resolve();
    });
    proc.on('exit', (code) => reject(new Error(`redis-server exited ${code}: ${out}`)));
  });
  return proc;
}

/** A hash as an object of numbers. */
export async function hashNumbers(client, key) {
  const raw = await client.hgetall(key);
  return Object.fromEntries(Object.entries(raw).map(([k, v]) => [k, Number(v)]));
}
