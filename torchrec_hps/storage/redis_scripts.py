"""Server-side Lua for the Redis tier. Row ids travel as one packed string of 8-byte fields and rows as one
packed string, so a request for thousands of rows is one command and one reply, with no per-row work in
Python. Every script touches a single hash (one key), so it runs on one Cluster node."""

# KEYS[1] = hash; ARGV[1] = packed 8-byte ids; ARGV[2] = row size in bytes.
# Returns {flags, rows}: flags has one byte per id (1 = found), rows has one row per id (zeros if absent).
GET_ROWS = """
local ids = ARGV[1]
local size = tonumber(ARGV[2])
local n = #ids / 8
local zero = string.rep('\\0', size)
local flags, out = {}, {}
local i = 0
while i < n do
  local m = math.min(n - i, 2000)
  local fields = {}
  for j = 1, m do
    local a = (i + j - 1) * 8
    fields[j] = string.sub(ids, a + 1, a + 8)
  end
  local vals = redis.call('HMGET', KEYS[1], unpack(fields))
  for j = 1, m do
    local v = vals[j]
    if v and #v == size then
      out[i + j] = v
      flags[i + j] = '\\1'
    else
      out[i + j] = zero
      flags[i + j] = '\\0'
    end
  end
  i = i + m
end
return {table.concat(flags), table.concat(out)}
"""

# KEYS[1] = hash; ARGV[1] = packed 8-byte ids; ARGV[2] = packed rows; ARGV[3] = row size in bytes.
PUT_ROWS = """
local ids = ARGV[1]
local rows = ARGV[2]
local size = tonumber(ARGV[3])
local n = #ids / 8
if #rows ~= n * size then
  return redis.error_reply('hps: ' .. n .. ' ids but ' .. #rows .. ' row bytes (row size ' .. size .. ')')
end
local i = 0
while i < n do
  local m = math.min(n - i, 1000)
  local args = {}
  for j = 1, m do
    local a = (i + j - 1)
    args[2 * j - 1] = string.sub(ids, a * 8 + 1, a * 8 + 8)
    args[2 * j] = string.sub(rows, a * size + 1, a * size + size)
  end
  redis.call('HSET', KEYS[1], unpack(args))
  i = i + m
end
return n
"""

# KEYS[1] = hash; ARGV[1] = packed 8-byte ids. Returns the number of rows removed.
DELETE_ROWS = """
local ids = ARGV[1]
local n = #ids / 8
local removed = 0
local i = 0
while i < n do
  local m = math.min(n - i, 2000)
  local fields = {}
  for j = 1, m do
    local a = (i + j - 1) * 8
    fields[j] = string.sub(ids, a + 1, a + 8)
  end
  removed = removed + redis.call('HDEL', KEYS[1], unpack(fields))
  i = i + m
end
return removed
"""
