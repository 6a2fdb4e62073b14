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

-- Remove one frontend incarnation: subtract its connections from the datacenter totals,
-- release its channels, forget it. Its cumulative counters stay for the aggregator to read.
local function reap(base, inc, now, seq)
  local fe = base .. ':fe:' .. inc
  local conns = redis.call('HGETALL', fe .. ':conns')
  for i = 1, #conns, 2 do
    local n = tonumber(conns[i + 1])
    if n ~= 0 then
      local left = redis.call('HINCRBY', base .. ':conns', conns[i], -n)
      if left <= 0 then redis.call('HDEL', base .. ':conns', conns[i]) end
      redis.call('ZADD', base .. ':changes', seq, 'a|' .. app_of(conns[i]))
    end
  end
  local chans = redis.call('HKEYS', fe .. ':channels')
  for i = 1, #chans do
    local left = redis.call('HINCRBY', base .. ':channels', chans[i], -1)
    if left <= 0 then
      redis.call('HDEL', base .. ':channels', chans[i])
      redis.call('ZADD', base .. ':changes', seq, 'c|' .. chans[i])
    end
  end
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
