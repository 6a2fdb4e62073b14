-- A frontend incarnation writes its absolute counts (only the fields that changed, or all of
-- them when full = '1') and proves it is alive.
-- ARGV: incarnation, full, timeout_ms, epoch, n, n × (field, count) connections,
--       n, n × (field, 0|1) channel presence,
--       n, n × (app, '<opened> <refused> <pub_n> <pub_b> <del_n> <del_b> <ch_refused> <msg_refused>')
--       cumulative counters (six fields from a gateway older than the last two: see
--       docs/redis-keys.md).
-- Returns 'ok', 'replaced' (took over its id from a dead incarnation), 'unknown' (not
-- registered: send everything again with full = '1'), or 'superseded' (a newer process
-- registered under the same id; this one no longer counts).
local base = KEYS[1]
local inc, full, timeout_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local ids = base .. ':frontend-ids'
local fid = string.match(inc, '^(.*)#')
local seq
local function next_seq()
  if not seq then seq = redis.call('INCR', base .. ':seq') end
  return seq
end

local status = 'ok'
local seen = redis.call('ZSCORE', base .. ':frontends', inc)
if not seen then
  if redis.call('EXISTS', base .. ':superseded:' .. inc) == 1 then return 'superseded' end
  if full ~= '1' then return 'unknown' end
  redis.call('SET', base .. ':epoch', ARGV[4], 'NX')
  local prev = redis.call('HGET', ids, fid)
  if prev and prev ~= inc then
    -- Same frontend id, older incarnation: that process is gone (it was restarted), so its
    -- counts go now rather than after the liveness timeout, and are never counted twice.
    -- Should it still be running (two processes given one id), it learns it was superseded
    -- instead of taking the id back.
    reap(base, prev, now, next_seq())
    redis.call('SET', base .. ':superseded:' .. prev, inc, 'EX', 86400)
    status = 'replaced'
  end
  redis.call('HSET', ids, fid, inc)
  redis.call('ZREM', base .. ':retired', inc)
else
  if redis.call('HGET', ids, fid) ~= inc then
    reap(base, inc, now, next_seq())
    return 'superseded'
  end
  if tonumber(seen) < now - timeout_ms then
    -- Silent for longer than the timeout: already dead as far as counting goes.
    reap(base, inc, now, next_seq())
    return 'unknown'
  end
end
redis.call('ZADD', base .. ':frontends', now, inc)

local fe = base .. ':fe:' .. inc
local i = 5

local n = tonumber(ARGV[i]); i = i + 1
if n > 0 then
  local fields = {}
  for k = 1, n do fields[k] = ARGV[i + 2 * (k - 1)] end
  local old = hmget_all(fe .. ':conns', fields)
  for k = 1, n do
    local field, new = fields[k], tonumber(ARGV[i + 2 * (k - 1) + 1])
    local delta = new - (tonumber(old[k]) or 0)
    if delta ~= 0 then
      add_conns(base, field, delta, next_seq())
      if new == 0 then
        redis.call('HDEL', fe .. ':conns', field)
      else
        redis.call('HSET', fe .. ':conns', field, new)
      end
    end
  end
  i = i + 2 * n
end

n = tonumber(ARGV[i]); i = i + 1
if n > 0 then
  local fields = {}
  for k = 1, n do fields[k] = ARGV[i + 2 * (k - 1)] end
  local old = hmget_all(fe .. ':channels', fields)
  for k = 1, n do
    local field, present = fields[k], ARGV[i + 2 * (k - 1) + 1] == '1'
    if present ~= (old[k] and true or false) then
      if present then
        redis.call('HSET', fe .. ':channels', field, 1)
        add_channel(base, field, 1, next_seq())
      else
        redis.call('HDEL', fe .. ':channels', field)
        add_channel(base, field, -1, next_seq())
      end
    end
  end
  i = i + 2 * n
end

n = tonumber(ARGV[i]); i = i + 1
if n > 0 then
  -- The packed totals go into the hash as they are; each app sent is logged with this flush's
  -- sequence, so the aggregator reads only the apps that changed after its cursor.
  local s = next_seq()
  local zargs = {}
  local j = 0
  while j < n do
    local last = math.min(j + 500, n)
    local first, stop = i + 2 * j, i + 2 * last - 1
    redis.call('HSET', fe .. ':counters', unpack(ARGV, first, stop))
    local m = 0
    for k = first, stop, 2 do
      zargs[m + 1] = s
      zargs[m + 2] = ARGV[k]
      m = m + 2
    end
    redis.call('ZADD', fe .. ':counter-apps', unpack(zargs, 1, m))
    j = last
  end
  redis.call('ZADD', base .. ':counter-changes', s, inc)
end
return status
