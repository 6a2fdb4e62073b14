// ioredis's declarations import this untyped package; checking ours (skipLibCheck off) needs it.
declare module 'redis-errors';
