'use strict';

// Shared helpers of the e2e tests: start and stop `sticky run`, talk to its
// control socket, drive socket.io-client, speak raw HTTP/1.1.

const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { io: ioClient } = require('socket.io-client');

const REPO_ROOT = path.resolve(__dirname, '..', '..');
const STICKY_BIN = path.resolve(REPO_ROOT, process.env.STICKY_BIN || 'target/debug/sticky');
const PYTHON = process.env.PYTHON || 'python3';
const BALANCES = ['least-connection', 'round-robin', 'random'];
// sticky's session learning (--learn): off by default here, so that what
// routes the sessions is the workers' own registration (the integrations
// under test). test/learning.test.js covers learning.
const LEARN = process.env.E2E_LEARN || 'off';

// ---------------------------------------------------------------- workers

/**
 * The worker command of each language, or a reason to skip it. `node`,
 * `python`, `rust`: the integrations' workers (they register their
 * sessions); `plain-node`, `plain-python`, `plain-rust`: workers with no
 * sticky code at all, only listening on fd 3 (session learning).
 * @returns {{name: string, command: string[] | null, skip: string | false}}
 */
function workerFor(lang) {
  const found = (command) => ({ name: lang, command, skip: false });
  const skipped = (why) => ({ name: lang, command: null, skip: why });
  if (lang === 'node') return found([process.execPath, 'e2e/workers/node-worker.js']);
  if (lang === 'plain-node') return found([process.execPath, 'e2e/workers/plain-node-worker.js']);
  if (lang === 'python' || lang === 'plain-python') {
    const script = `e2e/workers/${lang === 'python' ? 'python_worker.py' : 'plain_python_worker.py'}`;
    const probe = spawnSync(PYTHON, ['-c', 'import socketio'], { encoding: 'utf8' });
    if (probe.status !== 0) {
      const why = probe.error ? probe.error.message : (probe.stderr || '').trim().split('\n').pop();
      return skipped(`${PYTHON} -c "import socketio" failed (${why}); pip install -r e2e/requirements.txt`);
    }
    return found([PYTHON, script]);
  }
  if (lang === 'rust' || lang === 'plain-rust') {
    const name = lang === 'rust' ? 'sticky-socketioxide-worker' : 'sticky-plain-socketioxide-worker';
    const fromEnv = lang === 'rust' ? process.env.RUST_WORKER : process.env.PLAIN_RUST_WORKER;
    const bin = path.resolve(REPO_ROOT, fromEnv || path.join(path.dirname(STICKY_BIN), name));
    if (!fs.existsSync(bin)) {
      return skipped(`${path.relative(REPO_ROOT, bin)} is missing (cargo build --workspace)`);
    }
    return found([bin]);
  }
  throw new Error(`unknown worker language ${lang}`);
}

// ---------------------------------------------------------------- sticky

const running = new Set();

// Whatever happens to the test process, its stickies are told to stop:
// SIGTERM (sticky then stops its workers, SIGKILL after --grace 2s). A
// SIGKILLed sticky would leave its workers running.
function terminateAll() {
  for (const s of running) {
    try {
      s.proc.kill('SIGTERM');
    } catch {}
    fs.rmSync(s.dir, { recursive: true, force: true });
  }
}
process.on('exit', terminateAll);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    terminateAll();
    process.exit(128 + (signal === 'SIGINT' ? 2 : signal === 'SIGTERM' ? 15 : 1));
  });
}

/**
 * Starts `sticky run --listen 127.0.0.1:0` and resolves once it logged its
 * address. The returned handle's stop() must be called (after hooks).
 */
async function startSticky({
  workers = 3,
  balance = 'least-connection',
  learn = LEARN,
  command,
  env = {},
  extraArgs = [],
  // A fixed port and control path: taking over a killed sticky's workers.
  listen = '127.0.0.1:0',
  controlPath = null,
  netns, // run inside this network namespace (a name of `ip netns`)
}) {
  if (!fs.existsSync(STICKY_BIN)) {
    throw new Error(`${STICKY_BIN} is missing: run cargo build --workspace (or set STICKY_BIN)`);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-e2e-'));
  const control = controlPath ?? path.join(dir, 'control.sock');
  const args = [
    'run',
    '--listen', listen,
    '--workers', String(workers),
    '--balance', balance,
    '--control', control,
    '--grace', '2s',
    '--learn', learn,
    ...extraArgs,
    // Workers' stderr goes to sticky's stdout: sticky writes a log line in
    // several write(2) calls (eprintln! on unbuffered stderr), so a worker
    // writing to the same stderr can split the "listening on" line. `exec`
    // keeps the worker's pid (LISTEN_PID).
    '--', '/bin/sh', '-c', 'exec "$0" "$@" 2>&1', ...command,
  ];
  // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup2
  // file system session learning needs.
  const [program, argv] = netns ? ['nsenter', [`--net=/run/netns/${netns}`, STICKY_BIN, ...args]] : [STICKY_BIN, args];
  const proc = spawn(program, argv, {
    cwd: REPO_ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let stdout = '';
  const handle = {
    proc,
    control,
    dir,
    port: 0,
    url: '',
    balance,
    stderr: () => stderr,
    stdout: () => stdout,
    exited: new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal }))),
    stop: () => stopSticky(handle),
  };
  running.add(handle);
  proc.stdout.setEncoding('utf8');
  proc.stdout.on('data', (d) => (stdout += d));
  proc.stderr.setEncoding('utf8');
  const listening = new Promise((resolve, reject) => {
    // Loading and verifying the programs takes about 1 s; much longer on a
    // machine busy with other builds.
    const timer = setTimeout(
      () => reject(new Error(`sticky did not log its address within 30 s:\n${stderr}\n${stdout}`)),
      30000,
    );
    proc.stderr.on('data', (d) => {
      stderr += d;
      const m = /sticky: listening on ([\d.]+):(\d+) with/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        handle.host = m[1];
        resolve(Number(m[2]));
      }
    });
    proc.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`sticky exited (${code ?? signal}) before listening:\n${stderr}`));
    });
    proc.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
  try {
    handle.port = await listening;
  } catch (err) {
    await stopSticky(handle);
    throw err;
  }
  handle.url = `http://${handle.host}:${handle.port}`;
  return handle;
}

/**
 * SIGTERM, then SIGKILL after 5 s; resolves once sticky has exited. Worker
 * processes still alive after that (only if sticky itself had to be
 * SIGKILLed) are killed by pid.
 */
async function stopSticky(handle) {
  if (!handle || !running.has(handle)) return;
  running.delete(handle);
  const { proc } = handle;
  if (proc.exitCode === null && proc.signalCode === null) {
    const workerPids = await stats(handle)
      .then((st) =>
        Object.entries(st)
          .filter(([k, v]) => /^worker\d+(_generation\d+)?$/.test(k) && typeof v === 'string')
          .map(([, v]) => Number((/pid:(\d+)/.exec(v) || [])[1]))
          .filter(Boolean),
      )
      .catch(() => []);
    proc.kill('SIGTERM');
    let killed = false;
    const timer = setTimeout(() => {
      killed = true;
      proc.kill('SIGKILL');
    }, 5000);
    await handle.exited;
    clearTimeout(timer);
    if (killed) {
      for (const pid of workerPids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {}
      }
    }
  }
  fs.rmSync(handle.dir, { recursive: true, force: true });
}

/** One request line on a fresh control connection; resolves with the answer line. */
function controlRequest(socketPath, line, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const conn = net.createConnection(socketPath);
    let buf = '';
    const timer = setTimeout(() => {
      conn.destroy();
      reject(new Error(`control: no answer to ${line} within ${timeoutMs} ms`));
    }, timeoutMs);
    conn.setEncoding('utf8');
    conn.on('connect', () => conn.write(line + '\n'));
    conn.on('data', (d) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        conn.destroy();
        resolve(buf.slice(0, nl));
      }
    });
    conn.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** sticky's counters as an object: {live_workers: 3, sessions: 0, worker0: 'pid:..,sessions:..', ...}. */
async function stats(handle) {
  const line = await controlRequest(handle.control, 'stats');
  if (!line.startsWith('ok ')) throw new Error(`stats: ${line}`);
  const out = {};
  for (const kv of line.slice(3).trim().split(/\s+/)) {
    const eq = kv.indexOf('=');
    const key = kv.slice(0, eq);
    const value = kv.slice(eq + 1);
    out[key] = /^\d+$/.test(value) ? Number(value) : value;
  }
  return out;
}

/**
 * sticky's counters that say a request was reset or dropped and resent
 * (foreign requests, destroyed connections, unmapped sids), for the tests'
 * figures; {} when its stats cannot be read.
 */
async function retryCounters(handle) {
  const st = await stats(handle).catch(() => ({}));
  return Object.fromEntries(Object.entries(st).filter(([k, v]) => typeof v === 'number' && /reset|foreign|destroy|unmapped/.test(k)));
}

async function waitFor(what, predicate, { timeout = 10000, interval = 50 } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await predicate();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(interval);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- clients

/**
 * A socket.io-client socket, connected, with the worker's `hello` received.
 * Resolves {socket, hello}. Options go to io() (reconnection off by default).
 */
function connectClient(url, options = {}, timeoutMs = 10000) {
  const socket = ioClient(url, { reconnection: false, forceNew: true, timeout: timeoutMs, ...options });
  // The transport the Engine.IO session opened with, and whether it upgraded.
  const info = { initialTransport: null, upgraded: null };
  socket.io.once('open', () => {
    const engine = socket.io.engine;
    info.initialTransport = engine.transport.name;
    info.upgraded = new Promise((resolve, reject) => {
      engine.once('upgrade', (t) => resolve(t.name));
      engine.once('upgradeError', reject);
      engine.once('close', () => resolve(null));
    });
    info.upgraded.catch(() => {}); // handled by whoever awaits it, if anyone
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.disconnect();
      reject(new Error(`no connect + hello within ${timeoutMs} ms`));
    }, timeoutMs + 1000);
    socket.once('hello', (hello) => {
      clearTimeout(timer);
      resolve({ socket, hello, ...info });
    });
    socket.once('connect_error', (err) => {
      clearTimeout(timer);
      socket.disconnect();
      reject(err);
    });
  });
}

function emitAck(socket, event, payload, timeoutMs = 10000) {
  return payload === undefined
    ? socket.timeout(timeoutMs).emitWithAck(event)
    : socket.timeout(timeoutMs).emitWithAck(event, payload);
}

// ---------------------------------------------------------------- raw HTTP

/**
 * Reads one HTTP/1.1 response from a socket (Content-Length, chunked, or
 * until close). Resolves {status, headers, body}.
 */
function readResponse(sock, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    let ended = false;
    const timer = setTimeout(() => finish(new Error(`no complete response within ${timeoutMs} ms`)), timeoutMs);
    const onData = (d) => {
      buf = Buffer.concat([buf, d]);
      tryParse();
    };
    const onEnd = () => {
      ended = true;
      tryParse();
    };
    const onError = (err) => finish(err);
    sock.on('data', onData);
    sock.on('end', onEnd);
    sock.on('error', onError);
    function finish(err, value) {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('end', onEnd);
      sock.off('error', onError);
      if (err) reject(err);
      else resolve(value);
    }
    function tryParse() {
      const headEnd = buf.indexOf('\r\n\r\n');
      if (headEnd < 0) {
        if (ended) finish(new Error(`connection closed before a response head (${buf.length} bytes)`));
        return;
      }
      const lines = buf.subarray(0, headEnd).toString('latin1').split('\r\n');
      const status = Number(lines[0].split(' ')[1]);
      const headers = {};
      for (const l of lines.slice(1)) {
        const i = l.indexOf(':');
        const k = l.slice(0, i).trim().toLowerCase();
        const v = l.slice(i + 1).trim();
        headers[k] = headers[k] === undefined ? v : `${headers[k]}, ${v}`;
      }
      let rest = buf.subarray(headEnd + 4);
      let body;
      if (headers['content-length'] !== undefined) {
        const n = Number(headers['content-length']);
        if (rest.length < n) {
          if (ended) finish(new Error('connection closed mid-body'));
          return;
        }
        body = rest.subarray(0, n);
      } else if (/chunked/i.test(headers['transfer-encoding'] || '')) {
        const parts = [];
        for (;;) {
          const crlf = rest.indexOf('\r\n');
          if (crlf < 0) return ended ? finish(new Error('closed mid-chunk')) : undefined;
          const size = parseInt(rest.subarray(0, crlf).toString(), 16);
          if (rest.length < crlf + 2 + size + 2) return ended ? finish(new Error('closed mid-chunk')) : undefined;
          if (size === 0) break;
          parts.push(rest.subarray(crlf + 2, crlf + 2 + size));
          rest = rest.subarray(crlf + 2 + size + 2);
        }
        body = Buffer.concat(parts);
      } else if (status === 204 || status === 304) {
        body = Buffer.alloc(0);
      } else {
        if (!ended) return;
        body = rest;
      }
      finish(null, { status, headers, body: body.toString('utf8') });
    }
  });
}

function connectRaw(port) {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ host: '127.0.0.1', port });
    sock.once('connect', () => {
      sock.off('error', reject);
      resolve(sock);
    });
    sock.once('error', reject);
  });
}

/** Resolves true if the peer closes (FIN or reset) within timeoutMs. */
function closedByPeer(sock, timeoutMs = 2000) {
  if (sock.readableEnded || sock.destroyed) return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = (v) => {
      clearTimeout(timer);
      sock.off('end', onEnd);
      sock.off('close', onEnd);
      sock.off('error', onEnd);
      resolve(v);
    };
    const onEnd = () => done(true);
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.on('end', onEnd);
    sock.on('close', onEnd);
    sock.on('error', onEnd);
    sock.resume();
  });
}

function httpRequestText(method, target, { headers = {}, body = '' } = {}) {
  const all = { Host: '127.0.0.1', Connection: 'keep-alive', ...headers };
  if (body || method === 'POST') {
    all['Content-Type'] = all['Content-Type'] || 'text/plain;charset=UTF-8';
    all['Content-Length'] = Buffer.byteLength(body);
  }
  const head = [`${method} ${target} HTTP/1.1`, ...Object.entries(all).map(([k, v]) => `${k}: ${v}`)].join('\r\n');
  return `${head}\r\n\r\n${body}`;
}

/** One request on a new connection; resolves the response plus whether the server closed after it. */
async function rawRequest(port, method, target, options = {}) {
  const sock = await connectRaw(port);
  try {
    sock.write(httpRequestText(method, target, options));
    const res = await readResponse(sock, options.timeout ?? 5000);
    res.closed = await closedByPeer(sock, options.closeWait ?? 1000);
    return res;
  } finally {
    sock.destroy();
  }
}

// Engine.IO v4 long-polling, by hand.
const EIO = '/socket.io/?EIO=4&transport=polling';

async function handshakeRaw(port) {
  const res = await rawRequest(port, 'GET', EIO);
  if (res.status !== 200 || res.body[0] !== '0') {
    throw new Error(`handshake: HTTP ${res.status} ${res.body}`);
  }
  return { ...JSON.parse(res.body.slice(1)), response: res };
}

/** Ends a session opened by hand (Engine.IO close packet). */
async function closeRaw(port, sid) {
  const res = await rawRequest(port, 'POST', `${EIO}&sid=${sid}`, { body: '1' });
  if (res.status !== 200) throw new Error(`close ${sid}: HTTP ${res.status} ${res.body}`);
}

/** Splits a polling payload into Engine.IO packets. */
const packets = (body) => body.split('\x1e');

module.exports = {
  REPO_ROOT,
  STICKY_BIN,
  BALANCES,
  LEARN,
  EIO,
  workerFor,
  startSticky,
  stopSticky,
  controlRequest,
  stats,
  retryCounters,
  waitFor,
  sleep,
  connectClient,
  emitAck,
  readResponse,
  connectRaw,
  closedByPeer,
  httpRequestText,
  rawRequest,
  handshakeRaw,
  closeRaw,
  packets,
  ioClient,
};
