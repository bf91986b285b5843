'use strict';

// The browser side of the test app (e2e/test/browser.test.js): one
// Socket.IO session per tab, acknowledged echoes with a JSON API call
// between them. Query: transports=polling|websocket (default: the client's
// own, polling then upgrade), echoes=N, tab=NAME. The outcome is
// window.__result, read by the test.

(function () {
  const params = new URLSearchParams(location.search);
  const transports = params.get('transports') ? params.get('transports').split(',') : undefined;
  const echoes = Number(params.get('echoes') || 20);
  const tab = params.get('tab') || '?';
  const result = {
    tab,
    echoes: 0,
    echoFailures: [],
    wrongWorker: [],
    api: 0,
    apiErrors: [],
    disconnects: [],
    connectErrors: [],
    sessions: [],
    transport: null,
    forwardedFor: undefined, // X-Forwarded-For as the worker saw it
    connects: [], // Date.now() of each connect
    disconnectTimes: [],
    shouts: [], // broadcasts received: {tab, round, host}
    done: false,
  };
  window.__result = result;
  const status = document.getElementById('status');
  const show = () => (status.textContent = JSON.stringify({ echoes: result.echoes, sessions: result.sessions.length }));

  // The worker (pid) of each session, from the hello the worker sends.
  const workerOf = new Map();
  const socket = io(transports ? { transports } : {});
  let helloWaiters = [];
  socket.on('hello', (me) => {
    workerOf.set(socket.id, me.pid);
    result.sessions.push({ sid: socket.id, pid: me.pid, host: me.host, at: Date.now() });
    helloWaiters.forEach((w) => w());
    helloWaiters = [];
  });
  socket.on('disconnect', (reason) => {
    result.disconnects.push(reason);
    result.disconnectTimes.push(Date.now());
  });
  socket.on('connect', () => result.connects.push(Date.now()));
  // Broadcasts between tabs (the multi-host test): window.__shout(round).
  socket.on('shout', (m) => result.shouts.push({ tab: m.tab, round: m.round, host: m.host }));
  window.__shout = (round) => socket.emit('shout', { tab, round });
  socket.on('connect_error', (err) => result.connectErrors.push(String(err && err.message)));
  const hello = () =>
    socket.id && workerOf.has(socket.id) ? Promise.resolve() : new Promise((r) => helloWaiters.push(r));

  async function run() {
    for (let i = 0; i < echoes; i++) {
      await hello();
      const sid = socket.id;
      const expected = workerOf.get(sid);
      try {
        const ack = await socket.timeout(10000).emitWithAck('echo', { tab, i });
        if (!ack || !ack.payload || ack.payload.i !== i) result.echoFailures.push(`echo ${i}: bad ack ${JSON.stringify(ack)}`);
        else if (ack.pid !== expected) result.wrongWorker.push({ i, sid, expected, got: ack.pid });
        else result.echoes++;
      } catch (err) {
        result.echoFailures.push(`echo ${i}: ${err && err.message}`);
      }
      try {
        const res = await fetch(`/api/ping?tab=${encodeURIComponent(tab)}&i=${i}`, { cache: 'no-store' });
        const body = await res.json();
        result.forwardedFor = body.forwardedFor;
        if (res.ok && typeof body.pid === 'number') result.api++;
        else result.apiErrors.push(`api ${i}: HTTP ${res.status}`);
      } catch (err) {
        result.apiErrors.push(`api ${i}: ${err && err.message}`);
      }
      show();
    }
    result.transport = socket.io.engine && socket.io.engine.transport.name;
    result.done = true;
    show();
  }
  run();
})();
