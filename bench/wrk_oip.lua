-- wrk script: POST many distinct Open Inference Protocol bodies (pre-built files) round-robin.
-- env: BENCH_BODIES (dir with 1.body .. N.body and, for the binary tensor data extension,
--      1.hlen .. N.hlen holding the JSON header's length), BENCH_COUNT (N), BENCH_PATH,
--      BENCH_CTYPE (the body's Content-Type)
local dir = os.getenv("BENCH_BODIES")
local count = tonumber(os.getenv("BENCH_COUNT"))
local path = os.getenv("BENCH_PATH")
local ctype = os.getenv("BENCH_CTYPE") or "application/json"
local bodies, hlens = {}, {}
local i = 0

function init(args)
  for k = 1, count do
    local f = assert(io.open(dir .. "/" .. k .. ".body", "rb"))
    bodies[k] = f:read("*all")
    f:close()
    local h = io.open(dir .. "/" .. k .. ".hlen", "rb")
    if h then
      hlens[k] = h:read("*all")
      h:close()
    end
  end
  i = math.random(count)
end

function request()
  i = i % count + 1
  local headers = {["Content-Type"] = ctype}
  if hlens[i] then
    headers["Inference-Header-Content-Length"] = hlens[i]
  end
  return wrk.format("POST", path, headers, bodies[i])
end
