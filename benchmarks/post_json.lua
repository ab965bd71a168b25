-- wrk script: POST one JSON body over and over and report machine-readable results.
--
--   wrk -t1 -cN -dDs -s benchmarks/post_json.lua URL -- <api key or ""> <json body> [stream]
--
-- With "stream", every 200 response must contain `data: [DONE]`; the ones that do not are
-- counted as incomplete streams. `done` prints one `BENCH_RESULT key=value ...` line.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[1] ~= nil and args[1] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[1]
  end
  wrk.body = args[2]
  incomplete = 0
  if args[3] == "stream" then
    -- Defined only when needed: a response hook makes wrk hand every body to Lua.
    response = function(status, headers, body)
      if status == 200 and not string.find(body, "data: [DONE]", 1, true) then
        incomplete = incomplete + 1
      end
    end
  end
end

function done(summary, latency, requests)
  local incomplete_total = 0
  for _, thread in ipairs(threads) do
    incomplete_total = incomplete_total + (thread:get("incomplete") or 0)
  end
  local errors = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d bytes=%d mean_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d "
      .. "non2xx=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d incomplete_streams=%d\n",
    summary.requests, summary.duration, summary.bytes, math.floor(latency.mean),
    math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
    math.floor(latency:percentile(99)), math.floor(latency.max),
    errors.status, errors.connect, errors.read, errors.write, errors.timeout, incomplete_total
  ))
end
