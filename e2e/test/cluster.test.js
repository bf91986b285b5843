'use strict';

// Broadcasting between workers (README, "Broadcasting between workers"):
// for each worker kind, 3 workers behind a real `sticky run`, 30
// socket.io-client sessions, lib/cluster.js's scenario (io.emit, rooms,
// binary, fetchSockets, serverSideEmit, all again after a SIGKILL).

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');
const { scenario } = require('../lib/cluster');
const { startRedis, redisMissing } = require('../lib/redis');

const NODE_CAPS = { fetchSockets: true, serverSideEmit: true };
// python-socketio has no fetchSockets or serverSideEmit across servers.
const PYTHON_CAPS = { fetchSockets: false, serverSideEmit: false };
// socketioxide has fetch_sockets across servers, no server-side emit.
const RUST_CAPS = { fetchSockets: true, serverSideEmit: false };

/** The Node.js worker with @socket.io/cluster-adapter over sticky's IPC channel. */
const NODE_CLUSTER_ADAPTER = {
  command: [process.execPath, 'e2e/workers/cluster-worker.js'],
  // The harness wraps the command in /bin/sh: `auto` would not see node.
  extraArgs: ['--ipc', 'on'],
  env: { ADAPTER: 'cluster' },
};

/** The socketioxide cluster worker binary, or a reason to skip. */
function rustClusterWorker() {
  const bin = path.join(path.dirname(h.STICKY_BIN), 'sticky-socketioxide-cluster-worker');
  return fs.existsSync(bin)
    ? { command: [bin], skip: false }
    : { command: null, skip: `${bin} is missing (cargo build --workspace)` };
}

async function withSticky(options, body) {
  // round-robin: new sessions spread evenly, so every worker holds clients.
  const sticky = await h.startSticky({ workers: 3, balance: 'round-robin', ...options });
  try {
    return await body(sticky);
  } catch (err) {
    console.log(`# sticky's log:\n${sticky.stderr()}\n# workers' output:\n${sticky.stdout()}`.replace(/\n/g, '\n# '));
    throw err;
  } finally {
    await sticky.stop();
  }
}

describe('Node.js: @socket.io/cluster-adapter over sticky\'s IPC channel', () => {
  test('3 workers, 30 clients: emit, rooms, binary, fetchSockets, serverSideEmit, SIGKILL', async () => {
    await withSticky(NODE_CLUSTER_ADAPTER, async (sticky) => {
      const { stats } = await scenario(sticky, NODE_CAPS, 'node cluster-adapter');
      assert.equal(stats.relay_dropped, 0);
      assert.equal(stats.relay_malformed, 0);
      assert.equal(stats.relay_node_channels, 3);
    });
  });

  test("the seed's own worker code (its README's worker half, one require changed)", async () => {
    await withSticky(
      { command: [process.execPath, 'e2e/workers/seed-worker.js'], extraArgs: ['--ipc', 'on'] },
      (sticky) => scenario(sticky, NODE_CAPS, 'seed worker'),
    );
  });
});

describe('Node.js: @sticky/socket.io\'s createRelayAdapter over the relay socket', () => {
  test('3 workers, 30 clients: emit, rooms, binary, fetchSockets, serverSideEmit, SIGKILL', async () => {
    await withSticky(
      { command: [process.execPath, 'e2e/workers/cluster-worker.js'], env: { ADAPTER: 'relay' } },
      async (sticky) => {
        const { stats } = await scenario(sticky, NODE_CAPS, 'node relay adapter');
        assert.equal(stats.relay_dropped, 0);
        assert.equal(stats.relay_node_channels, 0, 'no IPC channel needed');
      },
    );
  });
});

describe('Python: python-socketio with sticky_relay.RelayManager', () => {
  const python = h.workerFor('python');
  test('3 workers, 30 clients: emit, rooms, binary, SIGKILL', { skip: python.skip }, async () => {
    await withSticky(
      {
        command: [python.command[0], 'e2e/workers/cluster_python_worker.py'],
        env: { MANAGER: 'relay' },
      },
      async (sticky) => {
        const { stats } = await scenario(sticky, PYTHON_CAPS, 'python relay');
        assert.equal(stats.relay_dropped, 0);
        assert.ok(stats.relay_pubsub_connections >= 3, 'every worker subscribed');
      },
    );
  });
});

describe('Rust: socketioxide-redis\'s adapter over sticky_socketioxide::RelayDriver', () => {
  const rust = rustClusterWorker();
  test('3 workers, 30 clients: emit, rooms, binary, fetch_sockets, SIGKILL', { skip: rust.skip }, async () => {
    await withSticky({ command: rust.command, env: { ADAPTER: 'relay' } }, async (sticky) => {
      const { stats } = await scenario(sticky, RUST_CAPS, 'rust relay');
      assert.equal(stats.relay_dropped, 0);
    });
  });
});

describe('Across machines: the official Redis adapters on a real redis-server', () => {
  const missing = redisMissing();
  let redis;
  before(async () => {
    if (!missing) redis = await startRedis();
  });
  after(async () => {
    if (redis) await redis.stop();
  });

  test('Node.js: @socket.io/redis-adapter', { skip: missing }, async () => {
    await withSticky(
      {
        command: [process.execPath, 'e2e/workers/cluster-worker.js'],
        env: { ADAPTER: 'redis', REDIS_URL: redis.url },
      },
      (sticky) => scenario(sticky, NODE_CAPS, 'node redis-adapter'),
    );
  });

  const python = h.workerFor('python');
  test('Python: socketio.AsyncRedisManager', { skip: missing || python.skip }, async () => {
    await withSticky(
      {
        command: [python.command[0], 'e2e/workers/cluster_python_worker.py'],
        env: { MANAGER: 'redis', REDIS_URL: redis.url },
      },
      (sticky) => scenario(sticky, PYTHON_CAPS, 'python redis'),
    );
  });

  const rust = rustClusterWorker();
  test('Rust: socketioxide-redis (its Redis driver)', { skip: missing || rust.skip }, async () => {
    await withSticky(
      // socketioxide-redis's driver needs RESP3 (push messages).
      { command: rust.command, env: { ADAPTER: 'redis', REDIS_URL: `${redis.url}/?protocol=resp3` } },
      (sticky) => scenario(sticky, RUST_CAPS, 'rust redis'),
    );
  });
});

describe('Relay faults', () => {
  test('a worker that stops reading: others unaffected, its copies dropped and counted, memory bounded', async () => {
    await withSticky(NODE_CLUSTER_ADAPTER, async (sticky) => {
      const rss = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${sticky.proc.pid}/status`, 'utf8'))[1]) / 1024;
      // One client per worker: connected one at a time, duplicates closed.
      const clients = [];
      for (let i = 0; i < 30 && new Set(clients.map((c) => c.hello.worker)).size < 3; i++) {
        const c = await h.connectClient(sticky.url, { transports: ['websocket'] });
        if (clients.some((k) => k.hello.worker === c.hello.worker)) c.socket.disconnect();
        else clients.push(c);
      }
      try {
        const by = (w) => clients.find((c) => c.hello.worker === w);
        const [sender, reader, stopped] = [by(0), by(1), by(2)];
        assert.ok(sender && reader && stopped, 'one client per worker');
        const rssBefore = rss();
        process.kill(stopped.hello.pid, 'SIGSTOP');
        const MESSAGES = 120;
        const SIZE = 256 << 10;
        let got = 0;
        let rssPeak = 0;
        let st = {};
        reader.socket.on('shout', () => (got += 1));
        const t0 = performance.now();
        try {
          for (let n = 0; n < MESSAGES; n++) {
            await h.emitAck(sender.socket, 'shout', { n, bin: Buffer.alloc(SIZE, n) });
          }
          await h.waitFor('the reading worker got every message', () => got === MESSAGES, { timeout: 20000 });
          // Still stopped: its queue is full now.
          rssPeak = rss();
          st = await h.stats(sticky);
        } finally {
          process.kill(stopped.hello.pid, 'SIGCONT');
        }
        const ms = performance.now() - t0;
        console.log(`# stopped worker: ${MESSAGES} x ${SIZE >> 10} KiB broadcast in ${ms.toFixed(0)} ms; ` +
          `the reading worker's client got ${got}/${MESSAGES}; relay_dropped=${st.relay_dropped}; ` +
          `sticky RSS ${rssBefore.toFixed(1)} -> ${rssPeak.toFixed(1)} MiB`);
        assert.equal(got, MESSAGES);
        assert.ok(st.relay_dropped > 0, 'copies for the stopped worker were dropped');
        assert.ok(rssPeak - rssBefore < 64, `sticky's memory grew by ${(rssPeak - rssBefore).toFixed(1)} MiB`);
        // The log names the slot (generations interleave slots: worker 2 may be slot 4).
        assert.match(sticky.stderr(), /relay: worker \d+ \(node channel\) is not reading: \d+ messages/);
        // Resumed, it reads again: a new broadcast reaches its client.
        const last = { n: -1, bin: Buffer.from('after') };
        await h.waitFor('the resumed worker delivers a new broadcast', async () => {
          const seen = new Promise((resolve) => {
            const on = (p) => p.n === -1 && resolve(true);
            stopped.socket.on('shout', on);
            setTimeout(() => (stopped.socket.off('shout', on), resolve(false)), 1000);
          });
          await h.emitAck(sender.socket, 'shout', last);
          return seen;
        }, { timeout: 20000, interval: 10 });
      } finally {
        for (const c of clients) c.socket.disconnect();
      }
    });
  });
});

describe('Supervisor death', () => {
  /** Whether a shout from `from` reaches each of `clients` within 1 s. */
  async function reach(from, clients, n) {
    const payload = { n, bin: Buffer.from([n]) };
    const got = clients.map((c) => new Promise((resolve) => {
      const on = (p) => p.n === n && (c.socket.off('shout', on), resolve(true));
      c.socket.on('shout', on);
      setTimeout(() => (c.socket.off('shout', on), resolve(false)), 1000);
    }));
    await h.emitAck(from.socket, 'shout', payload);
    return Promise.all(got);
  }

  for (const kind of ['python', 'node']) {
    const python = h.workerFor('python');
    const options = kind === 'python'
      ? { command: [python.command?.[0], 'e2e/workers/cluster_python_worker.py'], env: { MANAGER: 'relay' } }
      : NODE_CLUSTER_ADAPTER;
    const title = kind === 'python'
      ? 'relay socket (python-socketio): broadcasting stops with sticky and resumes once a new sticky adopts the workers'
      : 'Node IPC: adopted workers keep serving, their broadcasts stay local (the channel cannot be given again)';
    test(title, { skip: kind === 'python' && python.skip }, async () => {
      const first = await h.startSticky({ workers: 3, balance: 'round-robin', ...options });
      let second = null;
      const clients = [];
      try {
        for (let i = 0; i < 6; i++) clients.push(await h.connectClient(first.url, { transports: ['websocket'] }));
        const pids = new Set(clients.map((c) => c.hello.pid));
        assert.equal(pids.size, 3);
        const from = clients[0];
        const count = (r) => r.filter(Boolean).length;
        const before = count(await reach(from, clients, 1));
        first.proc.kill('SIGKILL');
        await first.exited;
        const orphaned = count(await reach(from, clients, 2));
        const local = clients.filter((c) => c.hello.pid === from.hello.pid).length;
        second = await h.startSticky({
          workers: 3, balance: 'round-robin', ...options,
          listen: `127.0.0.1:${first.port}`, controlPath: first.control,
        });
        assert.match(second.stderr(), /adopted worker/);
        let adopted = 0;
        const deadline = performance.now() + 10000;
        let n = 3;
        do {
          adopted = count(await reach(from, clients, n++));
        } while (kind === 'python' && adopted < clients.length && performance.now() < deadline);
        const alive = [...pids].filter((pid) => { try { process.kill(pid, 0); return true; } catch { return false; } });
        console.log(`# ${kind}: a broadcast reached ${before}/6 clients with sticky, ${orphaned}/6 (${local} on the sender's worker) ` +
          `after SIGKILL of sticky, ${adopted}/6 after a new sticky adopted the workers; ${alive.length}/3 worker processes alive`);
        assert.equal(before, 6);
        assert.equal(orphaned, local, 'without sticky a broadcast stays on its worker');
        assert.equal(alive.length, 3, 'no worker crashed');
        assert.equal(adopted, kind === 'python' ? 6 : local);
      } finally {
        for (const c of clients) c.socket.disconnect();
        if (second) await second.stop();
        await first.stop();
      }
    });
  }
});
