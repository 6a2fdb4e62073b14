// Redis clients as the gateway uses them: bounded connect and command times (as the Python
// side's socket_connect_timeout=2, socket_timeout=5), and no queueing while disconnected, so a
// flush fails at once and the meter keeps counting in memory instead of piling up commands.
import { Redis } from 'ioredis';

import { defaultLogger } from './log.js';

function redact(url) {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return url;
  }
}

/** A client of `url` that logs once when Redis goes away and once when it is back. */
export function createClient(url, { logger = defaultLogger, name = 'redis', ...options } = {}) {
  const client = new Redis(url, {
    connectTimeout: 2000,
    commandTimeout: 5000,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    // Reconnect soon, then at most every second: the flush heartbeat is 250 ms.
    retryStrategy: (times) => Math.min(25 * 2 ** times, 1000),
    ...options,
  });
  let down = false;
  client.on('error', (err) => {
    if (!down) {
      down = true;
      logger.warning('gateway.redis_unreachable', { client: name, url: redact(url), error: err.message });
    }
  });
  client.on('ready', () => {
    if (down) {
      down = false;
      logger.warning('gateway.redis_reachable', { client: name, url: redact(url) });
    }
  });
  return client;
}

/** Resolves once `client` is connected, or after `timeoutMs` (whichever comes first). */
export function ready(client, timeoutMs = 2000) {
  if (client.status === 'ready') return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = (value) => {
      clearTimeout(timer);
      client.off('ready', onReady);
      resolve(value);
    };
    const onReady = () => done(true);
    const timer = setTimeout(() => done(false), timeoutMs);
    client.on('ready', onReady);
  });
}
