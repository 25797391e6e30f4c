// Talking to the service: JSON requests whose failures carry the server's `detail`,
// server-sent events read from a fetch body (EventSource only does GET, and cannot send
// the job token header), the tab's job token and the admin token.

const BASE = new URL(".", document.baseURI); // the server's root, whatever prefix it has

export function url(path) {
  return new URL(path.replace(/^\//, ""), BASE).toString();
}

// An answer that is not 2xx, or no answer at all (status 0): `message` is what the
// server said (its `detail`), ready to show.
export class ApiError extends Error {
  constructor(status, message, detail) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

// FastAPI's `detail`: a string, or a list of {loc, msg} for validation errors.
export function formatDetail(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => {
        if (e == null || typeof e !== "object") return String(e);
        const loc = (e.loc || []).filter((p) => p !== "body").join(".");
        return loc ? `${loc}: ${e.msg}` : e.msg || JSON.stringify(e);
      })
      .join("; ");
  }
  if (typeof detail === "object" && detail.detail !== undefined) return formatDetail(detail.detail);
  return JSON.stringify(detail);
}

async function errorFrom(response) {
  let text = "";
  try {
    text = await response.text();
  } catch (_) {
    /* the body was cut off: the status alone */
  }
  let detail = text;
  try {
    const parsed = JSON.parse(text);
    detail = parsed && parsed.detail !== undefined ? parsed.detail : parsed;
  } catch (_) {
    /* not JSON: show the text */
  }
  const said = formatDetail(detail) || response.statusText || "no detail";
  return new ApiError(response.status, `${response.status}: ${said}`, detail);
}

// The tab's own job token: made once per tab (sessionStorage is per tab), sent on every
// jobs call, so GET /v1/jobs lists this tab's jobs and nobody else's.
export function jobToken() {
  let token = sessionStorage.getItem("imh-job-token");
  if (!token) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    token = "tab-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("imh-job-token", token);
  }
  return token;
}

// The admin token lives in this variable only: never in storage or cookies.
let adminToken = null;
export function setAdminToken(token) {
  adminToken = token || null;
}
export function hasAdminToken() {
  return adminToken !== null;
}
export function adminHeaders() {
  return adminToken ? { Authorization: `Bearer ${adminToken}` } : {};
}

const listeners = new Set();
// Called with (ok, error) after every request: the connection monitor listens.
export function onReachability(listener) {
  listeners.add(listener);
}
function reachability(ok, error) {
  for (const listener of listeners) listener(ok, error);
}

// fetch that throws ApiError for non-2xx answers and for network failures.
export async function request(path, { method = "GET", json, body, headers = {}, signal, accept } = {}) {
  const init = { method, headers: { ...headers }, signal, cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  if (accept) init.headers.Accept = accept;
  let response;
  try {
    response = await fetch(url(path), init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    const failure = new ApiError(0, `cannot reach the server: ${error.message}`);
    reachability(false, failure);
    throw failure;
  }
  reachability(true);
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

export async function sendJSON(path, json, options = {}) {
  const response = await request(path, { method: "POST", json, ...options });
  return response.json();
}

// Server-sent events of a response body: yields {id, event, data} with data parsed as
// JSON. A body that ends in the middle of an event drops that event.
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let fields = { data: [] };
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new ApiError(0, `the stream was cut off: ${error.message}`);
      }
      if (chunk.done) return;
      buffer += decoder.decode(chunk.value, { stream: true });
      let start = 0;
      for (;;) {
        const end = buffer.indexOf("\n", start);
        if (end < 0) break;
        let line = buffer.slice(start, end);
        start = end + 1;
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (fields.data.length) {
            const text = fields.data.join("\n");
            let data;
            try {
              data = JSON.parse(text);
            } catch (_) {
              data = text;
            }
            yield { id: fields.id, event: fields.event || "message", data };
          }
          fields = { data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (name === "data") fields.data.push(value);
          else fields[name] = value;
        }
      }
      buffer = buffer.slice(start);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Save a Blob under a file name (an <a download> on an object URL).
export function saveBlob(blob, name) {
  const href = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = href;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10_000);
}
