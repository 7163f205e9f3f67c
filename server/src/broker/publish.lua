-- Switchyard: publish one message atomically.
-- KEYS[1] topic meta (hash: epoch, offset, run)   KEYS[2] topic log (stream)
-- ARGV[1] tie-breaker (0..2047) for a new epoch
-- ARGV[2] topic name as a JSON string        ARGV[3] data (JSON text)
-- ARGV[4] history size (MAXLEN)              ARGV[5] history age (ms)
-- ARGV[6] key TTL (ms)                       ARGV[7] pub/sub channel
-- ARGV[8] newest epoch the caller knows for the topic ("0" for none)
-- Returns {epoch, offset}. Publishes "<epoch> <offset>\n<frame>" on the channel.
-- The instance that last wrote the topic is in its meta (`run`): Redis can
-- come back with less than it acknowledged (a restart from an RDB snapshot
-- or an everysec AOF, a failover to a replica that is behind) with the meta
-- of an older offset and the same epoch. Any other instance, or a meta from
-- before `run` was kept, may have lost history: the topic starts over with a
-- new epoch rather than reuse offsets.
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
-- A new epoch comes after every epoch the topic had: Redis' clock in ms
-- shifted past an 11-bit tie-breaker (ARGV[1]), and at least one more than
-- the epoch being replaced and the newest one the caller has seen,
-- so epochs stay ordered even if a failover brings a clock that is behind.
local function successor(old, floor)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local epoch = ms * 2048 + tonumber(ARGV[1])
  local known = math.max(tonumber(old or '0') or 0, tonumber(floor))
  if epoch <= known then
    epoch = known + 1
  end
  return string.format('%.0f', epoch)
end
local old = redis.call('HGET', KEYS[1], 'epoch')
local epoch = old
if epoch and redis.call('HGET', KEYS[1], 'run') ~= run then
  epoch = false
end
if not epoch then
  -- A lost log starts over with a new epoch; drop any stream left without its meta.
  redis.call('DEL', KEYS[2])
  epoch = successor(old, ARGV[8])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'run', run)
end
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
