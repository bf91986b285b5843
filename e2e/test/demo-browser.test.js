'use strict';

// Issue 11: the demo page (`cargo xtask run`, demo/) in 4 Chromium tabs of
// one browser, 3 sticky workers (E2E_BROWSER_WORKERS): each tab connected, its "20 echoes"
// button answered entirely by its own session's worker, no disconnect and
// no red (bad) line in the page's log.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { REPO_ROOT, startSticky, waitFor } = require('../lib/harness');
const { browserMissing, launchBrowser } = require('../lib/browser');

const TABS = 4;
const WORKERS = Number(process.env.E2E_BROWSER_WORKERS || 3);
const demoMissing = fs.existsSync(path.join(REPO_ROOT, 'demo', 'node_modules', 'socket.io'))
  ? false
  : 'demo/node_modules is missing (cd demo && npm ci)';

describe(`the demo page in 4 Chromium tabs, ${WORKERS} workers`, { skip: browserMissing() || demoMissing }, () => {
  let browser;
  let sticky;
  before(async () => {
    browser = await launchBrowser();
    sticky = await startSticky({ workers: WORKERS, learn: 'on', command: [process.execPath, 'demo/worker.js'] });
  });
  after(async () => {
    await browser?.close();
    await sticky?.stop();
  });

  test('every tab connected, its echoes answered by its own worker', async () => {
    const pages = [];
    try {
      for (let t = 0; t < TABS; t++) pages.push(await browser.newPage());
      await Promise.all(pages.map((p) => p.goto(`${sticky.url}/`, { waitUntil: 'load' })));
      const text = (p, id) => p.$eval(`#${id}`, (e) => e.textContent);
      for (const p of pages) {
        await waitFor('the tab connected', async () => (await text(p, 'state')) === 'connected', { timeout: 15000 });
      }
      // A DOM click: puppeteer's mouse click waits for a frame, which a
      // background tab does not paint.
      await Promise.all(pages.map((p) => p.$eval('#burst', (b) => b.click())));
      const rows = await Promise.all(
        pages.map(async (p) => {
          await waitFor('20 echoes sent', async () => /^20 sent/.test(await text(p, 'echoes')), { timeout: 60000 }).catch(() => {});
          return {
            worker: await text(p, 'worker'),
            transport: await text(p, 'transport'),
            state: await text(p, 'state'),
            echoes: await text(p, 'echoes'),
            bad: await p.$$eval('#log .bad', (lines) => lines.map((l) => l.textContent)),
          };
        }),
      );
      const workers = new Set(rows.map((r) => r.worker));
      console.log(
        `# [demo page, ${TABS} tabs, ${WORKERS} workers] ${rows.map((r) => `${r.worker} over ${r.transport}: ${r.echoes}, ${r.bad.length} bad`).join('; ')} (${workers.size} distinct workers)`,
      );
      for (const r of rows) {
        assert.equal(r.state, 'connected', `a tab ended ${r.state}: ${r.bad.join(' | ')}`);
        assert.equal(r.echoes, "20 sent, 20 answered by this session's worker", r.bad.join(' | '));
        assert.deepEqual(r.bad, []);
      }
    } finally {
      await Promise.all(pages.map((p) => p.close().catch(() => {})));
    }
  });
});
