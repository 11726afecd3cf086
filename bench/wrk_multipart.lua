-- wrk script: POST many distinct multipart bodies (pre-built files) round-robin.
-- env: BENCH_BODIES (dir with 1.body .. N.body), BENCH_COUNT (N), BENCH_PATH (/predict),
--      BENCH_BOUNDARY (the multipart boundary used in the bodies)
local dir = os.getenv("BENCH_BODIES")
local count = tonumber(os.getenv("BENCH_COUNT"))
local path = os.getenv("BENCH_PATH") or "/predict"
local ctype = "multipart/form-data; boundary=" .. (os.getenv("BENCH_BOUNDARY") or "BENCHBOUNDARY")
local bodies = {}
local i = 0

function init(args)
  for k = 1, count do
    local f = assert(io.open(dir .. "/" .. k .. ".body", "rb"))
    bodies[k] = f:read("*all")
    f:close()
  end
  i = math.random(count)
end

function request()
  i = i % count + 1
  return wrk.format("POST", path, {["Content-Type"] = ctype}, bodies[i])
end
