// Hash routes: "#/devices?state=failed". Filters live in the hash (they are
// not secret); the API token never does.
export function parseHash(hash) {
  const h = (hash || '').replace(/^#/, '') || '/';
  const q = h.indexOf('?');
  const path = q < 0 ? h : h.slice(0, q);
  const params = new URLSearchParams(q < 0 ? '' : h.slice(q + 1));
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, params };
}

export function link(path, params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') p.set(k, String(v));
  }
  const qs = p.toString();
  return `#${path}${qs ? `?${qs}` : ''}`;
}

// The device-list query the API takes, from the page's parameters: only the
// known keys, so nothing else from the hash reaches the hub. "-" for bundle
// or k3s is "none" (the API's empty value; an empty form field means "any").
export const deviceFilterKeys = ['selector', 'state', 'online', 'bundle', 'version', 'k3s', 'q', 'cert_within_days',
  'include_decommissioned', 'sort', 'order'];

export function deviceQuery(params, after) {
  const p = new URLSearchParams();
  for (const k of deviceFilterKeys) {
    const v = params.get(k);
    if (v === null || v === '') continue;
    p.set(k, v === '-' && (k === 'bundle' || k === 'k3s') ? '' : v);
  }
  if (after) p.set('after', after);
  return p.toString();
}
