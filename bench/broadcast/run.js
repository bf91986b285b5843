'use strict';

// Broadcast fan-out benchmark (`cargo xtask bench --broadcast`): one worker
// emitting to C clients spread over 3 workers, for
//
//   sticky-relay   sticky run, @socket.io/cluster-adapter relayed by sticky
//                  over Node IPC
//   sticky-socket  sticky run, @sticky/socket.io's createRelayAdapter (the
//                  same adapter messages over sticky's relay socket)
//   seed           @socket.io/sticky 1.0.4 + @socket.io/cluster-adapter on
//                  Node's cluster (its primary relays)
//   sticky-redis   sticky run, @socket.io/redis-adapter on a local redis-server
//   no-relay       the ceiling: sticky run, no adapter, and one client on each
//                  worker asks for its own worker's share of the blast at
//                  once, so every client gets the same messages with nothing
//                  crossing between workers: what the workers' writes and
//                  the clients' reads allow any adapter
//
// in one run, alternating: each round runs every variant once, for two
// workloads:
//
//   fan-out      C clients (default 1,000), M messages: the case;
//                the workers' own writes to their clients dominate
//   relay-bound  3 clients, one per worker (connected one at a time until
//                each worker has one), 25 x M messages: what crosses between
//                workers dominates
//
// A run: the clients connect over WebSocket (placed by each variant's
// balancing), one client asks its worker to io.emit the messages back to
// back (64-byte padding); every client records, for each message, now -
// the emit's timestamp. Figures: messages delivered per second (client
// deliveries / time from the blast to the last delivery) and the p50/p99
// delivery latency (mostly queueing: the whole blast is emitted at once).
//
//   node run.js [--clients 1000] [--messages 400] [--size 64] [--rounds 3]
//               [--quick] [--json PATH]
// Needs STICKY_BIN (default target/release/sticky), root (sticky loads BPF
// programs), redis-server.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { io: connect } = require('socket.io-client');

const ROOT = path.resolve(__dirname, '..', '..');
const STICKY_BIN = path.resolve(ROOT, process.env.STICKY_BIN || 'target/release/sticky');
const SERVER = path.join(__dirname, 'server.js');
const WORKERS = 3;
const now = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function options() {
  const o = { clients: 1000, messages: 400, size: 64, rounds: 3, json: null };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--quick') Object.assign(o, { clients: 300, messages: 100, rounds: 1 });
    else if (a === '--json') o.json = argv[++i];
    else if (['--clients', '--messages', '--size', '--rounds'].includes(a)) o[a.slice(2)] = Number(argv[++i]);
    else throw new Error(`unknown argument ${a}`);
  }
  return o;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Spawns a process; resolves once `count` lines match `ready`. */
function start(cmd, args, env, readyRe, count = 1) {
  const proc = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${cmd} not ready in 20 s:\n${out}`)), 20000);
    const onData = (d) => {
      out += d;
      if ((out.match(readyRe) || []).length >= count) {
        clearTimeout(timer);
        resolve();
      }
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${cmd} exited (${code}):\n${out}`));
    });
  });
  const stop = () =>
    new Promise((resolve) => {
      if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
      const kill = setTimeout(() => proc.kill('SIGKILL'), 5000);
      proc.once('exit', () => (clearTimeout(kill), resolve()));
      proc.kill('SIGTERM');
    });
  return ready.then(() => ({ proc, stop, output: () => out }));
}

async function startVariant(name, redisUrl) {
  const port = await freePort();
  if (name === 'seed') {
    const server = await start(process.execPath, [SERVER, 'seed', String(WORKERS), String(port)], {}, /^ready /m);
    return { ...server, port };
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-bcast-'));
  const args = ['run', '--listen', `127.0.0.1:${port}`, '--workers', String(WORKERS), '--balance', 'round-robin',
    '--control', path.join(dir, 'control.sock'), '--grace', '2s', '--', process.execPath, SERVER, 'worker'];
  const env = {
    'sticky-redis': { ADAPTER: 'redis', REDIS_URL: redisUrl },
    'sticky-socket': { ADAPTER: 'relay' },
    'no-relay': { ADAPTER: 'none' },
  }[name] ?? { ADAPTER: 'cluster' };
  const server = await start(STICKY_BIN, args, env, /^ready /gm, WORKERS);
  const stop = server.stop;
  return { ...server, port, stop: () => stop().then(() => fs.rmSync(dir, { recursive: true, force: true })) };
}

/** One client on each worker: connected one at a time, duplicates closed. */
async function onePerWorker(port) {
  const kept = new Map();
  for (let attempt = 0; kept.size < WORKERS && attempt < 60; attempt++) {
    const [c] = await connectClients(port, 1);
    if (kept.has(c.worker)) c.socket.disconnect();
    else kept.set(c.worker, c);
  }
  if (kept.size < WORKERS) throw new Error(`clients reached only workers ${[...kept.keys()]}`);
  return [...kept.values()];
}

async function connectClients(port, n) {
  const clients = [];
  for (let i = 0; i < n; i += 50) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + 50); j++) {
      batch.push(new Promise((resolve, reject) => {
        const socket = connect(`http://127.0.0.1:${port}`, { transports: ['websocket'], forceNew: true, reconnection: false, timeout: 10000 });
        const timer = setTimeout(() => reject(new Error(`client ${j}: no hello within 15 s`)), 15000);
        socket.once('hello', (h) => (clearTimeout(timer), resolve({ socket, worker: h.worker })));
        socket.once('connect_error', (err) => (clearTimeout(timer), reject(err)));
      }));
    }
    clients.push(...(await Promise.all(batch)));
  }
  return clients;
}

/**
 * One blast of `messages`; resolves with its figures. `local`: no adapter,
 * so the first client of each worker asks its own worker at once.
 */
async function blast(clients, messages, size, local = false) {
  const total = clients.length * messages;
  const latencies = new Float64Array(total);
  let got = 0;
  let last = 0;
  let done;
  const all = new Promise((r) => (done = r));
  const onTick = (m) => {
    const t = now();
    latencies[got++] = t - m.t;
    last = t;
    if (got === total) done();
  };
  for (const c of clients) c.socket.on('tick', onTick);
  const senders = local ? [...new Map(clients.map((c) => [c.worker, c])).values()] : [clients[0]];
  const t0 = now();
  await Promise.all(senders.map((s) => s.socket.timeout(60000).emitWithAck('blast', { count: messages, size })));
  await Promise.race([all, sleep(30000)]);
  for (const c of clients) c.socket.off('tick', onTick);
  const sorted = latencies.subarray(0, got).sort();
  const q = (p) => (got ? sorted[Math.min(got - 1, Math.floor(p * got))] : NaN);
  const seconds = (last - t0) / 1000;
  return { delivered: got, expected: total, seconds, rate: got / seconds, p50: q(0.5), p99: q(0.99), max: got ? sorted[got - 1] : NaN };
}

async function startRedis() {
  const port = await freePort();
  const server = await start('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {}, /Ready to accept connections/);
  return { ...server, url: `redis://127.0.0.1:${port}` };
}

async function main() {
  const o = options();
  const redis = await startRedis();
  const variants = ['sticky-relay', 'sticky-socket', 'seed', 'sticky-redis', 'no-relay'];
  const workloads = [
    { workload: 'fan-out', clients: o.clients, messages: o.messages },
    { workload: 'relay-bound', clients: WORKERS, messages: o.messages * 25 },
  ];
  const runs = [];
  try {
    for (let round = 1; round <= o.rounds; round++) {
      for (const w of workloads) for (const name of variants) {
        const server = await startVariant(name, redis.url);
        let clients = [];
        try {
          clients = w.workload === 'relay-bound' ? await onePerWorker(server.port) : await connectClients(server.port, w.clients);
          const spread = {};
          for (const c of clients) spread[c.worker] = (spread[c.worker] || 0) + 1;
          const local = name === 'no-relay';
          await blast(clients, 20, o.size, local); // warm-up
          const r = await blast(clients, w.messages, o.size, local);
          runs.push({ workload: w.workload, variant: name, round, spread, ...r });
          console.log(`${w.workload.padEnd(11)} ${name.padEnd(12)} round ${round}: ${r.delivered}/${r.expected} delivered in ${r.seconds.toFixed(2)} s, ` +
            `${Math.round(r.rate)} msg/s, p50 ${r.p50.toFixed(1)} ms, p99 ${r.p99.toFixed(1)} ms (clients per worker ${JSON.stringify(spread)})`);
        } finally {
          for (const c of clients) c.socket.disconnect();
          await server.stop();
        }
      }
    }
  } finally {
    await redis.stop();
  }
  // Each variant's median round (rounds of one variant differ with the
  // shared machine's load), against the seed and against the ceiling.
  const median = (workload, name) => {
    const rs = runs.filter((r) => r.workload === workload && r.variant === name).sort((a, b) => a.rate - b.rate);
    return rs[Math.floor((rs.length - 1) / 2)];
  };
  console.log(`\n| workload | variant | delivered | msg/s (median round) | vs seed | vs no-relay | p50 (ms) | p99 (ms) |\n|---|---|---:|---:|---:|---:|---:|---:|`);
  for (const w of workloads) {
    const seed = median(w.workload, 'seed');
    const ceiling = median(w.workload, 'no-relay');
    for (const name of variants) {
      const r = median(w.workload, name);
      console.log(`| ${w.workload} (${w.clients} clients, ${w.messages} messages) | ${name} | ${r.delivered}/${r.expected} | ` +
        `${Math.round(r.rate)} | ${(r.rate / seed.rate).toFixed(2)} | ${(r.rate / ceiling.rate).toFixed(2)} | ${r.p50.toFixed(1)} | ${r.p99.toFixed(1)} |`);
    }
  }
  if (o.json) {
    fs.writeFileSync(o.json, JSON.stringify({ options: o, cpus: os.cpus().length, kernel: os.release(), runs }, null, 2) + '\n');
  }
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
