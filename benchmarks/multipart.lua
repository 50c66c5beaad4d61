-- wrk script: POST one JPEG per request as multipart/form-data, cycling through a list of files.
-- Usage: wrk -s benchmarks/multipart.lua http://host:port/predict/model -- manifest.txt
-- The manifest holds one image path per line; every body is built once, in init, so the
-- load generator spends its time sending, not building requests.
local bodies = {}
local index = 0
local boundary = "----kosbenchboundary7d93"

function init(args)
  local manifest = assert(io.open(args[1], "r"), "cannot open the manifest " .. tostring(args[1]))
  for path in manifest:lines() do
    local f = assert(io.open(path, "rb"), "cannot open " .. path)
    local data = f:read("*a")
    f:close()
    local name = path:match("([^/]+)$")
    bodies[#bodies + 1] = "--" .. boundary .. "\r\n"
      .. 'Content-Disposition: form-data; name="files"; filename="' .. name .. '"\r\n'
      .. "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  end
  manifest:close()
  -- Threads start at different files so they do not upload the same image in lockstep.
  index = math.random(#bodies)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
end

function request()
  index = index % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[index])
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
