-- wrk script used for BOTH systems, so that the load tool, the connection
-- handling, the payload and the bookkeeping are identical.
--
--   wrk ... -s wrk-put.lua URL -- MODE PREFIX [QUOTA MARKER_DIR]
--
-- MODE    meshwork : PUT  /v1/kv/<key>   body = the raw 256-byte value
--         etcd     : POST /v3/kv/put     body = {"key": b64(key), "value": b64(value)}
-- PREFIX  key prefix; every request writes a distinct key PREFIX/<thread>/<n>
-- QUOTA   optional: each wrk thread stops after QUOTA responses (0 = run for -d)
--         and creates the file MARKER_DIR/<thread> so that the caller knows
--         when to end wrk (wrk itself always waits for its full -d)
--
-- A request counts as OK only if the status is 2xx AND the body is what the
-- API returns for a successful write ("true" for Meshwork, a JSON object with
-- a "header" for etcd).  Everything else is counted separately and reported.
-- done() prints one machine-readable line starting with "RESULT ".

local threads = {}
local next_tid = 0

function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  table.insert(threads, thread)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(data)
  local out = {}
  local n = #data
  for i = 1, n, 3 do
    local a, b, c = data:byte(i, i + 2)
    local v = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(v / 262144) % 64
    local c2 = math.floor(v / 4096) % 64
    local c3 = math.floor(v / 64) % 64
    local c4 = v % 64
    out[#out + 1] = B64:sub(c1 + 1, c1 + 1) .. B64:sub(c2 + 1, c2 + 1)
      .. (b and B64:sub(c3 + 1, c3 + 1) or "=")
      .. (c and B64:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end

-- A fixed 256-byte value, identical for both systems.
local function make_value()
  local chunk = "meshwork-bench-0123456789abcdefghijklmnopqrstuvwxyz-"
  local v = string.rep(chunk, math.ceil(256 / #chunk))
  return v:sub(1, 256)
end

function init(args)
  mode = args[1] or "meshwork"
  prefix = args[2] or "bench"
  quota = tonumber(args[3] or "0") or 0
  marker_dir = args[4]
  stopped = false
  if mode ~= "meshwork" and mode ~= "etcd" then
    error("MODE must be meshwork or etcd, got " .. tostring(mode))
  end
  value = make_value()
  assert(#value == 256)
  value_b64 = b64(value)
  sent, ok, non2xx, badbody, answered = 0, 0, 0, 0, 0
  first_error = ""
  etcd_headers = { ["Content-Type"] = "application/json" }
  -- An ACL token for Meshwork (bench/kv-put-secure.sh), from the environment.
  local token = os.getenv("WRK_TOKEN")
  mw_headers = nil
  if token and token ~= "" then
    mw_headers = { ["X-Consul-Token"] = token }
  end
end

function request()
  sent = sent + 1
  local key = prefix .. "/" .. tid .. "/" .. sent
  if mode == "meshwork" then
    return wrk.format("PUT", "/v1/kv/" .. key, mw_headers, value)
  else
    local body = '{"key":"' .. b64(key) .. '","value":"' .. value_b64 .. '"}'
    return wrk.format("POST", "/v3/kv/put", etcd_headers, body)
  end
end

function response(status, headers, body)
  answered = answered + 1
  if status >= 200 and status < 300 then
    local good
    if mode == "meshwork" then
      good = body ~= nil and body:match("^%s*true%s*$") ~= nil
    else
      good = body ~= nil and body:find('"header"', 1, true) ~= nil
        and body:find('"error"', 1, true) == nil
    end
    if good then
      ok = ok + 1
    else
      badbody = badbody + 1
      if first_error == "" then
        first_error = "status " .. status .. ": " .. tostring(body):sub(1, 200)
      end
    end
  else
    non2xx = non2xx + 1
    if first_error == "" then
      first_error = "status " .. status .. ": " .. tostring(body):sub(1, 200)
    end
  end
  if quota > 0 and answered >= quota and not stopped then
    stopped = true
    if marker_dir then
      local f = io.open(marker_dir .. "/" .. tid, "w")
      if f then f:write(answered, "\n"); f:close() end
    end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local t_sent, t_ok, t_non2xx, t_bad = 0, 0, 0, 0
  local err = ""
  for _, t in ipairs(threads) do
    t_sent = t_sent + (t:get("sent") or 0)
    t_ok = t_ok + (t:get("ok") or 0)
    t_non2xx = t_non2xx + (t:get("non2xx") or 0)
    t_bad = t_bad + (t:get("badbody") or 0)
    local e = t:get("first_error") or ""
    if err == "" and e ~= "" then err = e end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT duration_us=%d completed=%d ok=%d non2xx=%d badbody=%d sent=%d "
      .. "connect_err=%d read_err=%d write_err=%d timeout_err=%d "
      .. "p50_us=%d p90_us=%d p99_us=%d p999_us=%d mean_us=%.1f max_us=%d\n",
    summary.duration, summary.requests, t_ok, t_non2xx, t_bad, t_sent,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
  if err ~= "" then
    io.write("FIRST_ERROR " .. err:gsub("\n", " ") .. "\n")
  end
end
