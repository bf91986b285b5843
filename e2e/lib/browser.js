'use strict';

// Headless Chromium (Debian's /usr/bin/chromium) driven by puppeteer-core,
// for the browser tests: one browser, several tabs sharing its connection
// pool (what a real browser does), every Engine.IO answer watched.

const fs = require('node:fs');
const path = require('node:path');
const { before, after } = require('node:test');
const puppeteer = require('puppeteer-core');
const { REPO_ROOT, STICKY_BIN, startSticky } = require('./harness');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** Why the browser tests cannot run here, or false. */
function browserMissing() {
  if (!fs.existsSync(CHROMIUM)) return `${CHROMIUM} is missing (apt-get install chromium, or set CHROMIUM)`;
  return false;
}

/** One headless Chromium. `extraArgs` e.g. --ignore-certificate-errors. */
function launchBrowser(extraArgs = []) {
  return puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    protocolTimeout: 30000,
    args: [
      '--no-sandbox', // the tests run as root
      '--disable-gpu',
      '--disable-dev-shm-usage',
      // Background tabs keep their timers: every tab runs at once.
      '--disable-background-timer-throttling',
      '--disable-renderer-backgrounding',
      '--disable-backgrounding-occluded-windows',
      ...extraArgs,
    ],
  });
}

// ---------------------------------------------------------------- the test app

const PYTHON = process.env.PYTHON || 'python3';
const PAGE_DIR = path.join(REPO_ROOT, 'e2e', 'browser-app');
const CLIENT_JS = path.join(REPO_ROOT, 'e2e', 'node_modules', 'socket.io-client', 'dist', 'socket.io.min.js');
const RUST_APP = path.resolve(
  REPO_ROOT,
  process.env.BROWSER_RUST_APP || path.join(path.dirname(STICKY_BIN), 'sticky-browser-app-worker'),
);

/** The app's worker command for each kind, or why it is skipped. */
function appFor(kind) {
  const [lang, mode] = kind.split('-'); // node-plain, python-integration, ...
  const env = { APP_STICKY: mode, APP_PAGE_DIR: PAGE_DIR, APP_CLIENT_JS: CLIENT_JS };
  if (lang === 'node') return { env, command: [process.execPath, 'e2e/workers/browser-app-node.js'] };
  if (lang === 'python') {
    const probe = require('node:child_process').spawnSync(PYTHON, ['-c', 'import socketio'], { encoding: 'utf8' });
    if (probe.status !== 0) return { skip: `${PYTHON} cannot import socketio (pip install -r e2e/requirements.txt)` };
    return { env, command: [PYTHON, 'e2e/workers/browser_app_python.py'] };
  }
  if (!fs.existsSync(RUST_APP)) return { skip: `${path.relative(REPO_ROOT, RUST_APP)} is missing (cargo build --workspace)` };
  return { env, command: [RUST_APP] };
}

/**
 * Inside a describe: `workers` workers of `app` (appFor's) under sticky
 * (--learn on), started before its tests and stopped after them. Returns
 * the holder whose `sticky` the tests use.
 */
function appSticky(app, workers) {
  const holder = { sticky: undefined };
  before(async () => {
    holder.sticky = await startSticky({ workers, learn: 'on', command: app.command, env: app.env });
  });
  after(async () => {
    await holder.sticky?.stop();
  });
  return holder;
}

/** The browser scenarios of issue 11: tabs of one browser, transports. */
const SCENARIOS = [
  { name: 'default transports, 8 tabs', tabs: 8 },
  { name: 'long-polling only, 3 tabs', tabs: 3, transports: ['polling'] },
  { name: 'WebSocket only, 4 tabs', tabs: 4, transports: ['websocket'] },
];

// ---------------------------------------------------------------- tabs

const isEngineIo = (url) => url.includes('/socket.io/');

/**
 * Opens `tabs` tabs of one browser on `url` (query: transports, echoes,
 * tab) at once and waits until every tab's page script is done or
 * `timeoutMs` passed. Resolves the figures: per tab its window.__result,
 * and for the whole run the Engine.IO answers >= 400, failed Engine.IO
 * requests and WebSocket handshakes that did not switch protocols.
 */
async function runTabs(browser, url, { tabs, transports, echoes = 20, timeoutMs = 30000, page = '/' }) {
  const figures = { tabs: [], badAnswers: [], failedRequests: [], badWebSockets: [], engineRequests: 0 };
  const pages = [];
  let finished = false;
  try {
    for (let t = 0; t < tabs; t++) {
      const p = await browser.newPage();
      pages.push(p);
      p.on('response', (res) => {
        if (!isEngineIo(res.url())) return;
        figures.engineRequests++;
        if (res.status() >= 400) figures.badAnswers.push(`tab ${t}: ${res.status()} ${res.request().method()} ${res.url()}`);
      });
      p.on('requestfailed', (req) => {
        if (finished || !isEngineIo(req.url())) return;
        figures.failedRequests.push(`tab ${t}: ${req.method()} ${req.url()}: ${req.failure()?.errorText}`);
      });
      // WebSocket handshakes are not puppeteer responses: ask CDP.
      const cdp = await p.createCDPSession();
      await cdp.send('Network.enable');
      cdp.on('Network.webSocketHandshakeResponseReceived', (e) => {
        figures.engineRequests++;
        // 101 over HTTP/1.1; 200 over HTTP/2 (RFC 8441's extended CONNECT).
        if (e.response.status !== 101 && e.response.status !== 200) {
          figures.badWebSockets.push(`tab ${t}: ${e.response.status}`);
        }
      });
      cdp.on('Network.webSocketFrameError', (e) => {
        if (!finished) figures.badWebSockets.push(`tab ${t}: frame error ${e.errorMessage}`);
      });
    }
    const query = (t) => {
      const q = new URLSearchParams({ tab: String(t), echoes: String(echoes) });
      if (transports) q.set('transports', transports.join(','));
      return `${url}${page}?${q}`;
    };
    await Promise.all(pages.map((p, t) => p.goto(query(t), { waitUntil: 'load', timeout: 20000 })));
    const deadline = Date.now() + timeoutMs;
    await Promise.all(
      pages.map(async (p) => {
        for (;;) {
          const done = await p.evaluate(() => window.__result && window.__result.done).catch(() => false);
          if (done || Date.now() > deadline) return;
          await new Promise((r) => setTimeout(r, 200));
        }
      }),
    );
    for (const p of pages) figures.tabs.push(await p.evaluate(() => window.__result).catch((e) => ({ error: e.message })));
  } finally {
    finished = true;
    await Promise.all(pages.map((p) => p.close().catch(() => {})));
  }
  return figures;
}

/** The totals a test prints and asserts on. */
function summarize(figures, echoesPerTab) {
  const sum = (f) => figures.tabs.reduce((n, t) => n + f(t), 0);
  return {
    tabs: figures.tabs.length,
    done: sum((t) => (t.done ? 1 : 0)),
    echoes: sum((t) => t.echoes || 0),
    expected: figures.tabs.length * echoesPerTab,
    api: sum((t) => t.api || 0),
    http4xx5xx: figures.badAnswers.length,
    failedRequests: figures.failedRequests.length,
    badWebSockets: figures.badWebSockets.length,
    disconnects: sum((t) => (t.disconnects || []).length),
    connectErrors: sum((t) => (t.connectErrors || []).length),
    wrongWorker: sum((t) => (t.wrongWorker || []).length),
    echoFailures: sum((t) => (t.echoFailures || []).length),
    apiErrors: sum((t) => (t.apiErrors || []).length),
    sessions: sum((t) => (t.sessions || []).length),
    engineRequests: figures.engineRequests,
  };
}

/** Up to `n` sample lines of what went wrong, for an assertion message. */
function samples(figures, n = 6) {
  const lines = [
    ...figures.badAnswers,
    ...figures.failedRequests,
    ...figures.badWebSockets,
    ...figures.tabs.flatMap((t) => [
      ...(t.disconnects || []).map((r) => `tab ${t.tab}: disconnect (${r})`),
      ...(t.echoFailures || []).map((r) => `tab ${t.tab}: ${r}`),
      ...(t.wrongWorker || []).map((w) => `tab ${t.tab}: ack from ${w.got}, session's worker ${w.expected}`),
      ...(t.apiErrors || []).map((r) => `tab ${t.tab}: ${r}`),
      ...(t.error ? [`tab: ${t.error}`] : []),
    ]),
  ];
  return lines.slice(0, n).join('\n  ');
}

/** Asserts the browser figures are clean: every echo, nothing else. */
function isClean(s) {
  return (
    s.done === s.tabs &&
    s.echoes === s.expected &&
    s.api === s.expected &&
    s.http4xx5xx === 0 &&
    s.failedRequests === 0 &&
    s.badWebSockets === 0 &&
    s.disconnects === 0 &&
    s.connectErrors === 0 &&
    s.wrongWorker === 0 &&
    s.sessions === s.tabs
  );
}

function assertClean(assert, figures, echoesPerTab) {
  const s = summarize(figures, echoesPerTab);
  assert.ok(isClean(s), `not clean: ${JSON.stringify(s)}\n  ${samples(figures)}`);
  return s;
}

/**
 * runTabs, and once more if that run was not clean, printing what the
 * first run saw (`# [not clean, rerun]`). Unmodified workers under default
 * transports show, about once in a few dozen scenario runs, one 400 and a
 * disconnect around the WebSocket upgrade (README: Deploying, known
 * problems); the rerun keeps that rare case from hiding every other
 * result, and a failure that repeats still fails.
 */
async function runTabsRerunOnce(browser, url, options, label) {
  const figures = await runTabs(browser, url, options);
  const s = summarize(figures, options.echoes);
  if (isClean(s)) return figures;
  console.log(`# [not clean, rerun] ${label}: ${JSON.stringify(s)}\n#   ${samples(figures).replace(/\n/g, '\n#   ')}`);
  return runTabs(browser, url, options);
}

module.exports = { CHROMIUM, SCENARIOS, appFor, appSticky, browserMissing, launchBrowser, runTabs, runTabsRerunOnce, summarize, assertClean, samples };
