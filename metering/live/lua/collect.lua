-- The tick's read of one datacenter: reap dead frontends, then return what changed since the
-- last committed tick, with its current value in this datacenter.
-- ARGV: timeout_ms, cursor (exclusive), trim_upto (committed; 0 = none), epoch, max_reap,
--       full ('1': every app and channel counted here, for a resync, not just the changes).
-- The change log is trimmed only when this Redis still has the given epoch (else its sequence
-- started over and the cursor means nothing here).
-- Returns {epoch, seq, member, value, ...}: 'a|<app>' -> '<ws> <streaming> <long_poll>',
-- 'c|<app>|<channel>' -> '1' when some frontend here has the channel attached, else '0'.
local base = KEYS[1]
local now = now_ms()
reap_stale(base, now, tonumber(ARGV[1]), tonumber(ARGV[5]))
redis.call('SET', base .. ':epoch', ARGV[4], 'NX')
local epoch = redis.call('GET', base .. ':epoch')
local seq = tonumber(redis.call('GET', base .. ':seq') or '0')
if tonumber(ARGV[3]) > 0 and epoch == ARGV[4] then
  redis.call('ZREMRANGEBYSCORE', base .. ':changes', '-inf', ARGV[3])
end
local members
if ARGV[6] == '1' then
  members = {}
  local seen = {}
  local fields = redis.call('HKEYS', base .. ':conns')
  for i = 1, #fields do
    local app = app_of(fields[i])
    if not seen[app] then
      seen[app] = true
      members[#members + 1] = 'a|' .. app
    end
  end
  local chans = redis.call('HKEYS', base .. ':channels')
  for i = 1, #chans do members[#members + 1] = 'c|' .. chans[i] end
else
  members = redis.call('ZRANGEBYSCORE', base .. ':changes', '(' .. ARGV[2], seq)
end
local out = {epoch, tostring(seq)}
local conn_fields, chan_fields = {}, {}
for i = 1, #members do
  local m = members[i]
  if string.sub(m, 1, 1) == 'a' then
    local app = string.sub(m, 3)
    conn_fields[#conn_fields + 1] = app .. '|w'
    conn_fields[#conn_fields + 1] = app .. '|s'
    conn_fields[#conn_fields + 1] = app .. '|l'
  else
    chan_fields[#chan_fields + 1] = string.sub(m, 3)
  end
end
local conns = hmget_all(base .. ':conns', conn_fields)
for k = 1, #conn_fields, 3 do
  out[#out + 1] = 'a|' .. app_of(conn_fields[k])
  out[#out + 1] = (conns[k] or '0') .. ' ' .. (conns[k + 1] or '0') .. ' ' .. (conns[k + 2] or '0')
end
local chans = hmget_all(base .. ':channels', chan_fields)
for k = 1, #chan_fields do
  out[#out + 1] = 'c|' .. chan_fields[k]
  out[#out + 1] = chans[k] and '1' or '0'
end
return out
