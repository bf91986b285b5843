'use strict';

// Issue 13's benchmark (`cargo xtask bench --fronts`): Socket.IO round
// trips through each TLS front (HAProxy, nginx, deploy/*-https) to sticky
// (`sticky run --workers 1`) and through the same front to the same app
// as one plain process (no sticky), in one run: WebSocket messages over
// an established session and long-polling messages (each a POST and the
// pending GET's answer). The two targets alternate round by round, so
// machine noise falls on both; compare the ratios.
//
//   node e2e/bench/fronts.js [--quick] [--sticky BIN] [--json FILE] [--readme README.md]
//
// Needs root (sticky), haproxy, nginx, openssl, and a built sticky
// (--sticky, else $STICKY_BIN, else target/debug/sticky; xtask passes the
// release build).

const args = process.argv.slice(2);
const flag = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
// Before the harness reads it.
if (flag('--sticky')) process.env.STICKY_BIN = flag('--sticky');

const { spawn } = require('node:child_process');
const https = require('node:https');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { startSticky, sleep, ioClient } = require('../lib/harness');
const { appFor } = require('../lib/browser');
const { startProxy, freePort, makeCertificate } = require('../lib/proxies');

const QUICK = args.includes('--quick');
const ROUNDS = QUICK ? 2 : 5;
const ROUND_MS = QUICK ? 1000 : 3000;

/** The app alone, one process on a free port (what sticky is compared with). */
async function startDirect(app) {
  const port = await freePort();
  const proc = spawn(app.command[0], app.command.slice(1), {
    cwd: path.resolve(__dirname, '..', '..'),
    env: { ...process.env, ...app.env, PORT: String(port) },
    stdio: 'ignore',
    // Its own session, as sticky's workers have (own process group): the
    // scheduler's autogroups then treat both targets alike, instead of
    // sharing this client's CPU share with the direct one only.
    detached: true,
  });
  for (let i = 0; i < 200; i++) {
    const up = await new Promise((resolve) => {
      const s = net.createConnection({ host: '127.0.0.1', port }, () => resolve(!s.destroy()));
      s.on('error', () => resolve(false));
    });
    if (up) break;
    await sleep(50);
  }
  return { port, stop: () => proc.kill('SIGTERM') };
}

/** Serial acked echoes on one session for `ms`; resolves the latencies (µs). */
async function roundTrips(url, transport, ms) {
  // Keep-alive TLS connections to the front, as a browser keeps them (the
  // front still opens one connection to its target per request).
  const agent = new https.Agent({ keepAlive: true, rejectUnauthorized: false });
  const socket = ioClient(url, { transports: [transport], agent, rejectUnauthorized: false, forceNew: true, reconnection: false });
  await new Promise((resolve, reject) => {
    socket.once('hello', resolve);
    socket.once('connect_error', reject);
  });
  const times = [];
  let errors = 0;
  for (let i = 0; i < 20; i++) await socket.emitWithAck('echo', i); // warm-up
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const t0 = process.hrtime.bigint();
    try {
      await socket.timeout(5000).emitWithAck('echo', 'x');
      times.push(Number(process.hrtime.bigint() - t0) / 1000);
    } catch {
      errors++;
    }
  }
  socket.disconnect();
  agent.destroy();
  return { times, errors };
}

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-fronts-'));
  const certs = makeCertificate(dir);
  const app = appFor('node-plain');
  const stopping = [];
  try {
    const sticky = await startSticky({ workers: 1, learn: 'on', command: app.command, env: app.env });
    stopping.push(() => sticky.stop());
    const direct = await startDirect(app);
    stopping.push(direct.stop);
    const fronts = [
      { kind: 'haproxy', file: 'haproxy-https.cfg', vars: { CERT: certs.pem } },
      { kind: 'nginx', file: 'nginx-https.conf', vars: { CERT: certs.cert, KEY: certs.key } },
    ];
    const targets = { sticky: sticky.port, direct: direct.port };
    const rows = [];
    for (const front of fronts) {
      const proxies = {};
      for (const [name, port] of Object.entries(targets)) {
        proxies[name] = await startProxy(front.kind, front.file, { upstream: `127.0.0.1:${port}`, vars: front.vars, scheme: 'https' });
        stopping.push(proxies[name].stop);
      }
      for (const transport of ['websocket', 'polling']) {
        const got = { sticky: { times: [], errors: 0 }, direct: { times: [], errors: 0 } };
        for (let r = 0; r < ROUNDS; r++) {
          // Alternate which target goes first in each round.
          const order = r % 2 ? ['direct', 'sticky'] : ['sticky', 'direct'];
          for (const name of order) {
            const { times, errors } = await roundTrips(proxies[name].url, transport, ROUND_MS);
            got[name].times.push(...times);
            got[name].errors += errors;
          }
        }
        for (const name of ['sticky', 'direct']) {
          const sorted = got[name].times.sort((a, b) => a - b);
          rows.push({
            front: front.kind,
            transport,
            target: name,
            messages: sorted.length,
            p50: pct(sorted, 50),
            p99: pct(sorted, 99),
            errors: got[name].errors,
          });
        }
        const [s, d] = rows.slice(-2);
        console.log(
          `${front.kind} ${transport}: sticky p50 ${s.p50.toFixed(0)} µs, direct ${d.p50.toFixed(0)} µs, ` +
            `p50 ratio ${(s.p50 / d.p50).toFixed(3)}, p99 ratio ${(s.p99 / d.p99).toFixed(3)} (${s.messages}/${d.messages} messages)`,
        );
      }
    }
    report(rows);
  } finally {
    for (const stop of stopping.reverse()) await stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function report(rows) {
  const json = flag('--json');
  if (json) fs.writeFileSync(json, JSON.stringify({ rounds: ROUNDS, roundMs: ROUND_MS, rows }, null, 2));
  const readme = flag('--readme');
  if (!readme) return;
  const lines = [
    `Measured by \`cargo xtask bench --fronts${QUICK ? ' --quick' : ''}\` on ${os.cpus().length} CPUs, Linux ${os.release()}: ` +
      `${ROUNDS} rounds of ${ROUND_MS / 1000} s per target, alternating; one socket.io-client session at a time sending ` +
      'acknowledged echoes back to back through the front over TLS (keep-alive client connections); sticky runs 1 worker, the direct target is the same app as one process.',
    '',
    '| front | transport | target | messages | p50 (µs) | p99 (µs) | errors |',
    '|---|---|---|---:|---:|---:|---:|',
    ...rows.map((r) => `| ${r.front} | ${r.transport} | ${r.target} | ${r.messages} | ${r.p50.toFixed(0)} | ${r.p99.toFixed(0)} | ${r.errors} |`),
    '',
    '| front | transport | p50 sticky/direct | p99 sticky/direct |',
    '|---|---|---:|---:|',
  ];
  for (let i = 0; i < rows.length; i += 2) {
    const [s, d] = [rows[i], rows[i + 1]];
    lines.push(`| ${s.front} | ${s.transport} | ${(s.p50 / d.p50).toFixed(3)} | ${(s.p99 / d.p99).toFixed(3)} |`);
  }
  const begin = '<!-- bench-fronts:begin -->';
  const end = '<!-- bench-fronts:end -->';
  const text = fs.readFileSync(readme, 'utf8');
  const a = text.indexOf(begin);
  const b = text.indexOf(end);
  if (a < 0 || b < a) throw new Error(`${readme} has no ${begin} ... ${end} markers`);
  fs.writeFileSync(readme, `${text.slice(0, a + begin.length)}\n\n${lines.join('\n')}\n\n${text.slice(b)}`);
}

main().catch((err) => {
  console.error(`bench fronts: ${err.message}`);
  process.exit(1);
});
