-- What a gateway needs before it refuses a connection or a channel attach: every other
-- frontend incarnation of this datacenter, when it was last seen, and its share of the
-- account. Reads only; one consistent snapshot.
-- ARGV: self incarnation ('' for none), n, n x connection field ('<app>|<t>'),
--       m, m x channel field ('<app>|<channel>').
-- Returns {now_ms, last_reap_ms, m x (1 if another incarnation holds the channel, else 0),
--          then per other incarnation: incarnation, last seen (ms), its connections of the
--          n fields}.
local base = KEYS[1]
local self = ARGV[1]
local n = tonumber(ARGV[2])
local fields = {}
for i = 1, n do fields[i] = ARGV[2 + i] end
local m = tonumber(ARGV[3 + n])

local last_reap = 0
local newest = redis.call('ZREVRANGE', base .. ':retired', 0, 0, 'WITHSCORES')
if #newest > 0 then last_reap = tonumber(newest[2]) end
local out = {now_ms(), last_reap}

-- The datacenter's channel hash counts the live incarnations holding each channel; held
-- elsewhere means held by one other than the asking incarnation.
local mine = base .. ':fe:' .. self .. ':channels'
for i = 1, m do
  local field = ARGV[3 + n + i]
  local holders = tonumber(redis.call('HGET', base .. ':channels', field)) or 0
  if self ~= '' and redis.call('HEXISTS', mine, field) == 1 then holders = holders - 1 end
  out[#out + 1] = holders > 0 and 1 or 0
end

local members = redis.call('ZRANGE', base .. ':frontends', 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local inc = members[i]
  if inc ~= self then
    local total = 0
    if n > 0 then
      local values = hmget_all(base .. ':fe:' .. inc .. ':conns', fields)
      for k = 1, #values do total = total + (tonumber(values[k]) or 0) end
    end
    out[#out + 1] = inc
    out[#out + 1] = members[i + 1]
    out[#out + 1] = total
  end
end
return out
