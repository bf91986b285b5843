'use strict';

// Issue 13: HTTPS. HAProxy and nginx terminate TLS in front of sticky on the
// same host (deploy/haproxy-https.cfg, deploy/nginx-https.conf: HTTP/2 to
// the browser, one server-side connection per request), certificates made
// here with openssl, Chromium with --ignore-certificate-errors. For each
// worker kind (unmodified Node, Python, Rust apps and the integrations), 3
// workers: 8 tabs default transports, 3 long-polling only, 4 WebSocket
// only. Zero 4xx/5xx, zero disconnects, every ack from the session's
// worker, and the workers see the client's address in X-Forwarded-For.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { browserMissing, launchBrowser, runTabsRerunOnce, summarize, assertClean, appFor, appSticky, SCENARIOS } = require('../lib/browser');
const { proxyMissing, startProxy, testCertificate } = require('../lib/proxies');

const ECHOES = Number(process.env.E2E_BROWSER_ECHOES || 20);
const KINDS = (process.env.E2E_HTTPS_KINDS || 'node-plain,python-plain,rust-plain,node-integration,python-integration,rust-integration').split(',');
const FRONTS = [
  { kind: 'haproxy', file: 'haproxy-https.cfg', vars: (c) => ({ CERT: c.pem }) },
  { kind: 'nginx', file: 'nginx-https.conf', vars: (c) => ({ CERT: c.cert, KEY: c.key }) },
];

describe('Chromium over HTTPS through a TLS front to 3 sticky workers', { skip: browserMissing() }, () => {
  const tls = testCertificate();
  let browser;
  before(async () => {
    browser = await launchBrowser(['--ignore-certificate-errors']);
  });
  after(async () => {
    await browser?.close();
  });

  for (const kind of KINDS) {
    const app = appFor(kind);
    describe(kind, { skip: app.skip }, () => {
      const cluster = appSticky(app, 3);
      for (const front of FRONTS) {
        describe(`${front.kind} (deploy/${front.file})`, { skip: proxyMissing(front.kind) }, () => {
          let proxy;
          before(async () => {
            proxy = await startProxy(front.kind, front.file, {
              upstream: `127.0.0.1:${cluster.sticky.port}`,
              vars: front.vars(tls.certs),
              scheme: 'https',
            });
          });
          after(async () => {
            await proxy?.stop();
          });
          for (const scenario of SCENARIOS) {
            test(scenario.name, async () => {
              const started = Date.now();
              const figures = await runTabsRerunOnce(browser, proxy.url, { ...scenario, echoes: ECHOES }, `${front.kind} ${kind}, ${scenario.name}`);
              const s = summarize(figures, ECHOES);
              const forwarded = [...new Set(figures.tabs.map((t) => t.forwardedFor))];
              console.log(
                `# [https ${front.kind} ${kind}, ${scenario.name}] echoes ${s.echoes}/${s.expected}, api ${s.api}, ` +
                  `4xx/5xx ${s.http4xx5xx}, failed requests ${s.failedRequests}, bad websockets ${s.badWebSockets}, ` +
                  `disconnects ${s.disconnects}, wrong worker ${s.wrongWorker}, sessions ${s.sessions}, ` +
                  `X-Forwarded-For ${JSON.stringify(forwarded)}, ${Date.now() - started} ms`,
              );
              assertClean(assert, figures, ECHOES);
              assert.deepEqual(forwarded, ['127.0.0.1'], 'the workers see the browser address in X-Forwarded-For');
            });
          }
        });
      }
    });
  }
});
