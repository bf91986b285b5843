'use strict';

// Foreign requests (README, "Requests on reused connections"): 50
// long-polling socket.io-client sessions share one keep-alive http.Agent,
// as a browser's tabs share its connection pool, against 3 workers. A
// session's request often rides a connection another worker's session
// opened; sticky drops it in the kernel and resets that connection before
// any answer byte, and the request resent on a new connection reaches its
// session's worker.
//
// The client matters: browsers resend such a request (DESIGN.md); Node's
// http client does not, it reports the reset and engine.io-client then
// closes the session. So the main runs use ResendingAgent (a keep-alive
// agent that resends what was reset unanswered, as browsers do); the last
// one shows what the stock agent gets.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const h = require('../lib/harness');
const { pollingLoad } = require('../lib/load');
const { ResendingAgent } = require('../lib/resending-agent');

const CLIENTS = 50;
const MESSAGES = 10;

for (const lang of ['plain-node', 'node']) {
  const worker = h.workerFor(lang);
  const label = lang === 'node' ? 'Node integration' : 'unmodified socket.io';
  describe(`a keep-alive agent shared by ${CLIENTS} sessions, ${label} workers`, { skip: worker.skip }, () => {
    let sticky;
    before(async () => {
      sticky = await h.startSticky({ balance: 'round-robin', learn: 'on', command: worker.command });
    });
    after(() => h.stopSticky(sticky));

    test('zero 4xx/5xx, zero disconnects, every ack from the session\'s worker', async () => {
      const agent = new ResendingAgent();
      const run = await pollingLoad(sticky, { label, lang: 'node', clients: CLIENTS, messages: MESSAGES, agent });
      for (const s of run.sockets) s.disconnect();
      agent.destroy();
      const bad = agent.statuses.filter((s) => s >= 400);
      console.log(
        `[${label}] ${agent.statuses.length} HTTP answers (${bad.length} >= 400) on ${agent.socketsCreated} ` +
          `connections; ${agent.resends} requests resent after a reset; sticky: foreign_dropped ` +
          `${run.delta('foreign_dropped')}, connections_reset ${run.delta('connections_reset')}, ` +
          `reset_failures ${run.delta('reset_failures')}`,
      );
      assert.deepEqual(bad, [], 'Engine.IO answers >= 400');
      assert.equal(run.tally.sessionIdUnknown, 0);
      assert.equal(run.tally.transportErrors, 0, 'transport errors');
      assert.equal(run.tally.disconnects, 0, 'disconnects');
      assert.equal(run.tally.connected, CLIENTS);
      assert.equal(run.tally.echoed, CLIENTS * MESSAGES, 'every echo acked with its payload');
      assert.equal(run.tally.otherWorker, 0, "every whoami acked by the session's own worker");
      assert.equal(run.delta('reset_failures'), 0);
      // Every reset the kernel asked for is one the client resent.
      assert.equal(agent.resends, run.delta('connections_reset'));
    });
  });
}

/** One session on `agent`: connect, then up to MESSAGES whoami acks; what happened. */
async function stockSession(url, agent) {
  const out = { connected: false, disconnected: null, acks: 0, otherWorker: 0, failed: null };
  let conn;
  try {
    conn = await h.connectClient(url, { transports: ['polling'], agent }, 5000);
  } catch (err) {
    out.failed = err.message;
    return out;
  }
  out.connected = true;
  conn.socket.on('disconnect', (reason) => {
    if (reason !== 'io client disconnect') out.disconnected = reason;
  });
  for (let m = 0; m < MESSAGES && !out.disconnected; m++) {
    try {
      const me = await h.emitAck(conn.socket, 'whoami', undefined, 3000);
      out.acks++;
      if (me.worker !== conn.hello.worker) out.otherWorker++;
    } catch {
      break;
    }
  }
  conn.socket.disconnect();
  return out;
}

describe('the stock keep-alive http.Agent (no resend), unmodified socket.io workers', { skip: h.workerFor('plain-node').skip }, () => {
  let sticky;
  before(async () => {
    sticky = await h.startSticky({ balance: 'round-robin', learn: 'on', command: h.workerFor('plain-node').command });
  });
  after(() => h.stopSticky(sticky));

  test('no request reaches another worker; each reset is a failure Node does not retry', async () => {
    const agent = new http.Agent({ keepAlive: true });
    const before = await h.stats(sticky);
    const runs = await Promise.all(Array.from({ length: CLIENTS }, () => stockSession(sticky.url, agent)));
    agent.destroy();
    const after = await h.stats(sticky);
    const resets = after.connections_reset - before.connections_reset;
    const lost = runs.filter((r) => r.acks < MESSAGES).length;
    const reasons = [...new Set(runs.map((r) => r.disconnected || r.failed || (r.acks < MESSAGES ? 'ack timeout' : null)).filter(Boolean))];
    console.log(
      `[stock agent] ${CLIENTS} sessions: ${runs.reduce((n, r) => n + r.acks, 0)} acks, ` +
        `${lost} sessions did not get their ${MESSAGES} acks (${reasons.join('; ')}); sticky reset ${resets} connections`,
    );
    // The kernel's part holds: no ack from a worker that does not own the session.
    assert.equal(runs.reduce((n, r) => n + r.otherWorker, 0), 0);
    // Node's part: a session whose request was reset is lost, unless the
    // application resends it (ResendingAgent above).
    if (resets > 0) assert.ok(lost > 0, 'a reset without a resend loses its session');
  });
});
