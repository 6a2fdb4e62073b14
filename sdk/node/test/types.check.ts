// Compiled by `npm run typecheck` only: the declarations describe the API a gateway uses.
import { Redis } from 'ioredis';

import {
  Admission,
  type Check,
  AppRegistry,
  DatacenterStore,
  Meter,
  Scripts,
  createLogger,
  datacenterUrl,
  loadSettings,
  pyjson,
  type FlushStatus,
  type Refusal,
} from '@metering/gateway-sdk';

const settings = loadSettings(process.env);
const client = new Redis(datacenterUrl(settings, settings.datacenter));
const store = new DatacenterStore(client, settings.redisPrefix, settings.datacenter, { scripts: new Scripts() });
const meter = new Meter(store, 'gw-1', { flushIntervalMs: settings.flushIntervalMs, logger: createLogger() });
meter.connectionOpened('1', 'streaming');
meter.channelAttached('1', 'room');
meter.messagePublished('1', 'room', 12);
meter.messageDelivered('1', 'room', 12, 3);
const status: Promise<FlushStatus> = meter.flush();
const registry = new AppRegistry(client, settings.redisPrefix);
const account: Promise<number | null> = registry.resolve('1');
const admission = new Admission(client, settings.redisPrefix, { failOpen: settings.admissionFailOpen });
const refusal: Refusal | Check | null = admission.admitConnection(1);
const size: number = Buffer.byteLength(pyjson.encode(pyjson.parse('{"a":1.0}')));
void [status, account, refusal, size];
