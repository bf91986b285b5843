'use strict';

// sticky's session learning (--learn on) with real Socket.IO servers:
// - workers with no sticky code at all, only listening on fd 3 (plain
//   socket.io on Node.js, plain python-socketio on aiohttp, plain
//   socketioxide), get full stickiness: the polling-to-WebSocket scenarios
//   and the 200-client long-polling load, with zero "Session ID unknown";
// - the control experiment: the plain Node.js worker with --learn off fails;
// - the integrations' workers under --learn on: every session was already
//   registered when its handshake answer left (learned 0, learn_known N),
//   which is the integrations' contract seen from the kernel's side.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const { pollingLoad } = require('../lib/load');

const CLIENTS = Number(process.env.E2E_LOAD_CLIENTS || 200);
const MESSAGES = Number(process.env.E2E_LOAD_MESSAGES || 20);
const UPGRADE_CLIENTS = 50;

/** The load's failures, all of which must be zero. */
function assertClean(run, clients, messages) {
  const { tally, delta } = run;
  assert.equal(tally.sessionIdUnknown, 0, '"Session ID unknown" answers');
  assert.equal(tally.connectErrors, 0, 'connect_error');
  assert.equal(tally.transportErrors, 0, 'transport errors');
  assert.equal(tally.disconnects, 0, 'unexpected disconnects');
  assert.equal(tally.connected, clients);
  assert.equal(tally.echoed, clients * messages, 'every message acked with its own payload');
  assert.equal(tally.otherWorker, 0, "every whoami acked by the session's own worker");
  assert.equal(tally.wrongLang, 0);
  assert.equal(delta('sid_unknown'), 0, 'sticky saw no request for a sid it did not know');
}

for (const lang of ['plain-node', 'plain-python', 'plain-rust']) {
  const worker = h.workerFor(lang);
  const helloLang = lang.slice('plain-'.length);
  describe(`${lang} workers (no sticky code), --learn on`, { skip: worker.skip }, () => {
    let sticky;
    let sockets = [];
    before(async () => {
      sticky = await h.startSticky({ learn: 'on', command: worker.command });
    });
    after(async () => {
      for (const s of sockets) s.disconnect();
      await h.stopSticky(sticky);
    });

    /** Asserts the session's acks come from the worker that said hello. */
    async function assertOwnWorker(conn) {
      assert.equal(conn.hello.lang, helloLang);
      assert.deepEqual(await h.emitAck(conn.socket, 'echo', { n: 1 }), { n: 1 });
      const me = await h.emitAck(conn.socket, 'whoami');
      assert.equal(me.pid, conn.hello.pid, "acked by the session's own worker");
    }

    test('polling, then upgrade to WebSocket', async () => {
      const before = await h.stats(sticky);
      const conn = await h.connectClient(sticky.url);
      assert.equal(conn.initialTransport, 'polling');
      assert.equal(await conn.upgraded, 'websocket', 'the upgrade request reached the owner');
      await assertOwnWorker(conn);
      conn.socket.disconnect();
      const st = await h.stats(sticky);
      assert.equal(st.sid_unknown - before.sid_unknown, 0);
      assert.ok(st.learned > before.learned, 'the session was learned');
      assert.equal(st.sessions, 0, 'nothing registered by the worker');
    });

    test('WebSocket only, and polling only', async () => {
      const ws = await h.connectClient(sticky.url, { transports: ['websocket'] });
      assert.equal(ws.socket.io.engine.transport.name, 'websocket');
      await assertOwnWorker(ws);
      const polling = await h.connectClient(sticky.url, { transports: ['polling'] });
      for (let i = 0; i < 10; i++) assert.deepEqual(await h.emitAck(polling.socket, 'echo', { i }), { i });
      await assertOwnWorker(polling);
      ws.socket.disconnect();
      polling.socket.disconnect();
    });

    test('three disconnect / reconnect cycles, each a new session that upgrades', async () => {
      const conn = await h.connectClient(sticky.url);
      const seen = [conn.hello.worker];
      for (let cycle = 1; cycle <= 3; cycle++) {
        conn.socket.disconnect();
        const helloAgain = new Promise((resolve, reject) => {
          conn.socket.once('hello', resolve);
          conn.socket.once('connect_error', reject);
        });
        const upgraded = new Promise((resolve) =>
          conn.socket.io.once('open', () => conn.socket.io.engine.once('upgrade', (t) => resolve(t.name))),
        );
        conn.socket.connect();
        const again = await helloAgain;
        assert.equal(await upgraded, 'websocket');
        assert.equal((await h.emitAck(conn.socket, 'whoami')).pid, again.pid);
        seen.push(again.worker);
      }
      console.log(`[${lang}] reconnect cycles: workers ${seen.join(' -> ')}`);
      conn.socket.disconnect();
    });

    test(`${UPGRADE_CLIENTS} concurrent clients, polling then upgrade, 5 echoes each`, async () => {
      const run = await pollingLoad(sticky, {
        label: `${lang}, learn=on, upgrade`,
        lang: helloLang,
        clients: UPGRADE_CLIENTS,
        messages: 5,
        transports: ['polling', 'websocket'],
      });
      for (const s of run.sockets) s.disconnect();
      assertClean(run, UPGRADE_CLIENTS, 5);
      assert.equal(run.tally.onWebSocket, UPGRADE_CLIENTS, 'every session upgraded');
      assert.equal(run.delta('learned'), UPGRADE_CLIENTS, 'every session learned');
    });

    test(`${CLIENTS} polling clients x ${MESSAGES} echoes: all learned, no "Session ID unknown"`, async () => {
      const run = await pollingLoad(sticky, {
        label: `${lang}, learn=on`,
        lang: helloLang,
        clients: CLIENTS,
        messages: MESSAGES,
      });
      sockets = run.sockets;
      assertClean(run, CLIENTS, MESSAGES);
      assert.equal(run.delta('learned'), CLIENTS, 'every session learned');
      assert.equal(run.after.sessions, 0, 'nothing registered by the workers');
    });
  });
}

describe("Engine.IO close on the wire, --learn-idle 10m (plain-node workers)", () => {
  let sticky;
  before(async () => {
    sticky = await h.startSticky({
      learn: 'on',
      command: h.workerFor('plain-node').command,
      extraArgs: ['--learn-idle', '10m'],
    });
  });
  after(() => h.stopSticky(sticky));

  const learnedSessions = async () => (await h.stats(sticky)).learned_sessions;

  test('a long-polling client that disconnects closes its learned session at once', async () => {
    const before = await h.stats(sticky);
    const conns = [];
    for (let i = 0; i < 3; i++) conns.push(await h.connectClient(sticky.url, { transports: ['polling'] }));
    // learned_sessions is recounted at each expiry scan (every 5 s here).
    await h.waitFor('3 learned sessions', async () => (await learnedSessions()) === 3, { timeout: 15000 });
    for (const c of conns) c.socket.disconnect(); // POSTs the close packet `1`
    // Forgotten at the next scan, not after --learn-idle (10 min).
    await h.waitFor('the closed sessions forgotten', async () => (await learnedSessions()) === 0, { timeout: 15000 });
    const after = await h.stats(sticky);
    assert.equal(after.learn_closed - before.learn_closed, 3, 'three close packets seen');
  });

  test('a WebSocket session end is not seen: it stays until --learn-idle', async () => {
    const before = await h.stats(sticky);
    const conn = await h.connectClient(sticky.url);
    assert.equal(await conn.upgraded, 'websocket');
    conn.socket.disconnect(); // closes the WebSocket; no Engine.IO close packet
    await h.waitFor('the learned session counted', async () => (await learnedSessions()) === 1, { timeout: 15000 });
    const after = await h.stats(sticky);
    assert.equal(after.learn_closed - before.learn_closed, 0);
  });
});

describe('control experiment: unmodified socket.io workers, --learn off', () => {
  let sticky;
  before(async () => {
    sticky = await h.startSticky({ learn: 'off', command: h.workerFor('plain-node').command });
  });
  after(() => h.stopSticky(sticky));

  test('long-polling sessions break without registration or learning', async () => {
    const run = await pollingLoad(sticky, { label: 'plain node, learn=off', lang: 'node', clients: 20, messages: 5, timeout: 5000 });
    for (const s of run.sockets) s.disconnect();
    const failures = run.tally.sessionIdUnknown + run.tally.connectErrors + run.tally.transportErrors;
    assert.ok(failures > 0, 'expected failures without stickiness');
    assert.ok(run.delta('sid_unknown') > 0, `sticky saw sids it did not know (${run.delta('sid_unknown')})`);
  });
});

for (const lang of ['node', 'python', 'rust']) {
  const worker = h.workerFor(lang);
  describe(`${lang} integration workers, --learn on`, { skip: worker.skip }, () => {
    let sticky;
    before(async () => {
      sticky = await h.startSticky({ learn: 'on', command: worker.command });
    });
    after(() => h.stopSticky(sticky));

    test('every session registered before its handshake answer left (nothing left to learn)', async () => {
      const n = 50;
      const run = await pollingLoad(sticky, { label: `${lang} integration, learn=on`, lang, clients: n, messages: 5 });
      for (const s of run.sockets) s.disconnect();
      assert.equal(run.tally.sessionIdUnknown + run.tally.connectErrors + run.tally.transportErrors, 0);
      assert.equal(run.tally.echoed, n * 5);
      assert.equal(run.after.sessions, n, 'registered');
      assert.equal(run.delta('learn_known'), n, 'the learner found each open packet already registered');
      assert.equal(run.delta('learned'), 0, 'no handshake answer left before its registration');
    });
  });
}
