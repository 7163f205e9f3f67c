-- Switchyard: the topic's epoch, shared by publish.lua and snapshot.lua
-- (prepended to each: a script cannot call another).
-- KEYS[1] topic meta (hash: epoch, offset, run)   KEYS[2] topic log (stream)
-- ARGV[1] tie-breaker (0..2047) for a new epoch
--
-- The instance that last wrote the topic is in its meta (`run`): Redis can
-- come back with less than it acknowledged (a restart from an RDB snapshot
-- or an everysec AOF, a failover to a replica that is behind) with the meta
-- of an older offset and the same epoch. Any other instance, or a meta from
-- before `run` was kept, may have lost history: the topic starts over with a
-- new epoch rather than reuse offsets.
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')

-- A new epoch comes after every epoch the topic had: Redis' clock in ms
-- shifted past an 11-bit tie-breaker (ARGV[1]), and at least one more than
-- the epoch being replaced and `floor`, the newest one the caller has seen,
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

-- The topic's current epoch, begun anew (offset 0, an empty log) when the
-- meta is missing or was written by another instance.
local function current_epoch(floor)
  local old = redis.call('HGET', KEYS[1], 'epoch')
  if old and redis.call('HGET', KEYS[1], 'run') == run then
    return old
  end
  -- A lost log starts over; drop any stream left without its meta.
  redis.call('DEL', KEYS[2])
  local epoch = successor(old, floor)
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'run', run)
  return epoch
end
