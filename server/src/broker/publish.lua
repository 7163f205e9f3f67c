-- Switchyard: publish one message atomically.
-- KEYS[1] topic meta (hash: epoch, offset, run)   KEYS[2] topic log (stream)
-- ARGV[1] tie-breaker (0..2047) for a new epoch
-- ARGV[2] topic name as a JSON string        ARGV[3] data (JSON text)
-- ARGV[4] history size (MAXLEN)              ARGV[5] history age (ms)
-- ARGV[6] key TTL (ms)                       ARGV[7] pub/sub channel
-- ARGV[8] newest epoch the caller knows for the topic ("0" for none)
-- Returns {epoch, offset}. Publishes "<epoch> <offset>\n<frame>" on the channel.
-- The epoch comes from epoch.lua, prepended.
local epoch = current_epoch(ARGV[8])
local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'offset', 1))
local frame = '{"op":"message","topic":' .. ARGV[2] .. ',"epoch":' .. epoch ..
  ',"offset":' .. offset .. ',"data":' .. ARGV[3] .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', 'o', offset, 'f', frame)
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[5])
if oldest > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', oldest)
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[7], epoch .. ' ' .. offset .. '\n' .. frame)
return {epoch, offset}
