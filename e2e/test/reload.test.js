'use strict';

// `sticky reload` with real Socket.IO workers that report the version of
// the code they started with (e2e/workers/versioned-worker.js reads
// VERSION_FILE at start; the test rewrites it, then reloads):
// - 30 sessions (WebSocket, long-polling, polling then upgrade) echo every
//   200 ms across a reload with --drain 6s: until the deadline none
//   disconnects, each keeps its pid and its old version, no echo is lost;
//   sessions opened after the reload run the new version; after the
//   deadline every session has reconnected to the new version;
// - the same with sessions registered through the Node.js integration;
// - a new version that throws at start: the reload is rolled back, the old
//   generation keeps every session and takes the new ones again.

const { describe, test, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const h = require('../lib/harness');

const DRAIN_MS = 6000;
const ECHO_EVERY_MS = 200;
const TRANSPORTS = [
  { name: 'websocket', options: { transports: ['websocket'] } },
  { name: 'polling', options: { transports: ['polling'] } },
  { name: 'polling+upgrade', options: {} },
];

/**
 * One Socket.IO client that echoes every 200 ms and reconnects on its own.
 * Keeps every hello it got (one per connection) and counts echoes.
 */
function startSession(url, transport) {
  const socket = h.ioClient(url, {
    forceNew: true,
    reconnection: true,
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
    ...transport.options,
  });
  const s = { transport: transport.name, socket, hellos: [], disconnects: [], sent: 0, acked: new Set(), lost: 0 };
  s.ready = new Promise((resolve, reject) => {
    socket.once('hello', resolve);
    socket.once('connect_error', reject);
  });
  socket.on('hello', (hello) => s.hellos.push({ ...hello, at: Date.now() }));
  socket.on('disconnect', (reason) => s.disconnects.push({ reason, at: Date.now() }));
  let n = 0;
  s.timer = setInterval(() => {
    if (!socket.connected) return;
    const payload = { n: n++ };
    const sentAt = Date.now();
    s.sent++;
    socket
      .timeout(5000)
      .emitWithAck('echo', payload)
      .then((back) => {
        assert.deepEqual(back, payload);
        s.acked.add(payload.n);
      })
      .catch(() => {
        s.lost++;
        (s.lostAt ||= []).push(sentAt);
      });
  }, ECHO_EVERY_MS);
  s.stop = () => {
    clearInterval(s.timer);
    socket.disconnect();
  };
  return s;
}

async function openSessions(url, count) {
  const sessions = Array.from({ length: count }, (_, i) => startSession(url, TRANSPORTS[i % TRANSPORTS.length]));
  await Promise.all(sessions.map((s) => s.ready));
  return sessions;
}

/** pids of each generation's running workers, from `stats`. */
async function generations(sticky) {
  const st = await h.stats(sticky);
  const out = {};
  for (const [key, value] of Object.entries(st)) {
    if (!/^worker\d+(_generation\d+)?$/.test(key) || typeof value !== 'string') continue;
    const pid = Number((/pid:(\d+)/.exec(value) || [])[1]);
    const generation = Number((/generation:(\d+)/.exec(value) || [])[1]);
    if (!pid) continue;
    (out[generation] ||= []).push(pid);
  }
  return { st, pids: out };
}

/**
 * What one describe's test opens: a VERSION file (v1), then the sticky
 * and the sessions the test puts here (those opened before the reload and
 * the fresh ones after it); all stopped and removed after it, also when
 * it fails (a client left running keeps node's event loop alive).
 */
function reloadRun() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-reload-'));
  const version = { dir, file: path.join(dir, 'VERSION') };
  fs.writeFileSync(version.file, 'v1');
  const run = { version, sticky: undefined, sessions: [], fresh: [] };
  after(async () => {
    for (const s of [...run.sessions, ...run.fresh]) s.stop();
    await h.stopSticky(run.sticky);
    fs.rmSync(version.dir, { recursive: true, force: true });
  });
  return run;
}

/** sticky with 3 versioned workers reading `run`'s VERSION file, --drain DRAIN_MS. */
async function startVersioned(run, learn, env = {}) {
  run.sticky = await h.startSticky({
    workers: 3,
    learn,
    command: [process.execPath, 'e2e/workers/versioned-worker.js'],
    env: { VERSION_FILE: run.version.file, ...env },
    extraArgs: ['--drain', `${DRAIN_MS / 1000}s`],
  });
  return run.sticky;
}

const cases = [
  { name: 'unmodified workers, learned sessions', learn: 'on', env: {} },
  { name: 'the Node.js integration, registered sessions', learn: 'off', env: { VERSIONED_REGISTER: '1' } },
];

for (const c of cases) {
  describe(`sticky reload: ${c.name}`, () => {
    const run = reloadRun();

    test('30 sessions cross a reload with --drain 6s: kept until the deadline, then on the new version', async () => {
      const sticky = await startVersioned(run, c.learn, c.env);
      const sessions = (run.sessions = await openSessions(sticky.url, 30));
      const oldPids = (await generations(sticky)).pids[0];
      assert.equal(oldPids.length, 3);
      for (const s of sessions) assert.equal(s.hellos[0].version, 'v1');
      await h.sleep(1000);

      fs.writeFileSync(run.version.file, 'v2');
      const answer = await h.controlRequest(sticky.control, 'reload');
      const reloadedAt = Date.now();
      const deadline = reloadedAt + DRAIN_MS;
      assert.match(answer, /^ok generation 1 started/, answer);
      const again = await h.controlRequest(sticky.control, 'reload');
      assert.match(again, /^err generation 0 is still draining/, 'a second reload is refused while draining');

      // New sessions go to the new generation only.
      const { st: during, pids } = await generations(sticky);
      assert.deepEqual(pids[0].sort(), oldPids.sort(), 'the old processes still run');
      assert.equal(pids[1].length, 3, 'a new process per worker index');
      assert.match(during.generation0, /state:draining/);
      assert.match(during.generation1, /state:accepting/);
      const fresh = await openSessions(sticky.url, 12);
      run.fresh = fresh; // stopped after the test, whatever happens
      for (const s of fresh) {
        assert.equal(s.hellos[0].version, 'v2', `a ${s.transport} session opened after the reload`);
        assert.ok(pids[1].includes(s.hellos[0].pid));
      }

      // Until the deadline, the old sessions stay where they were.
      await h.sleep(deadline - Date.now() - 1500);
      const sentUntil = sessions.map((s) => s.sent);
      for (const s of sessions) {
        assert.equal(s.disconnects.length, 0, `a ${s.transport} session disconnected before the deadline`);
        assert.equal(s.hellos.length, 1);
      }
      const whoBefore = await Promise.all(sessions.map((s) => s.socket.timeout(2000).emitWithAck('whoami')));
      assert.ok(Date.now() < deadline, 'checked before the deadline');
      sessions.forEach((s, i) => {
        assert.equal(whoBefore[i].pid, s.hellos[0].pid, 'the same process');
        assert.equal(whoBefore[i].version, 'v1', 'the old version');
      });
      // Echoes sent until then: each must have been acked (in flight ones too).
      const sentBefore = sentUntil.reduce((a, n) => a + n, 0);
      await h.sleep(300);
      const ackedBefore = sessions.reduce((a, s, i) => a + [...s.acked].filter((n) => n < sentUntil[i]).length, 0);
      const lostBefore = sentBefore - ackedBefore;
      assert.equal(lostBefore, 0, 'no echo lost before the deadline');

      // After it: every old session reconnected, to the new version.
      await h.waitFor(
        'every session on the new version',
        () => sessions.every((s) => s.socket.connected && s.hellos.at(-1).version === 'v2'),
        { timeout: 20000, interval: 100 },
      );
      const reconnectMs = sessions.map((s) => s.hellos.at(-1).at - deadline);
      for (const s of [...sessions, ...fresh]) {
        const me = await s.socket.timeout(2000).emitWithAck('whoami');
        assert.equal(me.version, 'v2');
        assert.ok(pids[1].includes(me.pid), 'a new-generation process');
      }
      const { st: done, pids: left } = await h.waitFor('the old generation gone from stats', async () => {
        const g = await generations(sticky);
        return g.pids[0] ? null : g;
      });
      assert.deepEqual(Object.keys(left), ['1']);
      assert.equal(done.generation0, undefined);
      for (const s of fresh) assert.equal(s.disconnects.length, 0, 'new sessions never moved');
      const log = sticky.stderr();
      assert.match(log, /reload: generation 1 started/);
      assert.match(log, /reload done: generation 0 stopped, generation 1 serves/);
      for (const s of fresh) s.stop();

      const lostAfter = sessions.reduce((a, s) => a + s.lost, 0);
      console.log(
        `[reload ${c.learn === 'on' ? 'learned' : 'registered'}] 30 sessions (${TRANSPORTS.map((t) => t.name).join(', ')}), ` +
          `3 workers, --drain ${DRAIN_MS / 1000}s: before the deadline ${sentBefore} echoes sent, ` +
          `${ackedBefore} acked, ${lostBefore} lost, 0 disconnects, 30/30 on their old pid and v1; ` +
          `12/12 new sessions on v2; after the deadline 30/30 reconnected to v2 in ` +
          `${Math.min(...reconnectMs)}..${Math.max(...reconnectMs)} ms, ${lostAfter} echoes lost in the cut`,
      );
    });
  });
}

describe('sticky reload: a new version that exits at once', () => {
  const run = reloadRun();

  test('the reload is rolled back: the old generation keeps its sessions and takes new ones', async () => {
    const sticky = await startVersioned(run, 'on');
    const sessions = (run.sessions = await openSessions(sticky.url, 30));
    const oldPids = (await generations(sticky)).pids[0].sort();
    fs.writeFileSync(run.version.file, 'broken-v2');
    const answer = await h.controlRequest(sticky.control, 'reload');
    assert.match(answer, /^ok generation 1 started/, answer);
    const reloadedAt = Date.now();
    await h.waitFor('the rollback', () => /reload rolled back/.test(sticky.stderr()), { timeout: 30000 });
    const rolledBackMs = Date.now() - reloadedAt;
    const lines = sticky.stderr().split('\n').filter((l) => /rolled back/.test(l));
    assert.equal(lines.length, 1, 'one log line');
    assert.match(lines[0], /generation 0 takes new sessions again \(3 workers\)/);

    // The broken processes are gone; the old ones serve, new sessions included.
    const { st, pids } = await h.waitFor('only generation 0 in stats', async () => {
      const g = await generations(sticky);
      return g.pids[1] ? null : g;
    });
    assert.deepEqual(pids[0].sort(), oldPids);
    assert.match(st.generation0, /state:accepting/);
    const fresh = await openSessions(sticky.url, 9);
    run.fresh = fresh; // stopped after the test, whatever happens
    for (const s of fresh) {
      assert.equal(s.hellos[0].version, 'v1');
      assert.ok(oldPids.includes(s.hellos[0].pid));
    }
    // Past what would have been the drain deadline, nothing moved.
    await h.sleep(Math.max(0, reloadedAt + DRAIN_MS + 1000 - Date.now()));
    for (const s of [...sessions, ...fresh]) {
      assert.equal(s.disconnects.length, 0, `a ${s.transport} session disconnected`);
      const me = await s.socket.timeout(2000).emitWithAck('whoami');
      assert.equal(me.pid, s.hellos[0].pid);
    }
    const sent = sessions.reduce((a, s) => a + s.sent, 0);
    const lost = sessions.reduce((a, s) => a + s.lost, 0);
    assert.equal(lost, 0, 'no echo lost');
    // A fixed build reloads normally afterwards.
    fs.writeFileSync(run.version.file, 'v3');
    const retry = await h.controlRequest(sticky.control, 'reload');
    assert.match(retry, /^ok generation 1 started/, retry);
    for (const s of fresh) s.stop();
    console.log(
      `[reload rollback] new version threw at start: rolled back after ${rolledBackMs} ms (one log line); ` +
        `30/30 old sessions kept their pid, ${sent} echoes sent, ${lost} lost; 9/9 new sessions on the old generation`,
    );
  });
});
