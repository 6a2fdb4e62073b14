// Declarations of the metering SDK for Node.js (handwritten; checked by `npm run typecheck`).
import type { Redis, RedisOptions } from 'ioredis';

export type Transport = 'websocket' | 'streaming' | 'long_poll';
export type FlushStatus = 'ok' | 'replaced' | 'unknown' | 'superseded';

export interface Logger {
  debug(event: string, fields?: Record<string, unknown>): void;
  info(event: string, fields?: Record<string, unknown>): void;
  warning(event: string, fields?: Record<string, unknown>): void;
  error(event: string, fields?: Record<string, unknown>): void;
}

// -- keys -----------------------------------------------------------------------------------

export const TRANSPORT_CODES: Readonly<Record<Transport, 'w' | 's' | 'l'>>;
export const COUNTERS: readonly [
  'opened', 'refused', 'pub_n', 'pub_b', 'del_n', 'del_b', 'ch_refused', 'msg_refused',
];
export const COUNTERS_PER_APP: 8;
export const FLUSH_OK: 'ok';
export const FLUSH_REPLACED: 'replaced';
export const FLUSH_UNKNOWN: 'unknown';
export const FLUSH_SUPERSEDED: 'superseded';
export const LIMITS_NOTICE: 'limits';
export const LIVE_NOTICE: 'live';
export const CHECK_NOTICE: 'check';

export interface FrontendKeys {
  readonly conns: string;
  readonly channels: string;
  readonly counters: string;
  readonly counterApps: string;
}

export interface DatacenterKeys {
  readonly base: string;
  readonly frontends: string;
  readonly frontendIds: string;
  conns(code: 'w' | 's' | 'l'): string;
  readonly channels: string;
  readonly changesApps: string;
  readonly changesChannels: string;
  readonly counterChanges: string;
  readonly seq: string;
  readonly epoch: string;
  readonly retired: string;
  superseded(incarnation: string): string;
  frontend(incarnation: string): FrontendKeys;
}

export interface GlobalKeys {
  readonly base: string;
  readonly apps: string;
  readonly appsSynced: string;
  readonly admission: string;
  readonly admissionLive: string;
  readonly admissionNotices: string;
  readonly admissionVersion: string;
}

export function datacenterBase(prefix: string, datacenter: string): string;
export function globalBase(prefix: string): string;
export function datacenterKeys(prefix: string, datacenter: string): DatacenterKeys;
export function globalKeys(prefix: string): GlobalKeys;
export function packCounters(totals: readonly (number | string)[]): string;
export function unpackCounters(packed: string): number[];

// -- scripts and the datacenter store ---------------------------------------------------------

export class ScriptError extends Error {}

export class Scripts {
  /** `dir`: the engine's metering/live/lua (default: NODE_METERING_LUA_DIR, else the repo's). */
  constructor(dir?: string | URL);
  readonly dir: URL;
  source(name: string, options?: { common?: boolean }): string;
  run(client: Redis, name: string, key: string, args: readonly string[]): Promise<unknown>;
}

export function defaultScripts(): Scripts;

export interface FlushArgs {
  full: boolean;
  timeoutMs: number;
  epoch: string;
  conns?: ReadonlyArray<readonly [field: string, count: number]>;
  channels?: ReadonlyArray<readonly [field: string, present: boolean]>;
  /** Per app: its eight totals, or the packed value. */
  counters?: ReadonlyArray<readonly [app: string, totals: readonly number[] | string]>;
}

export class DatacenterStore {
  constructor(client: Redis, prefix: string, datacenter: string, options?: { scripts?: Scripts });
  readonly client: Redis;
  readonly prefix: string;
  readonly datacenter: string;
  readonly base: string;
  readonly keys: DatacenterKeys;
  flush(incarnation: string, args: FlushArgs): Promise<FlushStatus>;
  deregister(incarnation: string): Promise<boolean>;
  incarnations(): Promise<Record<string, number>>;
}

// -- the meter --------------------------------------------------------------------------------

export interface MeterOptions {
  livenessTimeoutMs?: number;
  flushIntervalMs?: number;
  flushMinIntervalMs?: number;
  onSuperseded?: () => void;
  logger?: Logger;
}

export class Meter {
  constructor(store: DatacenterStore, frontendId: string, options?: MeterOptions);
  readonly store: DatacenterStore;
  readonly frontendId: string;
  /** `<frontend id>#<unix seconds>-<8 hex>`, new for every Meter. */
  readonly incarnation: string;
  readonly livenessTimeoutMs: number;
  readonly flushIntervalMs: number;
  readonly flushMinIntervalMs: number;
  /** Flushes made (each a flush.lua call). */
  readonly flushes: number;
  readonly superseded: boolean;

  connectionOpened(app: string, transport?: Transport): void;
  connectionClosed(app: string, transport?: Transport): void;
  connectionRefused(app: string): void;
  channelRefused(app: string): void;
  messageRefused(app: string, count?: number): void;
  channelAttached(app: string, channel: string): void;
  channelDetached(app: string, channel: string): void;
  messagePublished(app: string, channel: string, nbytes: number): void;
  messageDelivered(app: string, channel: string, nbytes: number, count?: number): void;
  /** Connections open here of any of `apps`. */
  connectionsOf(apps: Iterable<string>): number;
  /** The channels (`<app>|<channel>`) of any of `apps` active here. */
  channelsOf(apps: Iterable<string>): string[];

  start(): Promise<void>;
  close(): Promise<void>;
  flush(): Promise<FlushStatus>;
}

// -- the registry and admission ---------------------------------------------------------------

export const MAX_APP_ID_LENGTH: 20;
export function validAppId(app: unknown): app is string;
export class RegistryUnavailable extends Error {}

export interface AppRegistryOptions {
  refreshIntervalMs?: number;
  negativeTtlMs?: number;
  negativeMax?: number;
  refillWaitMs?: number;
  logger?: Logger;
}

export class AppRegistry {
  constructor(client: Redis, prefix: string, options?: AppRegistryOptions);
  readonly size: number;
  readonly complete: boolean;
  readonly lookups: number;
  start(): Promise<void>;
  close(): void;
  refresh(): Promise<number>;
  known(app: string): number | undefined;
  appsOf(account: number): readonly string[];
  /** The account, or null for an unknown app; rejects with RegistryUnavailable. */
  resolve(app: string): Promise<number | null>;
}

export const CONNECTIONS_EXCEEDED: 40111;
export const MESSAGES_EXCEEDED: 40112;
export const CHANNELS_EXCEEDED: 40114;
export const UNAVAILABLE: 50310;

export interface Refusal {
  readonly code: number;
  readonly reason: string;
  /** Seconds, where the refusal has a known end. */
  readonly retryAfter: number | null;
}

export interface AdmissionRow {
  connectionsHard: number | null;
  channelsHard: number | null;
  publishBlockedMonth: string | null;
  publishBlockedBy: string | null;
}

/** The answer of admitConnection / admitChannel when the copy cannot tell: await the check. */
export interface Check {
  readonly check: true;
}

/** The answer that says: await checkConnection / checkChannel. */
export const CHECK: Check;

/** The primary Redis's tick state a channel check reads (GlobalLive in admission.js). */
export interface TickReader {
  /** [the last tick's second (0: none), the account's active channels, which fields were active]. */
  channelsAtTick(account: string, fields: readonly string[]): Promise<[number, number, boolean[]]>;
}

/** The tick state in the primary Redis (`{p}:tick`, `live:accounts`, `live:channels`). */
export class GlobalLive implements TickReader {
  constructor(client: Redis, prefix: string);
  channelsAtTick(account: string, fields: readonly string[]): Promise<[number, number, boolean[]]>;
}

/** Where a check reads: every datacenter's frontends, the last tick, and this process. */
export interface AdmissionEvidence {
  datacenters: readonly DatacenterStore[];
  live: TickReader;
  appsOf(account: number): readonly string[];
  /** This gateway's own incarnation ('' for a process with no connections of its own). */
  incarnation?: string;
  connectionsHere?(apps: readonly string[]): number;
  channelsHere?(apps: readonly string[]): string[];
}

export interface AdmissionOptions {
  /** Without it, a check lets in. */
  evidence?: AdmissionEvidence | null;
  /** The frontends' flush interval: a check's second read waits this + 100 ms. */
  heartbeatMs?: number;
  failOpen?: boolean;
  refreshIntervalMs?: number;
  staleAfterMs?: number;
  clock?: () => number;
  logger?: Logger;
}

export class Admission {
  constructor(client: Redis, prefix: string, options?: AdmissionOptions);
  /** A random id of this copy: `check <account> <sender>` notices it sent are ignored here. */
  readonly sender: string;
  /** Reads made by checks. */
  readonly checks: number;
  admitConnection(account: number): Refusal | Check | null;
  admitChannel(account: number): Refusal | Check | null;
  /** After CHECK from admitConnection: null (let in, and counted) or the refusal. */
  checkConnection(account: number): Promise<Refusal | null>;
  /** After CHECK from admitChannel, for `channel` of `app` (null: a channel not named). */
  checkChannel(account: number, app: string, channel: string | null): Promise<Refusal | null>;
  connectionClosed(account: number): void;
  channelReleased(account: number): void;
  admitMessage(account: number): Refusal | null;
  refresh(options?: { rows?: boolean }): Promise<void>;
  start(): Promise<void>;
  close(): Promise<void>;
}

export function decodeRow(value: string): AdmissionRow;
export function secondsToMonthEnd(now?: Date): number;

// -- settings, clients, logs ------------------------------------------------------------------

export interface Settings {
  readonly redisUrl: string;
  readonly datacenter: string;
  readonly datacenters: Readonly<Record<string, string>>;
  readonly redisPrefix: string;
  readonly livenessTimeoutMs: number;
  readonly flushIntervalMs: number;
  readonly flushMinIntervalMs: number;
  readonly registryRefreshIntervalMs: number;
  readonly gatewayHost: string;
  readonly gatewayPort: number;
  readonly gatewayFrontendId: string;
  readonly gatewayWsPingIntervalMs: number;
  readonly gatewayWsPingTimeoutMs: number;
  readonly maxMessageBytes: number;
  readonly maxChannelLength: number;
  readonly maxChannelsPerConnection: number;
  readonly admissionFailOpen: boolean;
  readonly admissionRefreshIntervalMs: number;
  readonly admissionStaleAfterMs: number;
  readonly logLevel: string;
  readonly logJson: boolean;
  readonly luaDir: string | undefined;
}

export const EMBEDDED_REDIS_URL: 'memory://';
export const KNOWN: readonly string[];
export const LUA_DIR_VARIABLE: 'NODE_METERING_LUA_DIR';
export class SettingsError extends Error {}
export function loadSettings(env?: Record<string, string | undefined>): Settings;
export function datacenterUrls(settings: Settings): Record<string, string>;
export function datacenterUrl(settings: Settings, name: string): string;
export function defaultLuaDir(env?: Record<string, string | undefined>): string | URL;
export function pyRepr(value: string): string;

export function createClient(url: string, options?: RedisOptions & { logger?: Logger; name?: string }): Redis;
export function ready(client: Redis, timeoutMs?: number): Promise<boolean>;

export function createLogger(options?: { level?: string; json?: boolean; write?: (line: string) => void }): Logger;
export const defaultLogger: Logger;

// -- JSON as the Python gateway reads and writes it -------------------------------------------

export namespace pyjson {
  class PyNumber {
    constructor(text: string, isFloat: boolean);
    readonly text: string;
    readonly isFloat: boolean;
    valueOf(): number;
  }
  class JSONError extends Error {}
  type Value = null | boolean | string | PyNumber | Value[] | Map<string, Value>;
  const MAX_DEPTH: number;
  function parse(text: string): Value;
  function encode(value: unknown): string;
  function encodeString(s: string): string;
  function pyFloatRepr(x: number): string;
  function hasLoneSurrogate(s: string): boolean;
  function decodeBody(body: Uint8Array): string;
  function pyLen(s: string): number;
  function pySlice(s: string, n: number): string;
}
