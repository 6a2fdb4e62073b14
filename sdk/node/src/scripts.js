// The engine's Lua scripts, read at run time from metering/live/lua/ (never a copy), each with
// _common.lua in front exactly as metering/live/store.py's _Script does, so the SHA1 a gateway
// in Node.js calls is the one the Python SDK calls.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { defaultLuaDir } from './settings.js';

const PRELUDE = '_common.lua';

// Python's Path.read_text() decodes with universal newlines: '\r\n' and '\r' become '\n'.
// The same here, so a checkout with Windows line endings still hashes like the Python side.
function readText(dir, name) {
  return readFileSync(new URL(name, dir), 'utf8').replace(/\r\n?/g, '\n');
}

function asDirUrl(dir) {
  if (dir instanceof URL) return dir.href.endsWith('/') ? dir : new URL(`${dir.href}/`);
  const url = dir.startsWith('file:') ? new URL(dir) : new URL(`file://${encodeURI(dir)}`);
  return url.href.endsWith('/') ? url : new URL(`${url.href}/`);
}

export class ScriptError extends Error {}

/** The engine's scripts in one directory, each with its prelude, loaded on first use. */
export class Scripts {
  constructor(dir = defaultLuaDir()) {
    this.dir = asDirUrl(dir);
    this.sources = new Map();
    // Per client: the ioredis command defined for each script (EVALSHA, EVAL on NOSCRIPT).
    this.defined = new WeakMap();
  }

  /** The full source of a script as it is sent to Redis (prelude + the script). */
  source(name, { common = true } = {}) {
    let source = this.sources.get(name);
    if (source === undefined) {
      try {
        source = (common ? readText(this.dir, PRELUDE) : '') + readText(this.dir, `${name}.lua`);
      } catch (err) {
        throw new ScriptError(
          `cannot read the metering Lua script ${name}.lua in ${fileURLToPath(this.dir)} ` +
            `(${err.code ?? err.message}): point NODE_METERING_LUA_DIR, or the luaDir option, ` +
            "at the engine's metering/live/lua",
        );
      }
      this.sources.set(name, source);
    }
    return source;
  }

  /** Run script `name` on `client` with one key (a datacenter's base) and `args`. */
  run(client, name, key, args) {
    let commands = this.defined.get(client);
    if (commands === undefined) {
      commands = new Map();
      this.defined.set(client, commands);
    }
    let command = commands.get(name);
    if (command === undefined) {
      command = `metering_${name}`;
      client.defineCommand(command, { numberOfKeys: 1, lua: this.source(name) });
      commands.set(name, command);
    }
    return client[command](key, ...args);
  }
}

let shared;

/** One Scripts for the default directory, shared by every store that is given none. */
export function defaultScripts() {
  shared ??= new Scripts();
  return shared;
}
