-- Switchyard: a consistent view of a topic for a subscriber or a recovery.
-- KEYS[1] topic meta   KEYS[2] topic log
-- ARGV[1] tie-breaker (0..2047) for a new epoch   ARGV[2] since epoch ("" for none)
-- ARGV[3] since offset   ARGV[4] most entries to return   ARGV[5] history age (ms)
-- ARGV[6] key TTL (ms)   ARGV[7] newest epoch the caller knows ("0" for none)
-- Returns {epoch, head, entries}: entries are the log's newest (head - since)
-- entries, newest first, as XREVRANGE gives them, when the epoch matches, or
-- all `head` of them when `since` is of another epoch; none when more than
-- ARGV[4] would be needed.
-- The epoch comes from epoch.lua, prepended (a meta another Redis instance
-- wrote starts the topic over).
local epoch = current_epoch(ARGV[7])
-- Read counts as use: a topic that is subscribed to but quiet keeps its log
-- and epoch as long as one that is published to.
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local head = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local entries = {}
local want = 0
if ARGV[2] == epoch then
  want = head - tonumber(ARGV[3])
elseif ARGV[2] ~= '' then
  -- Resuming from an epoch the topic has moved past: the whole new epoch
  -- (its log was emptied when it began), so nothing since is skipped.
  want = head
end
if want > 0 and want <= tonumber(ARGV[4]) then
  local now = redis.call('TIME')
  local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[5])
  if oldest > 0 then
    redis.call('XTRIM', KEYS[2], 'MINID', oldest)
  end
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', want)
end
return {epoch, head, entries}
