// The gateway's JSON API: one fetch wrapper that adds the API key and turns the
// gateway's error shape, {"error": {"type", "message"}}, into an ApiError.

const KEY_STORAGE = "shoal.dashboard.apiKey";

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status; // 0: the gateway could not be reached
    this.type = type;
  }

  get text() {
    return this.status ? `${this.status} ${this.type}: ${this.message}` : this.message;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Relative URLs, so a dashboard served under a path prefix reaches its own gateway. */
export function url(path, query = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") params.set(name, value);
  }
  const qs = params.toString();
  return qs ? `${path}?${qs}` : path;
}

export async function errorOf(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy's page, say; its text is shown below
  }
  const error = body && body.error;
  return new ApiError(
    response.status,
    (error && error.type) || response.statusText || "HTTPError",
    (error && error.message) || text.slice(0, 300) || `HTTP ${response.status}`,
  );
}

export async function request(path, { method = "GET", query, body, signal } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url(path, query), {
      method, headers, signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "NetworkError", `the gateway cannot be reached (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

export const get = (path, query) => request(path, { query });
export const post = (path, body) => request(path, { method: "POST", body });
