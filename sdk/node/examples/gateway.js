#!/usr/bin/env node
// The example realtime gateway in Node.js, on the metering SDK: the protocol of the Python
// `metering gateway` (metering/gateway/server.py, the reference) at the same URLs, with the
// same frames, replies, status codes, error codes and messages.
//
//   node sdk/node/examples/gateway.js --port P --frontend-id ID --datacenter DC [--host H]
//
// Settings come from the same METERING_* variables as the Python gateway; the flags override
// METERING_GATEWAY_PORT, METERING_GATEWAY_FRONTEND_ID, METERING_DATACENTER and
// METERING_GATEWAY_HOST. Prints one line once it listens, as the Python gateway does:
// `gateway ID (DC) listening on http://HOST:PORT`.
//
// Every realtime connection (a WebSocket, an event stream) is counted from the moment it is
// open until it closes, exactly once whatever ends it; REST publishes are never connections.
// Channels are per app. Messages fan out to the connections attached on *this* gateway only.
// A message's size is the length in bytes of the UTF-8 of its `data` as Python's compact
// json.dumps writes it (pyjson.js), the same text subscribers get in their `message` frames.
import { randomBytes } from 'node:crypto';
import { STATUS_CODES, createServer } from 'node:http';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { WebSocketServer } from 'ws';

import {
  Admission,
  AppRegistry,
  DatacenterStore,
  EMBEDDED_REDIS_URL,
  Meter,
  RegistryUnavailable,
  Scripts,
  SettingsError,
  createClient,
  createLogger,
  datacenterUrl,
  datacenterUrls,
  loadSettings,
  ready,
} from '../src/index.js';
import { CHECK, GlobalLive } from '../src/admission.js';
import { JSONError, decodeBody, encode, encodeString, hasLoneSurrogate, parse, pyLen, pySlice } from '../src/pyjson.js';

// Error codes: the HTTP status times 100, plus a detail (as server.py).
const BAD_REQUEST = 40000;
const TOO_LARGE = 40009;
const BAD_CHANNEL = 40010;
const UNKNOWN_APP = 40400;
const SHUTTING_DOWN = 50300;
// Whether the app exists cannot be told now (the registry unreachable, or being refilled).
const REGISTRY_UNAVAILABLE = 50301;

const MAX_BATCH = 100; // messages in one REST publish
const QUEUE_FRAMES = 1024; // frames waiting for one client before it is dropped as too slow
const HEARTBEAT_MS = 15_000; // between ": ping" comments on an event stream
const DRAIN_TIMEOUT_MS = 5000; // a shutdown waits this long for the connections to close
const CLOSE_TIMEOUT_MS = 2000; // a client that stopped reading may never let the close through

const GOING_AWAY = 1001;
const POLICY_VIOLATION = 1008;
const KEEPALIVE_TIMEOUT = 1011;

// Control characters, and lone surrogates (valid JSON escapes that UTF-8 cannot encode).
const BAD_CHARS = /[\x00-\x1f\x7f-\x9f\ud800-\udfff]/u;

/** The hard cap on one WebSocket frame: a frame above it closes the connection (1009). */
function maxFrameBytes(settings) {
  return 2 * settings.maxMessageBytes + 4096;
}

/** Bad input: answered with an error, nothing counted. */
class Rejected extends Error {
  constructor(code, message, status = 400) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

function errorBody(status, code, message) {
  return encode(new Map([['error', new Map([['code', code], ['statusCode', status], ['message', message]])]]));
}

function errorFrame(code, message) {
  return encode(new Map([['action', 'error'], ['error', new Map([['code', code], ['message', message]])]]));
}

function sse(event, data) {
  return `event: ${event}\ndata: ${data}\n\n`;
}

function parseFrame(text) {
  try {
    return parse(text);
  } catch (err) {
    if (err instanceof JSONError) throw new Rejected(BAD_REQUEST, 'malformed JSON');
    throw err;
  }
}

/** A response not yet written: the status and the JSON body. */
class Reply {
  constructor(status, body, headers = {}) {
    this.status = status;
    this.body = body;
    this.headers = headers;
  }

  static error(status, code, message) {
    return new Reply(status, errorBody(status, code, message));
  }
}

/** One realtime connection on this gateway and the frames on their way to it. */
class Connection {
  constructor(app, account, transport, write, end) {
    this.id = randomBytes(12).toString('base64url');
    this.app = app;
    this.account = account;
    this.transport = transport;
    this.channels = new Set();
    this.closed = false;
    this.closeCode = null; // set when the gateway ends it, not the client
    this.closeReason = '';
    this.pending = 0; // frames handed to the socket and not yet written out
    this._write = write;
    this._end = end;
    this.log = null;
  }

  /** Send a frame as is; a client too slow to keep up is dropped instead of buffered. */
  send(frame) {
    if (this.closed || this.closeCode !== null) return false;
    if (this.pending >= QUEUE_FRAMES) {
      this.log?.info('gateway.slow_client_dropped', { app: this.app, connection: this.id });
      this.stop(POLICY_VIOLATION, 'too slow: messages were not read in time');
      return false;
    }
    this.pending += 1;
    this._write(frame, () => {
      this.pending -= 1;
    });
    return true;
  }

  /** Send a `message` frame, as an event on an event stream. */
  deliver(frame) {
    return this.send(this.transport === 'streaming' ? sse('message', frame) : frame);
  }

  /** End the connection from the server side. */
  stop(code, reason) {
    if (this.closeCode === null) {
      this.closeCode = code;
      this.closeReason = reason;
      this._end(code, reason);
    }
  }
}

/** The state of one gateway: its connections and who is attached to which channel. */
class Gateway {
  constructor(meter, registry, admission, settings, log) {
    this.meter = meter;
    this.registry = registry;
    this.admission = admission;
    this.settings = settings;
    this.log = log;
    this.connections = new Set();
    this.subscriptions = new Map(); // '<app>|<channel>' -> Set of connections here
    this.closing = false;
    this._idle = [];
  }

  // -- counting: every change of a connection or an attachment goes through these ------

  open(conn) {
    conn.log = this.log;
    this.connections.add(conn);
    this.meter.connectionOpened(conn.app, conn.transport);
  }

  /** Detach everything and count the close; safe to call more than once. */
  close(conn) {
    if (conn.closed) return;
    conn.closed = true;
    for (const channel of [...conn.channels]) this.detach(conn, channel);
    this.connections.delete(conn);
    this.meter.connectionClosed(conn.app, conn.transport);
    this.admission.connectionClosed(conn.account);
    if (this.connections.size === 0) for (const resolve of this._idle.splice(0)) resolve();
  }

  attach(conn, channel) {
    if (conn.channels.has(channel)) return;
    const limit = this.settings.maxChannelsPerConnection;
    if (conn.channels.size >= limit) {
      throw new Rejected(BAD_CHANNEL, `too many channels attached on one connection (max ${limit})`);
    }
    const subscribers = this.subscriptions.get(`${conn.app}|${channel}`);
    if (!subscribers || subscribers.size === 0) {
      // A channel new here may be a channel new to the account: one more active.
      const refusal = this.admission.admitChannel(conn.account);
      // The copy cannot tell: a promise of the attach, once a check has read the evidence.
      if (refusal === CHECK) return this.checkedAttach(conn, channel);
      if (refusal !== null) {
        this.meter.channelRefused(conn.app);
        throw new Rejected(refusal.code, refusal.reason, 403);
      }
    }
    this.attached(conn, channel);
    return undefined;
  }

  async checkedAttach(conn, channel) {
    const refusal = await this.admission.checkChannel(conn.account, conn.app, channel);
    if (conn.closed || conn.channels.has(channel)) return; // ended (or attached by a frame before) while the check read
    if (refusal !== null) {
      this.meter.channelRefused(conn.app);
      throw new Rejected(refusal.code, refusal.reason, 403);
    }
    this.attached(conn, channel);
  }

  attached(conn, channel) {
    const key = `${conn.app}|${channel}`;
    conn.channels.add(channel);
    let subscribers = this.subscriptions.get(key);
    if (!subscribers) {
      subscribers = new Set();
      this.subscriptions.set(key, subscribers);
    }
    subscribers.add(conn);
    this.meter.channelAttached(conn.app, channel);
  }

  detach(conn, channel) {
    if (!conn.channels.has(channel)) return;
    conn.channels.delete(channel);
    const key = `${conn.app}|${channel}`;
    const subscribers = this.subscriptions.get(key);
    if (subscribers !== undefined) {
      subscribers.delete(conn);
      if (subscribers.size === 0) {
        this.subscriptions.delete(key);
        this.admission.channelReleased(conn.account);
      }
    }
    this.meter.channelDetached(conn.app, channel);
  }

  /** Fan a message (`data` already encoded) out here; returns how many got it. */
  publish(app, channel, data, nbytes) {
    let recipients = 0;
    const subscribers = this.subscriptions.get(`${app}|${channel}`);
    if (subscribers) {
      const frame = `{"action":"message","channel":${encodeString(channel)},"data":${data}}`;
      for (const conn of [...subscribers]) recipients += conn.deliver(frame) ? 1 : 0;
    }
    this.meter.messagePublished(app, channel, nbytes);
    if (recipients) this.meter.messageDelivered(app, channel, nbytes, recipients);
    return recipients;
  }

  // -- validation -----------------------------------------------------------------------

  channel(value) {
    if (typeof value !== 'string' || !value) throw new Rejected(BAD_CHANNEL, 'channel must be a non-empty string');
    const limit = this.settings.maxChannelLength;
    if (pyLen(value) > limit) throw new Rejected(BAD_CHANNEL, `channel longer than ${limit} characters`);
    if (BAD_CHARS.test(value)) throw new Rejected(BAD_CHANNEL, 'channel contains control characters');
    return value;
  }

  /** A message's channel, its encoded data and the size of that. */
  message(message) {
    if (!(message instanceof Map)) throw new Rejected(BAD_REQUEST, 'a message must be a JSON object');
    const channel = this.channel(message.get('channel'));
    if (!message.has('data')) throw new Rejected(BAD_REQUEST, 'a message needs data');
    const data = encode(message.get('data'));
    if (hasLoneSurrogate(data)) throw new Rejected(BAD_REQUEST, 'data is not valid unicode');
    const nbytes = Buffer.byteLength(data, 'utf8');
    const limit = this.settings.maxMessageBytes;
    if (nbytes > limit) {
      throw new Rejected(TOO_LARGE, `message data is ${nbytes} bytes, over the limit of ${limit}`, 413);
    }
    return [channel, data, nbytes];
  }

  /** The app's account, or the refusal (a Reply) of a realtime connection (`connect`) or a
   * publish for `app`. A connection refused by the account's limits is counted. */
  async admit(app, { connect = false } = {}) {
    if (this.closing) return Reply.error(503, SHUTTING_DOWN, 'gateway shutting down');
    if (!app) return Reply.error(400, BAD_REQUEST, 'missing app (?app=APP_ID)');
    let account;
    try {
      account = await this.registry.resolve(app);
    } catch (err) {
      if (err instanceof RegistryUnavailable) return Reply.error(503, REGISTRY_UNAVAILABLE, err.message);
      throw err;
    }
    if (account === null) return Reply.error(404, UNKNOWN_APP, `unknown app ${pySlice(app, 64)}`);
    if (this.closing) return Reply.error(503, SHUTTING_DOWN, 'gateway shutting down');
    if (connect) {
      let refusal = this.admission.admitConnection(account);
      if (refusal === CHECK) refusal = await this.admission.checkConnection(account);
      if (refusal !== null) {
        this.meter.connectionRefused(app);
        return Reply.error(403, refusal.code, refusal.reason);
      }
    }
    return account;
  }

  /** Refuse publishing `count` messages for `app` when its account's limits say so; each
   * refused message is counted. */
  mayPublish(app, account, count = 1) {
    const refusal = this.admission.admitMessage(account);
    if (refusal !== null) {
      this.meter.messageRefused(app, count);
      throw new Rejected(refusal.code, refusal.reason, 403);
    }
  }

  /** Refuse new connections, close the open ones, wait (a while) until they are gone. */
  async drain(graceMs = DRAIN_TIMEOUT_MS) {
    this.closing = true;
    for (const conn of [...this.connections]) conn.stop(GOING_AWAY, 'gateway shutting down');
    if (this.connections.size === 0) return;
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, graceMs);
      this._idle.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  // -- WebSocket ------------------------------------------------------------------------

  realtime(ws, app, account) {
    let closeTimer = null;
    const conn = new Connection(
      app,
      account,
      'websocket',
      (frame, done) => ws.send(frame, done),
      (code, reason) => {
        // Counted as closed now; the close frame follows, bounded.
        this.close(conn);
        ws.close(code, reason);
        closeTimer = setTimeout(() => ws.terminate(), CLOSE_TIMEOUT_MS);
        closeTimer.unref();
      },
    );
    ws.on('error', () => {}); // an oversized frame (1009) or a broken socket: 'close' follows
    ws.on('close', () => {
      if (closeTimer !== null) clearTimeout(closeTimer);
      this.close(conn);
    });
    ws.on('pong', () => {
      ws.pingSentAt = null;
    });
    ws.metering = conn;
    this.open(conn);
    conn.send(encode(new Map([['action', 'connected'], ['connectionId', conn.id]])));
    // Frames are acted on one at a time, in order: one waiting for a check holds the next.
    let queue = null;
    ws.on('message', (data, isBinary) => {
      const run = () => this.frame(conn, data, isBinary);
      const next = queue === null ? run() : queue.then(run);
      if (next === undefined) return;
      queue = next;
      next.then(() => {
        if (queue === next) queue = null;
      });
    });
  }

  /** Act on one frame of a WebSocket and send the reply; a promise when it awaits a check. */
  frame(conn, data, isBinary) {
    if (conn.closed || conn.closeCode !== null) return undefined;
    const rejected = (err) => {
      if (!(err instanceof Rejected)) throw err;
      return errorFrame(err.code, err.message);
    };
    let reply;
    if (isBinary) {
      reply = errorFrame(BAD_REQUEST, 'binary frames are not supported: send JSON text');
    } else {
      try {
        reply = this.handle(conn, data.toString('utf8'));
      } catch (err) {
        reply = rejected(err);
      }
    }
    if (typeof reply === 'string') {
      conn.send(reply);
      return undefined;
    }
    return reply.then(
      (text) => conn.send(text),
      (err) => {
        try {
          conn.send(rejected(err));
        } catch (bug) {
          this.log.error('gateway.frame_failed', { error: bug.stack ?? String(bug) });
          conn.stop(KEEPALIVE_TIMEOUT, 'internal error');
        }
      },
    );
  }

  /** Act on one client frame; returns the reply. */
  handle(conn, text) {
    const frame = parseFrame(text);
    if (!(frame instanceof Map)) throw new Rejected(BAD_REQUEST, 'a frame must be a JSON object');
    const action = frame.get('action');
    if (action === 'publish') {
      const [channel, data, nbytes] = this.message(frame);
      this.mayPublish(conn.app, conn.account);
      this.publish(conn.app, channel, data, nbytes);
      return encode(new Map([['action', 'published'], ['channel', channel]]));
    }
    if (action === 'attach') {
      const channel = this.channel(frame.get('channel'));
      const checking = this.attach(conn, channel);
      const reply = encode(new Map([['action', 'attached'], ['channel', channel]]));
      return checking === undefined ? reply : checking.then(() => reply);
    }
    if (action === 'detach') {
      const channel = this.channel(frame.get('channel'));
      this.detach(conn, channel); // detaching a channel not attached is a no-op
      return encode(new Map([['action', 'detached'], ['channel', channel]]));
    }
    const shown = typeof action === 'string' ? pySlice(action, 64) : action;
    throw new Rejected(BAD_REQUEST, `unknown action ${pySlice(encode(shown), 80)}`);
  }

  // -- server-sent events -----------------------------------------------------------------

  async stream(req, res, query) {
    const app = last(query, 'app');
    const account = await this.admit(app, { connect: true });
    if (account instanceof Reply) return account;
    let channels;
    try {
      channels = query.getAll('channel').map((c) => this.channel(c));
    } catch (err) {
      if (!(err instanceof Rejected)) throw err;
      return Reply.error(400, err.code, err.message);
    }
    channels = [...new Set(channels)];
    const limit = this.settings.maxChannelsPerConnection;
    if (channels.length > limit) {
      return Reply.error(400, BAD_CHANNEL, `too many channels on one stream (max ${limit})`);
    }
    res.writeHead(200, {
      'cache-control': 'no-cache',
      'x-accel-buffering': 'no',
      'content-type': 'text/event-stream; charset=utf-8',
    });
    if (req.method === 'HEAD') {
      res.end();
      return null;
    }
    res.flushHeaders();
    let heartbeat = null;
    const conn = new Connection(
      app,
      account,
      'streaming',
      (chunk, done) => res.write(chunk, done),
      () => {
        // Ended by the gateway: count the close, then finish the response cleanly.
        this.close(conn);
        res.end();
      },
    );
    const gone = () => {
      clearInterval(heartbeat);
      this.close(conn);
    };
    res.on('close', gone);
    this.open(conn);
    try {
      for (const channel of channels) {
        const checking = this.attach(conn, channel);
        if (checking !== undefined) await checking;
      }
    } catch (err) {
      if (!(err instanceof Rejected)) throw err;
      // A channel refused by the account's limits: say so, and end.
      res.write(sse('error', errorFrame(err.code, err.message)));
      conn.stop(POLICY_VIOLATION, err.message);
      return null;
    }
    const hello = new Map([['action', 'connected'], ['connectionId', conn.id], ['channels', channels]]);
    conn.send(sse('connected', encode(hello)));
    heartbeat = setInterval(() => conn.send(': ping\n\n'), HEARTBEAT_MS);
    return null;
  }

  // -- REST -----------------------------------------------------------------------------

  /** Publish one message {"channel", "data"} or a list of up to 100: all of them, or (on
   * any error) none. */
  async restPublish(req, app) {
    const account = await this.admit(app);
    if (account instanceof Reply) return account;
    const body = await readBody(req, MAX_BATCH * maxFrameBytes(this.settings));
    if (body === null) return new Reply(413, errorBody(413, TOO_LARGE, 'request body too large'), { connection: 'close' });
    let parsed;
    let messages;
    try {
      try {
        parsed = parse(decodeBody(body));
      } catch (err) {
        if (err instanceof JSONError) throw new Rejected(BAD_REQUEST, 'malformed JSON');
        throw err;
      }
      messages = batch(parsed).map((m) => this.message(m));
      this.mayPublish(app, account, messages.length);
    } catch (err) {
      if (!(err instanceof Rejected)) throw err;
      return Reply.error(err.status, err.code, err.message);
    }
    const delivered = messages.map((m) => this.publish(app, ...m));
    if (!Array.isArray(parsed)) {
      const one = new Map([['channel', messages[0][0]], ['published', 1], ['delivered', delivered[0]]]);
      return new Reply(201, encode(one));
    }
    const each = messages.map((m, k) => new Map([['channel', m[0]], ['delivered', delivered[k]]]));
    const total = delivered.reduce((a, b) => a + b, 0);
    return new Reply(201, encode(new Map([['published', messages.length], ['delivered', total], ['messages', each]])));
  }

  // -- health ---------------------------------------------------------------------------

  health() {
    const status = this.meter.superseded ? 'superseded' : this.closing ? 'draining' : 'ok';
    const body = new Map([
      ['status', status],
      ['frontendId', this.meter.frontendId],
      ['incarnation', this.meter.incarnation],
      ['connections', this.connections.size],
    ]);
    return new Reply(status === 'ok' ? 200 : 503, encode(body));
  }
}

function batch(parsed) {
  if (!Array.isArray(parsed)) return [parsed];
  if (!(parsed.length > 0 && parsed.length <= MAX_BATCH)) {
    throw new Rejected(BAD_REQUEST, `send between 1 and ${MAX_BATCH} messages`);
  }
  return parsed;
}

/** The body, or null when it is over what a full batch of messages could need. */
function readBody(req, limit) {
  const declared = req.headers['content-length'] ?? '';
  if (/^[0-9]+$/.test(declared) && Number(declared) > limit) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let over = false;
    req.on('data', (chunk) => {
      if (over) return;
      size += chunk.length;
      if (size > limit) {
        over = true;
        resolve(null);
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (!over) resolve(Buffer.concat(chunks));
    });
    req.on('error', reject);
  });
}

/** The last value of a query parameter (Starlette's QueryParams.get), '' if absent. */
function last(query, name) {
  const all = query.getAll(name);
  return all.length ? all[all.length - 1] : '';
}

/** A path percent-decoded as uvicorn decodes it (invalid escapes kept, bad UTF-8 replaced). */
function unquote(path) {
  if (!path.includes('%')) return path;
  const bytes = [];
  for (let k = 0; k < path.length; k++) {
    const hex = path.slice(k + 1, k + 3);
    if (path[k] === '%' && /^[0-9a-fA-F]{2}$/.test(hex)) {
      bytes.push(Number.parseInt(hex, 16));
      k += 2;
    } else {
      bytes.push(...Buffer.from(path[k], 'utf8'));
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

// -- routing (Starlette's, as server.py declares it) -------------------------------------

const ROUTES = [
  { pattern: /^\/v1\/stream$/, methods: ['GET', 'HEAD'], name: 'stream' },
  { pattern: /^\/v1\/apps\/([^/]+)\/messages$/, methods: ['POST'], name: 'rest' },
  { pattern: /^\/healthz$/, methods: ['GET', 'HEAD'], name: 'health' },
];

function route(path) {
  for (const r of ROUTES) {
    const m = r.pattern.exec(path);
    if (m) return { ...r, params: m.slice(1) };
  }
  return null;
}

function writeReply(req, res, reply) {
  const body = Buffer.from(reply.body, 'utf8');
  res.writeHead(reply.status, { 'content-length': body.length, 'content-type': 'application/json', ...reply.headers });
  res.end(req.method === 'HEAD' ? undefined : body);
}

function handler(gateway) {
  return async (req, res) => {
    try {
      const at = req.url.indexOf('?');
      const rawPath = at < 0 ? req.url : req.url.slice(0, at);
      const query = new URLSearchParams(at < 0 ? '' : req.url.slice(at + 1));
      const path = unquote(rawPath);
      const found = route(path);
      if (found === null) {
        // Starlette's redirect_slashes: the same path with its trailing slash toggled.
        const other = path.endsWith('/') ? path.slice(0, -1) : `${path}/`;
        if (path !== '/' && route(other) !== null) {
          const qs = at < 0 ? '' : req.url.slice(at);
          res.writeHead(307, { 'content-length': 0, location: `http://${req.headers.host}${other}${qs}` });
          res.end();
          return;
        }
        writeReply(req, res, Reply.error(404, 40400, 'Not Found'));
        return;
      }
      if (!found.methods.includes(req.method)) {
        writeReply(req, res, Reply.error(405, 40500, 'Method Not Allowed'));
        return;
      }
      let reply;
      if (found.name === 'health') reply = gateway.health();
      else if (found.name === 'stream') reply = await gateway.stream(req, res, query);
      else reply = await gateway.restPublish(req, found.params[0]);
      if (reply !== null) writeReply(req, res, reply);
    } catch (err) {
      gateway.log.error('gateway.request_failed', { path: req.url.slice(0, 200), error: err.stack ?? String(err) });
      if (!res.headersSent) {
        res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' });
        res.end('Internal Server Error');
      } else {
        res.destroy();
      }
    }
  };
}

/** An HTTP response written on a socket whose upgrade is refused. */
function deny(socket, status, body = '', type = 'application/json') {
  const payload = Buffer.from(body, 'utf8');
  const head =
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\n` +
    `content-length: ${payload.length}\r\ncontent-type: ${type}\r\n` +
    `date: ${new Date().toUTCString()}\r\nconnection: close\r\n\r\n`;
  socket.end(Buffer.concat([Buffer.from(head, 'latin1'), payload]));
}

function upgrader(gateway, wss) {
  return async (req, socket, head) => {
    socket.on('error', () => {});
    try {
      const at = req.url.indexOf('?');
      const path = unquote(at < 0 ? req.url : req.url.slice(0, at));
      if (path !== '/v1/realtime') {
        // Starlette refuses a WebSocket no route takes with an empty 403.
        deny(socket, 403, '', 'text/plain; charset=utf-8');
        return;
      }
      const query = new URLSearchParams(at < 0 ? '' : req.url.slice(at + 1));
      const app = last(query, 'app');
      const account = await gateway.admit(app, { connect: true });
      if (account instanceof Reply) {
        deny(socket, account.status, account.body);
        return;
      }
      if (socket.destroyed) {
        // Gone while its app was looked up: let admission forget it again.
        gateway.admission.connectionClosed(account);
        return;
      }
      wss.handleUpgrade(req, socket, head, (ws) => gateway.realtime(ws, app, account));
    } catch (err) {
      gateway.log.error('gateway.upgrade_failed', { error: err.stack ?? String(err) });
      deny(socket, 500, 'Internal Server Error', 'text/plain; charset=utf-8');
    }
  };
}

/** Ping every WebSocket client; close (1011) one whose pong is late, as uvicorn does. */
function keepalive(wss, settings) {
  const every = settings.gatewayWsPingIntervalMs;
  const timeout = settings.gatewayWsPingTimeoutMs;
  const pinger = setInterval(() => {
    const now = performance.now();
    for (const ws of wss.clients) {
      if (ws.pingSentAt == null) {
        ws.pingSentAt = now;
        ws.ping();
      }
    }
  }, every);
  const checker = setInterval(() => {
    const now = performance.now();
    for (const ws of wss.clients) {
      if (ws.pingSentAt != null && now - ws.pingSentAt > timeout) {
        ws.pingSentAt = null;
        ws.metering?.stop(KEEPALIVE_TIMEOUT, 'keepalive ping timeout');
      }
    }
  }, Math.max(10, Math.min(timeout, 1000)));
  pinger.unref();
  checker.unref();
  return () => {
    clearInterval(pinger);
    clearInterval(checker);
  };
}

// -- running it --------------------------------------------------------------------------

function fail(message, code = 1) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(code);
}

function options() {
  try {
    const { values } = parseArgs({
      options: {
        port: { type: 'string' },
        'frontend-id': { type: 'string' },
        datacenter: { type: 'string' },
        host: { type: 'string' },
        help: { type: 'boolean' },
      },
      strict: true,
    });
    return values;
  } catch (err) {
    process.stderr.write(`Usage: node gateway.js [--port P] [--frontend-id ID] [--datacenter DC] [--host H]\nerror: ${err.message}\n`);
    process.exit(2);
  }
}

async function main() {
  const flags = options();
  if (flags.help) {
    process.stdout.write(
      'Usage: node gateway.js [--port P] [--frontend-id ID] [--datacenter DC] [--host H]\n\n' +
        'Run the example realtime gateway (WebSocket, server-sent events, REST publish).\n' +
        'Defaults: METERING_GATEWAY_PORT, METERING_GATEWAY_FRONTEND_ID, METERING_DATACENTER,\n' +
        'METERING_GATEWAY_HOST.\n',
    );
    return;
  }
  let settings;
  try {
    settings = loadSettings();
  } catch (err) {
    if (err instanceof SettingsError) fail(err.message);
    throw err;
  }
  if (settings.redisUrl === EMBEDDED_REDIS_URL) {
    fail(
      'a standalone gateway needs a real Redis shared with the engine: set METERING_REDIS_URL ' +
        '(the in-process stand-in of `metering run` is Python only)',
    );
  }
  let port = settings.gatewayPort;
  if (flags.port !== undefined) {
    if (!/^\s*[+-]?\d+\s*$/.test(flags.port)) fail(`invalid value for '--port': '${flags.port}' is not a valid integer`, 2);
    // As the Python command: 0 (falsy there) means the default.
    port = Number(flags.port) || settings.gatewayPort;
  }
  const frontendId = flags['frontend-id'] || settings.gatewayFrontendId;
  const datacenter = flags.datacenter || settings.datacenter;
  const host = flags.host || settings.gatewayHost;
  let dcUrl;
  try {
    dcUrl = datacenterUrl(settings, datacenter);
  } catch (err) {
    if (err instanceof SettingsError) fail(err.message);
    throw err;
  }
  const log = createLogger({ level: settings.logLevel, json: settings.logJson });
  const scripts = new Scripts(settings.luaDir ?? undefined);
  try {
    // Read now, not at the first flush: a gateway that cannot count should not start.
    scripts.source('flush');
    scripts.source('deregister');
    scripts.source('evidence');
  } catch (err) {
    fail(err.message);
  }

  const clients = new Map();
  const clientOf = (url, name) => {
    let client = clients.get(url);
    if (client === undefined) {
      client = createClient(url, { logger: log, name });
      clients.set(url, client);
    }
    return client;
  };
  const dcClient = clientOf(dcUrl, `datacenter ${datacenter}`);
  const primary = clientOf(settings.redisUrl, 'primary');

  let stopping = null;
  let serving = false;
  let meter;
  try {
    meter = new Meter(new DatacenterStore(dcClient, settings.redisPrefix, datacenter, { scripts }), frontendId, {
      livenessTimeoutMs: settings.livenessTimeoutMs,
      flushIntervalMs: settings.flushIntervalMs,
      flushMinIntervalMs: settings.flushMinIntervalMs,
      logger: log,
      onSuperseded: () => {
        log.error('gateway.stopping', { reason: 'superseded by another process with this frontend id' });
        if (serving) stop(null); // before that, the check after start() stops it
      },
    });
  } catch (err) {
    fail(err.message);
  }
  const registry = new AppRegistry(primary, settings.redisPrefix, {
    refreshIntervalMs: settings.registryRefreshIntervalMs,
    logger: log,
  });
  // Checks read every datacenter's frontends (the one this gateway writes among them).
  const datacenters = Object.entries(datacenterUrls(settings)).map(
    ([name, url]) => new DatacenterStore(clientOf(url, `datacenter ${name}`), settings.redisPrefix, name, { scripts }),
  );
  const admission = new Admission(primary, settings.redisPrefix, {
    evidence: {
      datacenters,
      live: new GlobalLive(primary, settings.redisPrefix),
      appsOf: (account) => registry.appsOf(account),
      incarnation: meter.incarnation,
      connectionsHere: (apps) => meter.connectionsOf(apps),
      channelsHere: (apps) => meter.channelsOf(apps),
    },
    heartbeatMs: settings.flushIntervalMs,
    failOpen: settings.admissionFailOpen,
    refreshIntervalMs: settings.admissionRefreshIntervalMs,
    staleAfterMs: settings.admissionStaleAfterMs,
    logger: log,
  });
  await Promise.all([ready(dcClient), ready(primary)]);
  await meter.start();
  await registry.start();
  await admission.start();

  const gateway = new Gateway(meter, registry, admission, settings, log);
  const wss = new WebSocketServer({ noServer: true, maxPayload: maxFrameBytes(settings), perMessageDeflate: false });
  const stopKeepalive = keepalive(wss, settings);
  const server = createServer(handler(gateway));
  server.on('upgrade', upgrader(gateway, wss));
  server.on('clientError', (_err, socket) => socket.destroy());

  // SIGTERM and SIGINT: stop accepting, close every connection, flush, deregister. A second
  // signal while that runs cuts it short.
  function stop(signal) {
    if (stopping !== null) {
      if (signal !== null) process.exit(1);
      return;
    }
    stopping = (async () => {
      server.close();
      server.closeIdleConnections();
      await gateway.drain();
      stopKeepalive();
      await meter.close();
      registry.close();
      await admission.close();
      server.closeAllConnections();
      await Promise.all([...clients.values()].map((c) => c.quit().catch(() => c.disconnect())));
      if (signal === 'SIGTERM') {
        // As the Python gateway (uvicorn re-raises it): the process ends by the signal.
        process.removeAllListeners('SIGTERM');
        process.kill(process.pid, 'SIGTERM');
        return;
      }
      process.exit(0);
    })();
  }
  serving = true;
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (meter.superseded) stop(null);

  server.on('error', (err) => {
    log.error('gateway.listen_failed', { host, port, error: err.message });
    fail(`the gateway could not start: ${err.message}`);
  });
  server.listen(port, host, () => {
    const bound = server.address();
    const shown = host.includes(':') ? `[${host}]` : host;
    // The line tests and operators wait for (the Python gateway's wording).
    process.stdout.write(`gateway ${frontendId} (${datacenter}) listening on http://${shown}:${bound.port}\n`);
  });
}

main().catch((err) => {
  process.stderr.write(`error: ${err.stack ?? err}\n`);
  process.exit(1);
});
