// The rdev-api HTTP API as the console uses it: the key from session storage, JSON in and out,
// problem+json errors turned into one readable message.

const KEY_STORAGE = 'rdev-api-key';

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** An error answered by the server (or the network), with its HTTP status (0: no answer). */
export class ApiError extends Error {
  constructor(message, status, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

async function problemMessage(response) {
  const fallback = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    const fields = (body.errors || []).map((e) => `${e.pointer}: ${e.message}`).join('; ');
    const message = [body.title || fallback, body.detail, fields].filter(Boolean).join(': ');
    return { message, type: body.type };
  } catch {
    return { message: fallback, type: undefined };
  }
}

/** Calls `/api/v1{path}`; resolves with the parsed JSON (or null for an empty body). */
export async function api(path, { method = 'GET', body, key = storedKey() } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(`/api/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (error) {
    throw new ApiError(`cannot reach the server (${error.message})`, 0);
  }
  if (!response.ok) {
    const { message, type } = await problemMessage(response);
    throw new ApiError(message, response.status, type);
  }
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}
