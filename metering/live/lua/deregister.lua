-- A frontend shutting down cleanly: its counts go at once. ARGV: incarnation.
local base = KEYS[1]
if not redis.call('ZSCORE', base .. ':frontends', ARGV[1]) then return 0 end
reap(base, ARGV[1], now_ms(), redis.call('INCR', base .. ':seq'))
return 1
