-- The tick's write to the primary Redis, all or nothing: claim the second, store the new
-- global live values per app and per account, advance the datacenter cursors, and append the
-- 1-second sample. KEYS[1] = '{<prefix>}'.
-- ARGV: second, n, n × (dc, epoch, cursor), n, n × (app, ws, streaming, long_poll),
--       n, n × ('<app>|<channel>', 0|1), stream_maxlen.
-- Returns {1, gap, apps changed, accounts changed} or {0, reason} when another tick already
-- counted this second or read older data than the last commit.
local g = KEYS[1]
local tick = g .. ':tick'
local second = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', tick, 'second') or '-1')
if second <= last then return {0, 'second already counted'} end

local i = 2
local ndc = tonumber(ARGV[i]); i = i + 1
local cursors = {}
for k = 1, ndc do
  local dc, epoch, cursor = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if redis.call('HGET', tick, 'epoch:' .. dc) == epoch
      and cursor < tonumber(redis.call('HGET', tick, 'cursor:' .. dc) or '0') then
    return {0, 'read older than the last commit'}
  end
  cursors[#cursors + 1] = 'epoch:' .. dc
  cursors[#cursors + 1] = epoch
  cursors[#cursors + 1] = 'cursor:' .. dc
  cursors[#cursors + 1] = cursor
end

local apps, index, conns = {}, {}, {}
local function slot(app)
  local pos = index[app]
  if not pos then
    pos = #apps + 1
    apps[pos] = app
    index[app] = pos
  end
  return pos
end

local napps = tonumber(ARGV[i]); i = i + 1
for k = 1, napps do
  conns[slot(ARGV[i])] = {tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])}
  i = i + 4
end

-- Channels: a channel is active while any frontend in any datacenter has it attached.
local live_ch = g .. ':live:channels'
local nch = tonumber(ARGV[i]); i = i + 1
local chfields, chpresent = {}, {}
for k = 1, nch do
  chfields[k] = ARGV[i]
  chpresent[k] = ARGV[i + 1] == '1'
  i = i + 2
end
local maxlen = ARGV[i]
local chold = hmget_all(live_ch, chfields)
local chdelta, chopened = {}, {}
for k = 1, nch do
  if chpresent[k] ~= (chold[k] and true or false) then
    local pos = slot(app_of(chfields[k]))
    if chpresent[k] then
      redis.call('HSET', live_ch, chfields[k], 1)
      chdelta[pos] = (chdelta[pos] or 0) + 1
      chopened[pos] = (chopened[pos] or 0) + 1
    else
      redis.call('HDEL', live_ch, chfields[k])
      chdelta[pos] = (chdelta[pos] or 0) - 1
    end
  end
end

local function parse(packed)
  if not packed then return {0, 0, 0, 0} end
  local v = {}
  for x in string.gmatch(packed, '%S+') do v[#v + 1] = tonumber(x) end
  return v
end

-- Store changed values, and fold each app's change into its account's per-tick sum.
local function store(key, names, old, new, entries, extra)
  local set, del = {}, {}
  for pos = 1, #names do
    local o, n = old[pos], new[pos]
    if n and (n[1] ~= o[1] or n[2] ~= o[2] or n[3] ~= o[3] or n[4] ~= o[4]
        or (extra and extra[pos])) then
      local packed = n[1] .. ' ' .. n[2] .. ' ' .. n[3] .. ' ' .. n[4]
      if n[1] == 0 and n[2] == 0 and n[3] == 0 and n[4] == 0 then
        del[#del + 1] = names[pos]
      else
        set[#set + 1] = names[pos]
        set[#set + 1] = packed
      end
      entries[#entries + 1] = names[pos] .. ' ' .. packed
        .. ((extra and extra[pos]) and (' ' .. extra[pos]) or '')
    end
  end
  for j = 1, #set, 1000 do
    redis.call('HSET', key, unpack(set, j, math.min(j + 999, #set)))
  end
  for j = 1, #del, 1000 do
    redis.call('HDEL', key, unpack(del, j, math.min(j + 999, #del)))
  end
end

local live_apps = g .. ':live:apps'
local old_raw = hmget_all(live_apps, apps)
local owners = hmget_all(g .. ':apps', apps)
local old, new = {}, {}
local accounts, aindex, adelta = {}, {}, {}
for pos = 1, #apps do
  local o = parse(old_raw[pos])
  local c = conns[pos] or o
  local n = {c[1], c[2], c[3], o[4] + (chdelta[pos] or 0)}
  old[pos], new[pos] = o, n
  local acct = owners[pos]
  if acct then
    local a = aindex[acct]
    if not a then
      a = #accounts + 1
      accounts[a] = acct
      aindex[acct] = a
      adelta[a] = {0, 0, 0, 0}
    end
    for m = 1, 4 do adelta[a][m] = adelta[a][m] + n[m] - o[m] end
  end
end
local app_entries = {}
store(live_apps, apps, old, new, app_entries, chopened)

local live_accounts = g .. ':live:accounts'
local aold_raw = hmget_all(live_accounts, accounts)
local aold, anew = {}, {}
for a = 1, #accounts do
  local o = parse(aold_raw[a])
  aold[a] = o
  anew[a] = {o[1] + adelta[a][1], o[2] + adelta[a][2], o[3] + adelta[a][3], o[4] + adelta[a][4]}
end
local account_entries = {}
store(live_accounts, accounts, aold, anew, account_entries, nil)

local gap = (last < 0) and 1 or (second - last)
redis.call('XADD', g .. ':samples', 'MAXLEN', '~', maxlen, string.format('%.0f-0', second * 1000),
  'gap', gap, 'apps', table.concat(app_entries, ';'),
  'accounts', table.concat(account_entries, ';'))
redis.call('HSET', tick, 'second', second, unpack(cursors))
return {1, gap, #app_entries, #account_entries}
