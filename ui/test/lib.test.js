// Unit tests of the dashboard's pure helpers (node --test; no browser).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { SseParser } from '../src/lib/sse.js';
import { count, percent, relative, bytes, segments } from '../src/lib/format.js';
import { parseHash, link, deviceQuery } from '../src/lib/route.js';

test('the SSE parser joins chunks split anywhere, skips comments and keeps ids', () => {
  const text = ': stream campaign:c-1\n\nevent: snapshot\nid: 1\ndata: {"a":1}\n\n: keep-alive\n\nevent: end\r\nid: 2\r\ndata: {"reason":"x"}\r\n\r\n';
  for (let cut = 0; cut <= text.length; cut += 1) {
    const got = [];
    const p = new SseParser((e) => got.push(e));
    p.push(text.slice(0, cut));
    p.push(text.slice(cut));
    assert.deepEqual(got, [
      { event: 'snapshot', id: '1', data: '{"a":1}' },
      { event: 'end', id: '2', data: '{"reason":"x"}' },
    ], `cut at ${cut}`);
  }
});

test('the SSE parser joins multi-line data and refuses an endless line', () => {
  const got = [];
  const p = new SseParser((e) => got.push(e));
  p.push('data: one\ndata: two\n\n');
  assert.deepEqual(got, [{ event: 'message', id: '', data: 'one\ntwo' }]);
  assert.throws(() => p.push('x'.repeat((4 << 20) + 1)), /longer than 4 MiB/);
});

test('numbers and times are formatted for people', () => {
  assert.equal(count(1234567), '1,234,567');
  assert.equal(count(undefined), '–');
  assert.equal(percent(1, 3), '33%');
  assert.equal(percent(1, 200), '0.5%');
  assert.equal(percent(1, 100000), '<0.1%');
  assert.equal(percent(0, 0), '0%');
  const now = Date.parse('2026-01-01T00:00:00Z');
  assert.equal(relative('2025-12-31T23:57:00Z', now), '3 min ago');
  assert.equal(relative('2026-01-03T00:00:00Z', now), 'in 2 days');
  assert.equal(relative('', now), '');
  assert.equal(bytes(1536), '1.5 KiB');
  assert.equal(bytes(0), '–');
});

test('progress segments add up to the campaign total', () => {
  const c = { total: 20, waiting: 5, pending: 1, in_progress: 2, applied: 8, failed: 1, superseded: 1, skipped: 0,
    rolling_back: 0, rolled_back: 1, rollback_failed: 1 };
  const sum = segments(c).reduce((a, s) => a + s.n, 0);
  assert.equal(sum, c.total);
  assert.equal(segments(c).find((s) => s.key === 'failed').n, 2);
});

test('hash routes round-trip and the device query keeps only known filters', () => {
  const h = link('/devices', { state: 'failed', selector: 'region=eu,tier!=db', empty: '' });
  const { parts, params } = parseHash(h);
  assert.deepEqual(parts, ['devices']);
  assert.equal(params.get('selector'), 'region=eu,tier!=db');
  assert.equal(params.has('empty'), false);
  const q = new URLSearchParams(deviceQuery(new URLSearchParams('state=failed&token=x&bundle=-&k3s=&sort=hostname'), 'c1'));
  assert.equal(q.get('state'), 'failed');
  assert.equal(q.has('token'), false);
  assert.equal(q.get('bundle'), '');
  assert.equal(q.has('k3s'), false);
  assert.equal(q.get('after'), 'c1');
});
