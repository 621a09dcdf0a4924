// Measures the dashboard in Debian's chromium against a hub holding a large
// fleet (bench/ui_scale.sh sets it up): each page loaded afresh several
// times, from navigation to its figures on screen, and the API answer the
// page waited for (the browser's resource timing). Prints a table.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (k) => {
  const v = process.env[k];
  if (v === undefined) throw new Error(`${k} is not set (run bench/ui_scale.sh)`);
  return v;
};
const UI = env('UI_URL');
const HUB = env('HUB_URL');
const TOKEN = env('ADMIN_TOKEN');
const CAMPAIGN = env('CAMPAIGN');
const HOST_PREFIX = env('HOST_PREFIX');
const OUT = env('OUT');
const RUNS = 7;

const profile = mkdtempSync(join(tmpdir(), 'flotilla-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: env('CHROMIUM'),
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
  viewport: { width: 1280, height: 900 },
});
const page = context.pages()[0] || (await context.newPage());

// Sign in once; the token stays in this tab's sessionStorage across loads.
await page.goto(UI);
await page.getByLabel('API token').fill(TOKEN);
await page.getByRole('button', { name: 'Sign in' }).click();
await page.getByRole('navigation', { name: 'Main' }).waitFor();

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

// Loads hash afresh RUNS times; `ready` resolves once the figures are on screen.
async function measure(name, hash, apiPath, ready) {
  const page_ms = [];
  const api_ms = [];
  let detail = '';
  for (let i = 0; i < RUNS; i += 1) {
    await page.goto('about:blank');
    const t0 = Date.now();
    await page.goto(`${UI}${hash}`);
    detail = await ready();
    page_ms.push(Date.now() - t0);
    const timings = await page.evaluate((p) => performance.getEntriesByType('resource')
      .filter((e) => e.name.includes(p)).map((e) => e.duration), apiPath);
    if (timings.length) api_ms.push(timings[0]);
  }
  const row = { name, hash, page_median_ms: median(page_ms), page_max_ms: Math.max(...page_ms),
    api_median_ms: api_ms.length ? median(api_ms) : null, detail };
  console.log(`${name.padEnd(44)} page ${String(Math.round(row.page_median_ms)).padStart(5)} ms median, ` +
    `${String(Math.round(row.page_max_ms)).padStart(5)} ms max; API ${row.api_median_ms === null ? '  n/a' :
      String(Math.round(row.api_median_ms)).padStart(5)} ms; ${detail}`);
  return row;
}

async function rows() {
  await page.locator('[data-testid="devices-status"]').waitFor({ timeout: 60000 });
  const n = await page.locator('tbody tr').count();
  return `${n} rows shown; ${(await page.getByTestId('devices-status').textContent()).trim()}`;
}

async function apiScan(query) {
  const r = await fetch(`${HUB}/v1/views/devices?${query}`, { headers: { Authorization: `Bearer ${TOKEN}` } });
  const j = await r.json();
  return `scanned ${j.scanned}, index ${j.index}, complete ${j.complete}`;
}

const results = [];
console.log(`dashboard at ${UI}, ${process.env.DEVICES} devices; each figure over ${RUNS} fresh page loads`);
results.push(await measure('fleet page', '#/fleet', '/v1/views/fleet', async () => {
  await page.getByTestId('fleet-total').waitFor({ timeout: 60000 });
  return `${await page.getByTestId('fleet-total').textContent()} devices counted`;
}));
const lists = [
  ['devices: first page, no filter', 'limit=50', ''],
  ['devices: label selector tier=lab (rare)', `selector=${encodeURIComponent('tier=lab')}`, `selector=${encodeURIComponent('tier=lab')}`],
  ['devices: label selector sim-run=ui-scale (all)', `selector=${encodeURIComponent('sim-run=ui-scale')}`, `selector=${encodeURIComponent('sim-run=ui-scale')}`],
  ['devices: state=failed', 'state=failed', 'state=failed'],
  ['devices: offline', 'online=false', 'online=false'],
  [`devices: hostname prefix ${HOST_PREFIX}`, `q=${encodeURIComponent(HOST_PREFIX)}`, `q=${encodeURIComponent(HOST_PREFIX)}`],
  ['devices: state=applied (no index; 2%)', 'state=applied', 'state=applied'],
  ['devices: state=idle (no index; most)', 'state=idle', 'state=idle'],
  ['devices: by hostname, descending', 'sort=hostname&order=desc', 'sort=hostname&order=desc'],
  // The bounded worst case: a filter no index serves that matches nothing
  // examines views-scan-limit rows and returns a cursor.
  ['devices: k3s=v0.0.0 (no index, no match)', 'k3s=v0.0.0', 'k3s=v0.0.0'],
];
for (const [name, hashQuery, apiQuery] of lists) {
  const row = await measure(name, `#/devices?${hashQuery}`, '/v1/views/devices', rows);
  row.api = await apiScan(apiQuery || 'limit=50');
  console.log(`${''.padEnd(44)} the API alone: ${row.api}`);
  results.push(row);
}
results.push(await measure('campaign page (the 1M campaign)', `#/campaigns/${CAMPAIGN}`, `/v1/views/campaigns/${CAMPAIGN}`,
  async () => {
    await page.getByTestId('progress-text').waitFor({ timeout: 60000 });
    return (await page.getByTestId('progress-text').textContent()).trim();
  }));
results.push(await measure('campaigns page', '#/campaigns', '/v1/views/campaigns', async () => {
  await page.locator('tbody tr').first().waitFor({ timeout: 60000 });
  return `${await page.locator('tbody tr').count()} campaigns`;
}));
await page.goto(`${UI}#/fleet`);
await page.getByTestId('fleet-total').waitFor();
await page.screenshot({ path: join(OUT, 'fleet-1m.png'), fullPage: true });
await page.goto(`${UI}#/campaigns/${CAMPAIGN}`);
await page.getByTestId('progress-text').waitFor();
await page.screenshot({ path: join(OUT, 'campaign-1m.png'), fullPage: true });
writeFileSync(join(OUT, 'figures.json'), JSON.stringify(results, null, 2));
await context.close();
rmSync(profile, { recursive: true, force: true });
