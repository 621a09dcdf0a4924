// Numbers, times and sizes as the pages show them.
const nf = new Intl.NumberFormat('en-US');

export function count(n) {
  return n === undefined || n === null ? '–' : nf.format(n);
}

export function percent(part, whole) {
  if (!whole) return '0%';
  const p = (100 * part) / whole;
  if (p > 0 && p < 0.1) return '<0.1%';
  return `${p >= 10 || p === 0 ? Math.round(p) : p.toFixed(1)}%`;
}

// "3 min ago", "in 2 days"; '' for an empty time.
export function relative(iso, now = Date.now()) {
  if (!iso) return '';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '';
  const s = Math.round((t - now) / 1000);
  const a = Math.abs(s);
  const [n, unit] = a < 60 ? [a, 's'] : a < 3600 ? [Math.round(a / 60), 'min'] : a < 86400 ? [Math.round(a / 3600), 'h'] :
    [Math.round(a / 86400), a < 172800 ? 'day' : 'days'];
  if (a < 5) return 'just now';
  return s < 0 ? `${n} ${unit} ago` : `in ${n} ${unit}`;
}

export function datetime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}

export function bytes(n) {
  if (!n) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return `${v >= 10 || u === 0 ? Math.round(v) : v.toFixed(1)} ${units[u]}`;
}

// A campaign's counts as the segments of its progress bar, in this order.
export function segments(c) {
  if (!c) return [];
  return [
    { key: 'applied', label: 'applied', n: c.applied || 0 },
    { key: 'failed', label: 'failed', n: (c.failed || 0) + (c.rollback_failed || 0) },
    { key: 'rolled', label: 'rolled back', n: (c.rolled_back || 0) + (c.rolling_back || 0) },
    { key: 'flight', label: 'in flight', n: (c.pending || 0) + (c.in_progress || 0) },
    { key: 'other', label: 'superseded or skipped', n: (c.superseded || 0) + (c.skipped || 0) },
    { key: 'waiting', label: 'waiting', n: c.waiting || 0 },
  ];
}
