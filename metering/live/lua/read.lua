-- Current totals in one datacenter, for a read at the moment of the call: dead frontends are
-- reaped first, so a count never includes a frontend past its liveness timeout.
-- ARGV: timeout_ms, max_reap, field... ('<app>|w', '<app>|s', '<app>|l').
local base = KEYS[1]
reap_stale(base, now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2]))
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
return hmget_all(base .. ':conns', fields)
