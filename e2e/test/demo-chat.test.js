'use strict';

// The demo (demo/worker.js, demo/index.html) as a chat across workers, in
// headless Chromium: 4 tabs over 3 workers, each tab shows its worker, a
// message typed in one tab appears in every tab.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const h = require('../lib/harness');
const { browserMissing, launchBrowser } = require('../lib/browser');

const TABS = 4;

test('demo chat: a message typed in one tab appears in every tab, over 3 workers', {
  skip: browserMissing(),
}, async () => {
  const sticky = await h.startSticky({
    workers: 3,
    // Least-connection (the default) counts sessions: round-robin counts
    // connections, and a tab opening as many as there are workers would
    // put every tab's session on one worker.
    command: [process.execPath, 'demo/worker.js'],
    // The harness wraps the command in /bin/sh; demo/'s own node_modules may
    // not be installed: e2e/'s has the same packages.
    extraArgs: ['--ipc', 'on'],
    env: { NODE_PATH: path.join(h.REPO_ROOT, 'e2e', 'node_modules') },
  });
  const browser = await launchBrowser();
  try {
    const text = (p, sel) => p.$eval(sel, (e) => e.textContent);
    const tabs = [];
    for (let i = 0; i < TABS; i++) {
      const page = await browser.newPage();
      await page.goto(sticky.url + '/', { waitUntil: 'load' });
      await h.waitFor('the tab shows its worker', async () => /^worker \d+$/.test(await text(page, '#worker')), { timeout: 15000 });
      tabs.push({ page, worker: await text(page, '#worker') });
    }
    const workers = new Set(tabs.map((t) => t.worker));
    assert.equal(workers.size, 3, `tabs on ${[...workers].join(', ')}`);
    // What each tab shows, its log and the workers' output: where it stopped.
    const report = async () => {
      for (const t of tabs) {
        console.log(`# ${t.worker}: online="${await text(t.page, '#online')}" chat="${await text(t.page, '#chat')}"`);
        console.log(`#   log: ${await t.page.$$eval('#log div', (ds) => ds.map((d) => d.textContent).reverse().join(' | '))}`);
      }
      console.log(`# ${sticky.stdout()}`.replace(/\n/g, '\n# '));
      console.log(`# sticky stats: ${JSON.stringify(await h.stats(sticky))}`);
    };
    try {
      for (const t of tabs) {
        await h.waitFor('the tab counts every tab', async () =>
          (await text(t.page, '#online')).startsWith(`${TABS} tab(s) connected, held by 3 worker(s)`), { timeout: 10000 });
      }
    } catch (err) {
      await report();
      throw err;
    }

    const said = `hello from tab 0 at ${Date.now()}`;
    const t0 = performance.now();
    // DOM events, not puppeteer's mouse and keyboard: those wait for a
    // frame, which a background tab does not paint.
    await tabs[0].page.$eval('#text', (e, v) => { e.value = v; }, said);
    await tabs[0].page.$eval('#say', (f) => f.requestSubmit());
    const shown = (t) => t.page.$$eval('#chat .msg', (ms, v) => ms.some((m) => m.textContent.endsWith(v)), said);
    const seen = await Promise.all(tabs.map((t) =>
      h.waitFor('the message shows', () => shown(t), { timeout: 10000 }).then(() => true, () => false)));
    const ms = performance.now() - t0;
    if (!seen.every(Boolean)) await report();
    const line = await text(tabs[3].page, '#chat .msg');
    console.log(`# demo chat: tabs on ${[...workers].sort().join(', ')}; typed in tab 0 (${tabs[0].worker}), ` +
      `shown in ${seen.filter(Boolean).length}/${TABS} tabs within ${ms.toFixed(0)} ms; tab 3 shows "${line}"`);
    assert.deepEqual(seen, tabs.map(() => true));
    assert.match(line, new RegExp(`via ${tabs[0].worker}`));
  } finally {
    await browser.close();
    await sticky.stop();
  }
});
