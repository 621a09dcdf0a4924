// Talking to the hub: every call carries the API token as
// "Authorization: Bearer" (never in a URL, a cookie or a log). The token is
// kept in this tab's sessionStorage, so a reload keeps the session and
// closing the tab ends it.
import { SseParser } from './sse.js';

const KEY = 'flotilla.token';
let token = '';
try {
  token = sessionStorage.getItem(KEY) || '';
} catch {
  token = '';
}
const signedOutListeners = new Set();

export function hasToken() {
  return token !== '';
}

export function setToken(t) {
  token = t;
  try {
    if (t) sessionStorage.setItem(KEY, t);
    else sessionStorage.removeItem(KEY);
  } catch {
    // Storage may be off (private mode): the token then lives in memory only.
  }
}

export function onSignedOut(f) {
  signedOutListeners.add(f);
  return () => signedOutListeners.delete(f);
}

export function signOut(reason) {
  setToken('');
  for (const f of signedOutListeners) f(reason);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra) {
  return { Authorization: `Bearer ${token}`, ...extra };
}

export async function api(path, { method = 'GET', body, tokenOverride } = {}) {
  const init = {
    method,
    headers: tokenOverride ? { Authorization: `Bearer ${tokenOverride}` } : headers(),
    cache: 'no-store',
    credentials: 'omit',
    referrerPolicy: 'no-referrer',
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let j = null;
  try {
    j = text ? JSON.parse(text) : null;
  } catch {
    j = null;
  }
  if (!r.ok) {
    const err = new ApiError(r.status, j?.error?.code || 'error', j?.error?.message || `${r.status} ${r.statusText}`);
    if (r.status === 401 && !tokenOverride) signOut('The hub no longer accepts this token. Sign in again.');
    throw err;
  }
  return j;
}

const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

// Follows one topic's event stream: onSnapshot(json) for each snapshot the
// hub sends (at most one a second, the newest state), onStatus('live' |
// 'reconnecting' | 'ended') as the connection changes. Reconnects with
// backoff. Returns a function that stops it.
export function follow(topic, id, onSnapshot, onStatus) {
  let stopped = false;
  let ctrl = null;
  const q = new URLSearchParams({ topic });
  if (id) q.set('id', id);
  (async () => {
    let attempt = 0;
    while (!stopped) {
      ctrl = new AbortController();
      try {
        const r = await fetch(`/v1/events?${q}`, { headers: headers(), signal: ctrl.signal, cache: 'no-store',
          credentials: 'omit', referrerPolicy: 'no-referrer' });
        if (r.status === 401) {
          signOut('The hub no longer accepts this token. Sign in again.');
          return;
        }
        if (r.status === 404) {
          onStatus('ended');
          return;
        }
        if (!r.ok || !r.body) throw new Error(`stream answered ${r.status}`);
        attempt = 0;
        onStatus('live');
        let ended = false;
        const parser = new SseParser((ev) => {
          if (ev.event === 'snapshot') onSnapshot(JSON.parse(ev.data));
          else if (ev.event === 'end') ended = true;
        });
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          parser.push(decoder.decode(value, { stream: true }));
        }
        if (ended) {
          onStatus('ended');
          return;
        }
      } catch {
        if (stopped) return;
      }
      if (stopped) return;
      onStatus('reconnecting');
      await sleep(Math.min(15000, 500 * 2 ** Math.min(attempt, 5)) * (0.75 + Math.random() / 2));
      attempt += 1;
    }
  })();
  return () => {
    stopped = true;
    if (ctrl) ctrl.abort();
  };
}
