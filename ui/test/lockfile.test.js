// The dashboard builds from ui/package-lock.json alone, through the npm
// registry alone: these checks fail when a dependency change would make the
// build fetch something else (an install script that downloads a binary or a
// browser, a git or tarball URL, an unpinned version) or trust bytes no hash
// covers. A fresh machine and a machine without network (a warm npm cache)
// then build the same files.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

const read = (f) => JSON.parse(readFileSync(new URL(`../${f}`, import.meta.url), 'utf8'));
const manifest = read('package.json');
const lock = read('package-lock.json');
const installed = Object.entries(lock.packages).filter(([path]) => path !== '');

test('package.json pins every dependency to one exact version', () => {
  const all = { ...manifest.dependencies, ...manifest.devDependencies };
  assert.ok(Object.keys(all).length > 0);
  for (const [name, range] of Object.entries(all)) {
    assert.match(range, /^\d+\.\d+\.\d+$/, `${name}@${range} is not an exact version`);
  }
});

test('the lockfile agrees with package.json', () => {
  assert.equal(lock.lockfileVersion, 3);
  const root = lock.packages[''];
  assert.deepEqual(root.dependencies, manifest.dependencies);
  assert.deepEqual(root.devDependencies, manifest.devDependencies);
  for (const [name, version] of Object.entries({ ...manifest.dependencies, ...manifest.devDependencies })) {
    assert.equal(lock.packages[`node_modules/${name}`]?.version, version, name);
  }
});

test('every locked package comes from the npm registry with an integrity hash and no install script', () => {
  assert.ok(installed.length > 0);
  for (const [path, p] of installed) {
    assert.match(p.integrity || '', /^sha512-/, `${path} has no sha512 integrity`);
    assert.equal(p.hasInstallScript, undefined, `${path} runs an install script`);
    assert.equal(p.link, undefined, `${path} is a link, not a registry package`);
    // npm records no address for registry packages here (omit-lockfile-registry-resolved);
    // any address recorded must be the registry's own tarball.
    if (p.resolved !== undefined) {
      assert.match(p.resolved, /^https:\/\/registry\.npmjs\.org\/.+\.tgz$/, `${path} resolves to ${p.resolved}`);
    }
  }
});

test('the browser driver is playwright-core, which downloads no browser', () => {
  const names = installed.map(([path]) => path.replace(/^.*node_modules\//, ''));
  assert.ok(names.includes('playwright-core'));
  for (const n of ['playwright', 'puppeteer', '@playwright/test']) {
    assert.ok(!names.includes(n), `${n} downloads a browser at install`);
  }
});
