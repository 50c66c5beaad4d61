-- wrk script: POST prepared Open Inference Protocol (v2) bodies with the binary tensor data extension.
-- Usage: wrk -s benchmarks/v2.lua http://host:port/v2/models/model/infer -- manifest.txt
-- Each manifest line is "<JSON header length> <path of a body file>"; a body is the JSON header
-- followed by the tensor's bytes, built once by serve_bench.py, so wrk only sends.
local bodies = {}
local lengths = {}
local index = 0

function init(args)
  local manifest = assert(io.open(args[1], "r"), "cannot open the manifest " .. tostring(args[1]))
  for line in manifest:lines() do
    local length, path = line:match("^(%d+) (.+)$")
    local f = assert(io.open(path, "rb"), "cannot open " .. path)
    bodies[#bodies + 1] = f:read("*a")
    lengths[#lengths + 1] = length
    f:close()
  end
  manifest:close()
  index = math.random(#bodies)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/octet-stream"
end

function request()
  index = index % #bodies + 1
  -- A headers table replaces wrk.headers (wrk adds Host and Content-Length itself).
  local headers = { ["Content-Type"] = "application/octet-stream", ["Inference-Header-Content-Length"] = lengths[index] }
  return wrk.format(nil, nil, headers, bodies[index])
end

local failures = 0
function response(status, headers, body)
  if status ~= 200 then
    failures = failures + 1
    if failures <= 3 then
      io.stderr:write("non-200 answer: " .. status .. " " .. body .. "\n")
    end
  end
end
