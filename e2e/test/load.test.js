'use strict';

// 200 concurrent long-polling clients, 20 acknowledged echoes each, through
// `sticky run` with 3 workers: not one "Session ID unknown", every message
// echoed. Long-polling is the hard case: every message is new HTTP
// requests, and with Connection: close every request is a new TCP
// connection that sticky must place on the session's owner.
//
// Same test for the Node.js, Python and Rust workers, with sticky's session
// learning off (E2E_LEARN), so the integrations' own registration is what
// is tested. E2E_LOAD_CLIENTS / E2E_LOAD_MESSAGES override 200 / 20.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');
const { pollingLoad } = require('../lib/load');

const CLIENTS = Number(process.env.E2E_LOAD_CLIENTS || 200);
const MESSAGES = Number(process.env.E2E_LOAD_MESSAGES || 20);

for (const lang of ['node', 'python', 'rust']) {
  const worker = h.workerFor(lang);
  describe(`${CLIENTS} polling clients x ${MESSAGES} echoes, ${lang} workers`, { skip: worker.skip }, () => {
    let sticky;
    let sockets = [];
    before(async () => {
      sticky = await h.startSticky({ balance: 'least-connection', command: worker.command });
    });
    after(async () => {
      for (const s of sockets) s.disconnect();
      await h.stopSticky(sticky);
    });

    test('no "Session ID unknown", every message echoed', async () => {
      const run = await pollingLoad(sticky, { label: `${lang} learn=${h.LEARN}`, lang, clients: CLIENTS, messages: MESSAGES });
      sockets = run.sockets;
      const { tally, delta, after: st } = run;
      assert.equal(tally.sessionIdUnknown, 0, '"Session ID unknown" answers');
      assert.equal(tally.connectErrors, 0, 'connect_error');
      assert.equal(tally.transportErrors, 0, 'transport errors');
      assert.equal(tally.disconnects, 0, 'unexpected disconnects');
      assert.equal(tally.connected, CLIENTS);
      assert.equal(tally.echoed, CLIENTS * MESSAGES, 'every message echoed');
      assert.equal(tally.otherWorker, 0);
      assert.equal(tally.wrongLang, 0, `every hello came from a ${lang} worker`);
      assert.equal(delta('sid_unknown'), 0, 'sticky saw no request for an unknown sid');
      assert.equal(st.sessions, CLIENTS, 'every live session registered');

      for (const s of sockets) s.disconnect();
      await h.waitFor('sessions unregistered', async () => (await h.stats(sticky)).sessions === 0, {
        timeout: 15000,
      });
    });
  });
}
