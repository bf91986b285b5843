'use strict';

// Issue 11: real browsers. Headless Chromium tabs share one connection pool
// per origin, and reuse any idle keep-alive connection (one that served the
// page, a script, an API call, another tab's poll) for any session's next
// request. The app's workers serve their own page, script, stylesheet and
// JSON API with their servers' keep-alive defaults; 3 workers under
// `sticky run` (default --learn on). For each worker kind (unmodified Node,
// Python and Rust apps, and the same apps with the integrations): 8 tabs
// with default transports, 3 long-polling only (Chromium opens at most 6
// connections per host), 4 WebSocket only; every tab sends acknowledged
// echoes and calls the API between them. Zero 4xx/5xx Engine.IO answers,
// zero disconnects, every ack from the session's own worker.
//
// E2E_BROWSER_WORKERS (default 3) sets the worker count (1: the control).

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { retryCounters } = require('../lib/harness');
const { browserMissing, launchBrowser, runTabsRerunOnce, summarize, assertClean, appFor, appSticky, SCENARIOS } = require('../lib/browser');

const WORKERS = Number(process.env.E2E_BROWSER_WORKERS || 3);
const ECHOES = Number(process.env.E2E_BROWSER_ECHOES || 20);
const KINDS = (process.env.E2E_BROWSER_KINDS || 'node-plain,python-plain,rust-plain,node-integration,python-integration,rust-integration').split(',');

const missing = browserMissing();
describe(`Chromium tabs against ${WORKERS} sticky workers`, { skip: missing }, () => {
  let browser;
  before(async () => {
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
  });

  for (const kind of KINDS) {
    const app = appFor(kind);
    describe(kind, { skip: app.skip }, () => {
      const cluster = appSticky(app, WORKERS);
      for (const scenario of SCENARIOS) {
        test(scenario.name, async () => {
          const { sticky } = cluster;
          const started = Date.now();
          const figures = await runTabsRerunOnce(browser, sticky.url, { ...scenario, echoes: ECHOES }, `${kind}, ${scenario.name}`);
          const s = summarize(figures, ECHOES);
          const counters = await retryCounters(sticky);
          console.log(
            `# [browser ${kind} x${WORKERS}, ${scenario.name}] echoes ${s.echoes}/${s.expected}, api ${s.api}, ` +
              `4xx/5xx ${s.http4xx5xx}, failed requests ${s.failedRequests}, bad websockets ${s.badWebSockets}, ` +
              `disconnects ${s.disconnects}, connect errors ${s.connectErrors}, wrong worker ${s.wrongWorker}, ` +
              `sessions ${s.sessions}, engine.io requests ${s.engineRequests}, ` +
              `sticky retry counters ${JSON.stringify(counters)}, ${Date.now() - started} ms`,
          );
          assertClean(assert, figures, ECHOES);
        });
      }
    });
  }
});
