'use strict';

// sticky's session learning (--learn on) with real Socket.IO servers:
// - an unmodified socket.io worker (no sticky code) gets full stickiness;
// - the control experiment: the same worker with --learn off fails;
// - the integrations' workers under --learn on: every session was already
//   registered when its handshake answer left (learned 0, learn_known N),
//   which is the integrations' contract seen from the kernel's side.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const { pollingLoad } = require('../lib/load');

const PLAIN = [process.execPath, 'e2e/workers/plain-node-worker.js'];
const CLIENTS = Number(process.env.E2E_LOAD_CLIENTS || 200);
const MESSAGES = Number(process.env.E2E_LOAD_MESSAGES || 20);

describe('unmodified socket.io workers, --learn on', () => {
  let sticky;
  let sockets = [];
  before(async () => {
    sticky = await h.startSticky({ learn: 'on', command: PLAIN });
  });
  after(async () => {
    for (const s of sockets) s.disconnect();
    await h.stopSticky(sticky);
  });

  test('polling then upgrade, and WebSocket only', async () => {
    const a = await h.connectClient(sticky.url);
    assert.equal(a.initialTransport, 'polling');
    assert.equal(await a.upgraded, 'websocket');
    assert.equal((await h.emitAck(a.socket, 'whoami')).pid, a.hello.pid);
    const b = await h.connectClient(sticky.url, { transports: ['websocket'] });
    assert.deepEqual(await h.emitAck(b.socket, 'echo', 'ws'), 'ws');
    a.socket.disconnect();
    b.socket.disconnect();
  });

  test(`${CLIENTS} polling clients x ${MESSAGES} echoes: all learned, no "Session ID unknown"`, async () => {
    const run = await pollingLoad(sticky, { label: 'plain node, learn=on', lang: 'node', clients: CLIENTS, messages: MESSAGES });
    sockets = run.sockets;
    const { tally, delta, after: st } = run;
    assert.equal(tally.sessionIdUnknown, 0, '"Session ID unknown" answers');
    assert.equal(tally.connectErrors + tally.transportErrors + tally.disconnects, 0);
    assert.equal(tally.echoed, CLIENTS * MESSAGES, 'every message echoed');
    assert.equal(tally.otherWorker, 0);
    assert.equal(delta('sid_unknown'), 0);
    assert.equal(delta('learned'), CLIENTS, 'every session learned');
    assert.equal(st.sessions, 0, 'nothing registered by the workers');
  });
});

describe('control experiment: unmodified socket.io workers, --learn off', () => {
  let sticky;
  before(async () => {
    sticky = await h.startSticky({ learn: 'off', command: PLAIN });
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
