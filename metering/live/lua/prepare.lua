-- The tick's first step in one datacenter: reap dead frontends, make sure the epoch is set,
-- and trim the change logs up to what the last tick committed.
-- ARGV: timeout_ms, trim_upto (committed; 0 = none), epoch candidate, max_reap.
-- The logs are trimmed only when this Redis still has the given epoch (else its sequence
-- started over and the cursor means nothing here). Returns {epoch, seq}.
local base = KEYS[1]
reap_stale(base, now_ms(), tonumber(ARGV[1]), tonumber(ARGV[4]))
redis.call('SET', base .. ':epoch', ARGV[3], 'NX')
local epoch = redis.call('GET', base .. ':epoch')
if tonumber(ARGV[2]) > 0 and epoch == ARGV[3] then
  redis.call('ZREMRANGEBYSCORE', base .. ':changes:apps', '-inf', ARGV[2])
  redis.call('ZREMRANGEBYSCORE', base .. ':changes:channels', '-inf', ARGV[2])
end
return {epoch, redis.call('GET', base .. ':seq') or '0'}
