'use strict';

// Broadcasting between workers (README, "Broadcasting between workers"):
// for each worker kind, 3 workers behind a real `sticky run`, 30
// socket.io-client sessions, lib/cluster.js's scenario (io.emit, rooms,
// binary, fetchSockets, serverSideEmit, all again after a SIGKILL).

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const { scenario } = require('../lib/cluster');
const { startRedis, redisMissing } = require('../lib/redis');

const NODE_CAPS = { fetchSockets: true, serverSideEmit: true };
// python-socketio has no fetchSockets or serverSideEmit across servers.
const PYTHON_CAPS = { fetchSockets: false, serverSideEmit: false };

async function withSticky(options, body) {
  const sticky = await h.startSticky({ workers: 3, ...options });
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
    await withSticky(
      {
        command: [process.execPath, 'e2e/workers/cluster-worker.js'],
        // The harness wraps the command in /bin/sh: `auto` would not see node.
        extraArgs: ['--ipc', 'on'],
        env: { ADAPTER: 'cluster' },
      },
      async (sticky) => {
        const { stats } = await scenario(sticky, NODE_CAPS, 'node cluster-adapter');
        assert.equal(stats.relay_dropped, 0);
        assert.equal(stats.relay_malformed, 0);
        assert.equal(stats.relay_node_channels, 3);
      },
    );
  });

  test("the seed's own worker code (its README's worker half, one require changed)", async () => {
    await withSticky(
      { command: [process.execPath, 'e2e/workers/seed-worker.js'], extraArgs: ['--ipc', 'on'] },
      (sticky) => scenario(sticky, NODE_CAPS, 'seed worker'),
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
});
