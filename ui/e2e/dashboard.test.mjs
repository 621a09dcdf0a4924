// The dashboard in Debian's chromium (playwright-core; no browser download),
// against the real hub and agents tests/e2e/ui_browser.sh started. Every
// wait polls with a deadline; nothing asserts wall-clock speed.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (run tests/e2e/ui_browser.sh)`);
  return v;
};
const UI = env('UI_URL');
const HUB = env('HUB_URL');
const OPERATOR = env('OPERATOR_TOKEN');
const VIEWER = env('VIEWER_TOKEN');
const ADMIN = env('ADMIN_TOKEN');
const BUNDLE = env('BUNDLE_ID');
const DEVICES = Number(env('DEVICES'));
const ARTIFACTS = env('ARTIFACTS');
const tokens = [OPERATOR, VIEWER, ADMIN];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, f, timeoutMs = 60000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(200);
  }
  throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
}

// The hub's own answer, straight from the API listener (not through the page).
async function hub(path, { method = 'GET', token = ADMIN, body } = {}) {
  const r = await fetch(`${HUB}${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

// Form controls, buttons and links a screen reader could not name.
async function unnamed(p) {
  return p.evaluate(() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
    .filter((el) => el.getClientRects().length > 0)
    .filter((el) => {
      if (el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')) return false;
      if (el.labels && el.labels.length > 0) return false;
      return !(el.textContent || '').trim();
    })
    .map((el) => el.outerHTML.slice(0, 120)));
}

let step = '';
function log(s) {
  step = s;
  console.log(`-- ${s}`);
}

const profile = mkdtempSync(join(tmpdir(), 'flotilla-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: env('CHROMIUM'),
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
  viewport: { width: 1280, height: 900 },
});
// Every URL the pages ask for: the token must never be in one.
const urls = [];
context.on('request', (r) => urls.push(r.url()));
const consoleErrors = [];
let page = context.pages()[0] || (await context.newPage());
page.on('console', (m) => m.type() === 'error' && consoleErrors.push(m.text()));
page.on('pageerror', (e) => consoleErrors.push(String(e)));

async function signIn(p, token) {
  await p.goto(UI);
  await p.getByLabel('API token').fill(token);
  await p.getByRole('button', { name: 'Sign in' }).click();
  await p.getByRole('navigation', { name: 'Main' }).waitFor();
}

try {
  log('a wrong token is refused at sign-in');
  await page.goto(UI);
  assert.match(await page.title(), /Sign in/);
  // The token field is reachable with the keyboard first.
  await page.keyboard.press('Tab');
  await page.keyboard.press('Tab');
  await page.getByLabel('API token').fill('flt_api_not-a-token');
  await page.keyboard.press('Enter');
  await page.getByRole('alert').filter({ hasText: 'does not accept this token' }).waitFor();
  assert.deepEqual(await unnamed(page), [], 'unnamed controls on the sign-in page');

  log('sign in as an operator; the fleet page counts every device, live');
  await signIn(page, OPERATOR);
  await until('all devices online on the fleet page', async () =>
    (await page.getByTestId('fleet-online').textContent()) === String(DEVICES));
  assert.equal(await page.getByTestId('fleet-total').textContent(), String(DEVICES));
  // Every agent enrolled with a broker certificate from the hub's CA (90 days: "later").
  assert.equal(await page.getByTestId('broker-certs-later').textContent(), String(DEVICES));
  assert.equal(await page.getByTestId('broker-certs-7').textContent(), '0');
  assert.equal(await page.getByTestId('broker-certs-none').textContent(), '0');
  await page.getByTestId('live-status').filter({ hasText: 'Live' }).waitFor();
  // The region label (from the enrollment token) is counted on the hub: every device.
  const region = page.getByRole('region', { name: 'Regions' }).getByRole('link', { name: /eu-west/ });
  await until('eu-west counted for every device', async () =>
    (await region.count()) === 1 && (await region.textContent()).includes(`${DEVICES} devices`));
  assert.deepEqual(await unnamed(page), [], 'unnamed controls on the fleet page');
  // The counts are links to the filtered list: the region link lists the devices.
  await page.getByRole('link', { name: /cell-1/ }).click();
  await until('the cell-1 device list', async () =>
    /selector=cell/.test(page.url()) && (await page.locator('tbody tr').count()) > 0);
  const cellRows = await page.locator('tbody tr').count();
  const cellApi = await hub(`/v1/views/devices?selector=${encodeURIComponent('cell=cell-1')}`);
  assert.equal(cellRows, cellApi.body.items.length);

  log('create a campaign (canary, then a wave behind an approval gate) and open its page');
  const created = await hub('/v1/campaigns', {
    method: 'POST',
    token: OPERATOR,
    body: {
      name: 'ui-rollout', bundle: BUNDLE, selector: 'env=ui',
      strategy: { canary: 1, waves: [100], approval: ['wave 1'], device_deadline: '90s',
        failure_threshold: { percent: 60, min_sample: 3, action: 'pause' } },
    },
  });
  assert.equal(created.status, 201, JSON.stringify(created.body));
  const id = created.body.id;
  await page.goto(`${UI}#/campaigns/${id}`);
  await page.getByRole('heading', { name: /ui-rollout/ }).waitFor();
  // A marker that a reload would wipe: progress must arrive without one.
  await page.evaluate(() => { window.__flotillaNoReload = true; });
  const seen = new Set();
  const watch = setInterval(async () => {
    try {
      seen.add(await page.getByTestId('progress-text').textContent());
    } catch {
      // the page is between renders
    }
  }, 100);

  log('pause with the button: the dialog says what happens, the hub pauses');
  await page.getByRole('button', { name: 'Pause', exact: true }).click();
  const dialog = page.getByRole('dialog');
  await dialog.waitFor();
  assert.match(await dialog.textContent(), /stops releasing devices/);
  await dialog.getByRole('button', { name: 'Pause campaign' }).click();
  await until('the hub to say paused', async () => (await hub(`/v1/campaigns/${id}`)).body.state === 'paused');
  await page.getByTestId('campaign-state').filter({ hasText: 'paused' }).waitFor();
  assert.equal(await page.getByRole('button', { name: 'Pause', exact: true }).count(), 0);

  log('Escape closes a confirmation and nothing happens');
  await page.getByRole('button', { name: 'Abort', exact: true }).click();
  await dialog.waitFor();
  assert.match(await dialog.textContent(), /cannot be resumed/);
  await page.keyboard.press('Escape');
  await until('the dialog to close', async () => !(await dialog.isVisible()));
  assert.equal((await hub(`/v1/campaigns/${id}`)).body.state, 'paused');

  log('resume with the keyboard alone: the dialog takes the focus, Tab and Enter confirm');
  await page.getByRole('button', { name: 'Resume', exact: true }).focus();
  await page.keyboard.press('Enter');
  await dialog.waitFor();
  assert.match(await dialog.textContent(), /releases devices again/);
  // A modal dialog focuses its first control (Cancel): a stray Enter does nothing harmful.
  assert.equal(await page.evaluate(() => document.activeElement?.textContent), 'Cancel');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement?.textContent), 'Resume campaign');
  await page.keyboard.press('Enter');
  await until('the hub to leave paused', async () => (await hub(`/v1/campaigns/${id}`)).body.state !== 'paused');

  log('the canary applies, the gate waits; approve it with the button');
  await until('the approval gate', async () => (await hub(`/v1/campaigns/${id}`)).body.state === 'waiting_approval', 120000);
  const approve = page.getByRole('button', { name: 'Approve wave 1' });
  await approve.waitFor({ timeout: 15000 });
  await approve.click();
  await dialog.waitFor();
  assert.match(await dialog.textContent(), /starts releasing/);
  await dialog.getByRole('button', { name: 'Approve wave 1' }).click();

  log('the campaign runs to completion on the page, without a reload');
  await until('the hub to complete the campaign', async () => {
    const c = (await hub(`/v1/campaigns/${id}`)).body;
    return ['completed', 'paused', 'aborted'].includes(c.state) && c.state;
  }, 180000);
  const done = (await hub(`/v1/campaigns/${id}`)).body;
  assert.equal(done.state, 'completed', JSON.stringify(done.counts));
  assert.equal(done.counts.applied, DEVICES - 1);
  assert.equal(done.counts.failed, 1);
  await page.getByTestId('campaign-state').filter({ hasText: 'completed' }).waitFor({ timeout: 15000 });
  await until('the final count on the page', async () =>
    (await page.getByTestId('progress-text').textContent()) === `${DEVICES - 1} of ${DEVICES} applied`, 15000);
  clearInterval(watch);
  seen.add(await page.getByTestId('progress-text').textContent());
  assert.equal(await page.evaluate(() => window.__flotillaNoReload), true, 'the page was reloaded');
  // The counts changed on the open page at least from the canary to the end.
  assert.ok(seen.size >= 2, `progress seen: ${[...seen].join(' | ')}`);
  console.log(`   progress seen on the page: ${[...seen].join(' | ')}`);
  await page.getByTestId('timeline-chart').locator('canvas').waitFor();
  // A completed campaign can still be rolled back: an operator is offered that.
  assert.equal(await page.getByRole('button', { name: 'Roll back', exact: true }).count(), 1);
  await page.screenshot({ path: join(ARTIFACTS, 'campaign.png'), fullPage: true });

  log('the failed device: its reason on the campaign page and on its own page');
  const failedRow = done.failure_reasons;
  const reason = Object.keys(failedRow)[0];
  assert.ok(reason, 'the hub names the failure');
  await page.getByTestId('failure-reason').filter({ hasText: reason }).waitFor();
  const link = page.getByRole('table', { name: 'Failures by reason' }).getByRole('link').first();
  const deviceId = await link.textContent();
  await link.click();
  await page.getByTestId('device-failure').waitFor();
  const hubDevice = (await hub(`/v1/devices/${deviceId}`)).body;
  assert.equal(await page.getByTestId('device-failure-reason').textContent(), hubDevice.last_reason);
  assert.equal(hubDevice.last_reason, reason);
  assert.equal(hubDevice.labels.role, 'flaky');
  await page.getByRole('table', { name: 'Campaign history' }).getByText(reason).waitFor();
  await page.screenshot({ path: join(ARTIFACTS, 'device-failed.png'), fullPage: true });

  log('the fleet page after the campaign');
  await page.getByRole('link', { name: 'Fleet', exact: true }).click();
  await until('the new version on the fleet page', async () =>
    (await page.getByRole('link', { name: /ui-test:1/ }).count()) === 1);
  await page.screenshot({ path: join(ARTIFACTS, 'fleet.png'), fullPage: true });

  log('a narrow screen: nothing wider than the viewport');
  await page.setViewportSize({ width: 390, height: 844 });
  for (const [route, shown] of [['#/fleet', 'fleet-total'], [`#/campaigns/${id}`, 'timeline-chart'], ['#/devices', 'devices-status']]) {
    await page.goto(`${UI}${route}`);
    // The page's data, not only its heading, is on screen before it is measured.
    await page.getByTestId(shown).waitFor();
    assert.deepEqual(await unnamed(page), [], `unnamed controls on ${route}`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `${route} is ${overflow}px wider than a 390px screen`);
  }
  await page.goto(`${UI}#/campaigns/${id}`);
  await page.getByTestId('progress-text').waitFor();
  await page.screenshot({ path: join(ARTIFACTS, 'campaign-narrow.png'), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });

  log('the other pages answer: devices, campaigns, bundles, audit');
  await page.goto(`${UI}#/devices?selector=${encodeURIComponent('role=flaky')}`);
  await until('the flaky device in the list, with its failure', async () =>
    (await page.locator('tbody tr').count()) === 1 && (await page.locator('tbody tr').first().textContent()).includes(reason));
  // Its state is a trouble state: the list walks the table of those devices only.
  assert.ok(['failed', 'refused', 'rolled_back', 'rolling_back'].includes(hubDevice.state), hubDevice.state);
  const troubled = (await hub(`/v1/views/devices?state=${hubDevice.state}`)).body;
  assert.deepEqual(troubled.items.map((d) => d.id), [deviceId]);
  assert.equal(troubled.index, 'device_trouble');
  await page.goto(`${UI}#/campaigns`);
  await page.getByRole('link', { name: 'ui-rollout' }).waitFor();
  await page.goto(`${UI}#/bundles`);
  await page.getByRole('cell', { name: 'ui-test', exact: true }).waitFor();
  // An operator has no audit page (admins only).
  assert.equal(await page.getByRole('link', { name: 'Audit log' }).count(), 0);

  log('an operator sees the cells, as the API has them');
  await page.getByRole('link', { name: 'Cells' }).click();
  const cellsTable = page.getByRole('table', { name: 'Cells' });
  await cellsTable.waitFor();
  const cellsApi = (await hub('/v1/cells', { token: OPERATOR })).body.items;
  assert.ok(cellsApi.length >= 1);
  for (const c of cellsApi) {
    const row = page.getByTestId(`cell-${c.id}`);
    await until(`cell ${c.id}'s row`, async () => (await row.textContent()).includes(c.broker_url));
    const cells = await row.locator('td').allTextContents();
    assert.equal(cells[1], c.broker === 'up' ? 'up' : c.broker);
    assert.equal(cells[3], c.draining ? 'draining' : 'no');
    assert.equal(Number(cells[4].replace(/[^0-9]/g, '')), c.devices_total);
  }
  assert.equal(await cellsTable.locator('tbody tr').count(), cellsApi.length);

  log('a viewer sees no action buttons, and a forged action is refused');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByLabel('API token').waitFor();
  await signIn(page, VIEWER);
  await page.goto(`${UI}#/campaigns/${id}`);
  await page.getByTestId('progress-text').waitFor();
  assert.equal(await page.getByRole('region', { name: 'Campaign actions' }).count(), 0);
  // GET /v1/cells needs an operator: no Cells page for a viewer.
  assert.equal(await page.getByRole('link', { name: 'Cells' }).count(), 0);
  for (const name of ['Pause', 'Resume', 'Abort', 'Roll back', 'Approve wave 1']) {
    assert.equal(await page.getByRole('button', { name, exact: true }).count(), 0, `a viewer sees ${name}`);
  }
  const forged = await page.evaluate(async ({ cid, token }) => {
    const r = await fetch(`/v1/campaigns/${cid}/rollback`, { method: 'POST', headers: { Authorization: `Bearer ${token}` } });
    return { status: r.status, body: await r.json() };
  }, { cid: id, token: VIEWER });
  assert.equal(forged.status, 403);
  assert.equal(forged.body.error.code, 'permission_denied');
  assert.equal((await hub(`/v1/campaigns/${id}`)).body.state, 'completed');
  const audit = (await hub('/v1/views/audit?limit=20')).body.items;
  assert.ok(audit.some((a) => a.path === `/v1/campaigns/${id}/rollback` && a.status === 403 && a.role === 'viewer'));
  await page.screenshot({ path: join(ARTIFACTS, 'campaign-viewer.png'), fullPage: true });

  log('an admin sees the audit log');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await signIn(page, ADMIN);
  await page.getByRole('link', { name: 'Audit log' }).click();
  await page.getByRole('table', { name: 'Audit log' }).getByText(`/v1/campaigns/${id}/pause`).first().waitFor();

  log('no token in any URL the pages asked for, no script errors');
  for (const u of urls) {
    for (const t of tokens) assert.ok(!u.includes(t), `a token in ${u}`);
  }
  // The wrong token at sign-in (401) and the viewer's forged action (403) are the only refusals expected.
  const unexpected = consoleErrors.filter((e) => !/status of 40[13] \((Unauthorized|Forbidden)\)/.test(e));
  assert.ok(consoleErrors.length <= 2, consoleErrors.join('\n'));
  assert.deepEqual(unexpected, [], 'console errors');
  console.log(`ok: dashboard e2e passed (${urls.length} requests; screenshots in ${ARTIFACTS})`);
} catch (e) {
  console.error(`FAIL at step "${step}": ${e.stack || e}`);
  try {
    await page.screenshot({ path: join(ARTIFACTS, 'failure.png'), fullPage: true });
    console.error(`   screenshot: ${join(ARTIFACTS, 'failure.png')}`);
  } catch {
    // the browser is gone
  }
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
