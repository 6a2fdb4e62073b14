-- Current connections of some apps in one datacenter, for a read at the moment of the call:
-- dead frontends are reaped first, so a count never includes one past its liveness timeout.
-- ARGV: timeout_ms, max_reap, transport (w, s or l), app... Returns the counts (false: 0).
local base = KEYS[1]
reap_stale(base, now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2]))
local apps = {}
for i = 4, #ARGV do apps[#apps + 1] = ARGV[i] end
return hmget_all(base .. ':conns:' .. ARGV[3], apps)
