-- Shared by every datacenter script (prepended when the script is loaded).
-- A datacenter's keys all start with KEYS[1] = '{<prefix>:<dc>}', one Redis Cluster slot.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- HMGET in chunks (Lua's unpack has a stack limit); false where a field is missing.
local function hmget_all(key, fields)
  local out, n, i = {}, #fields, 1
  while i <= n do
    local j = math.min(i + 999, n)
    local vals = redis.call('HMGET', key, unpack(fields, i, j))
    for k = 1, #vals do out[i + k - 1] = vals[k] end
    i = j + 1
  end
  return out
end

-- The app of a field '<app>|<rest>': app ids never contain '|', channel names may.
local function app_of(field)
  return string.match(field, '^([^|]*)|')
end

-- An incarnation's connection field is '<app>|<t>' (t: w, s or l); the datacenter keeps one
-- hash per transport, keyed by the bare app id, so the tick reads whole columns.
local function add_conns(base, field, delta, seq)
  local app, t = string.sub(field, 1, -3), string.sub(field, -1)
  local key = base .. ':conns:' .. t
  if redis.call('HINCRBY', key, app, delta) <= 0 then redis.call('HDEL', key, app) end
  redis.call('ZADD', base .. ':changes:apps', seq, app)
end

local function add_channel(base, field, delta, seq)
  local left = redis.call('HINCRBY', base .. ':channels', field, delta)
  if left <= 0 then redis.call('HDEL', base .. ':channels', field) end
  if (delta > 0 and left == 1) or (delta < 0 and left <= 0) then
    redis.call('ZADD', base .. ':changes:channels', seq, field)
  end
end

-- Remove one frontend incarnation: subtract its connections from the datacenter totals,
-- release its channels, forget it. Its cumulative counters stay for the aggregator to read.
local function reap(base, inc, now, seq)
  local fe = base .. ':fe:' .. inc
  local conns = redis.call('HGETALL', fe .. ':conns')
  for i = 1, #conns, 2 do
    local n = tonumber(conns[i + 1])
    if n ~= 0 then add_conns(base, conns[i], -n, seq) end
  end
  local chans = redis.call('HKEYS', fe .. ':channels')
  for i = 1, #chans do add_channel(base, chans[i], -1, seq) end
  redis.call('DEL', fe .. ':conns', fe .. ':channels')
  redis.call('ZREM', base .. ':frontends', inc)
  local fid = string.match(inc, '^(.*)#')
  if redis.call('HGET', base .. ':frontend-ids', fid) == inc then
    redis.call('HDEL', base .. ':frontend-ids', fid)
  end
  redis.call('ZADD', base .. ':retired', now, inc)
  redis.call('ZADD', base .. ':counter-changes', seq, inc)
end

-- Reap every incarnation not seen for longer than the liveness timeout.
local function reap_stale(base, now, timeout_ms, max)
  local dead = redis.call('ZRANGEBYSCORE', base .. ':frontends', '-inf',
    '(' .. (now - timeout_ms), 'LIMIT', 0, max)
  if #dead == 0 then return 0 end
  local seq = redis.call('INCR', base .. ':seq')
  for i = 1, #dead do reap(base, dead[i], now, seq) end
  return #dead
end
