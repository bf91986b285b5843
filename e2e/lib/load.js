'use strict';

// N concurrent socket.io clients, M acknowledged echoes each, against a
// running sticky; counts every kind of failure and prints the figures.

const h = require('./harness');

const pct = (arr, p) => {
  if (arr.length === 0) return NaN;
  const s = [...arr].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};

/**
 * @returns {Promise<{tally: object, delta: (k: string) => number, after: object, sockets: object[], seconds: number}>}
 * The sockets stay connected; the caller disconnects them.
 */
async function pollingLoad(
  sticky,
  { label, lang, clients, messages, transports = ['polling'], timeout = 30000, agent = undefined },
) {
  const tally = {
    connected: 0,
    connectErrors: 0,
    sessionIdUnknown: 0, // HTTP 400 answers with that text, seen by the clients
    transportErrors: 0,
    disconnects: 0,
    echoed: 0,
    wrongEcho: 0,
    ackTimeouts: 0,
    otherWorker: 0, // a session's whoami answered by another worker than its hello
    wrongLang: 0,
    onWebSocket: 0, // sessions on the WebSocket transport at the end (upgraded)
  };
  const errors = [];
  const perWorker = {};
  const sockets = [];
  const note = (kind, err) => {
    const text = `${err && err.message} ${err && err.description} ${
      err && err.context && err.context.responseText ? err.context.responseText : ''
    }`;
    // Engine.IO (Node, Rust): "Session ID unknown"; python-engineio: "Invalid session".
    if (/Session ID unknown|Invalid session/.test(text)) tally.sessionIdUnknown++;
    if (errors.length < 10) errors.push(`${kind}: ${text.trim()}`);
  };

  const before = await h.stats(sticky);
  const t0 = performance.now();
  const connectTimes = [];
  const echoTimes = [];

  async function client(i) {
    const c0 = performance.now();
    const socket = h.ioClient(sticky.url, { transports, reconnection: false, forceNew: true, timeout, agent });
    sockets.push(socket);
    socket.io.on('error', (err) => {
      tally.transportErrors++;
      note('transport error', err);
    });
    socket.on('disconnect', (reason) => {
      if (reason !== 'io client disconnect') {
        tally.disconnects++;
        if (errors.length < 10) errors.push(`client ${i} disconnect: ${reason}`);
      }
    });
    const hello = await new Promise((resolve, reject) => {
      socket.once('hello', resolve);
      socket.once('connect_error', (err) => {
        tally.connectErrors++;
        note('connect_error', err);
        reject(err);
      });
    }).catch(() => null);
    if (!hello) return;
    tally.connected++;
    if (lang && hello.lang !== lang) tally.wrongLang++;
    connectTimes.push(performance.now() - c0);
    perWorker[hello.worker] = (perWorker[hello.worker] || 0) + 1;
    for (let m = 0; m < messages; m++) {
      const payload = { client: i, m, text: `message ${m} of client ${i}` };
      const e0 = performance.now();
      try {
        const back = await socket.timeout(timeout).emitWithAck('echo', payload);
        echoTimes.push(performance.now() - e0);
        if (back && back.client === i && back.m === m && back.text === payload.text) tally.echoed++;
        else tally.wrongEcho++;
      } catch (err) {
        tally.ackTimeouts++;
        note('ack', err);
        return;
      }
    }
    try {
      const me = await socket.timeout(timeout).emitWithAck('whoami');
      if (me.worker !== hello.worker || me.pid !== hello.pid) tally.otherWorker++;
    } catch (err) {
      note('whoami', err);
    }
    if (socket.io.engine && socket.io.engine.transport.name === 'websocket') tally.onWebSocket++;
  }

  await Promise.all(Array.from({ length: clients }, (_, i) => client(i)));
  const seconds = (performance.now() - t0) / 1000;
  const after = await h.stats(sticky);
  const delta = (k) => (after[k] ?? 0) - (before[k] ?? 0);

  console.log(
    `[${label}] ${clients} ${transports.join('+')} clients x ${messages} echoes in ${seconds.toFixed(2)} s: ` +
      `${tally.echoed}/${clients * messages} echoed (${(tally.echoed / seconds).toFixed(0)} msg/s), ` +
      `connected ${tally.connected}, connect_error ${tally.connectErrors}, ` +
      `"Session ID unknown" ${tally.sessionIdUnknown}, transport errors ${tally.transportErrors}, ` +
      `unexpected disconnects ${tally.disconnects}, ack timeouts ${tally.ackTimeouts}, ` +
      `wrong echoes ${tally.wrongEcho}, whoami on another worker ${tally.otherWorker}, ` +
      `on WebSocket at the end ${tally.onWebSocket}`,
  );
  console.log(
    `[${label}] connect p50 ${pct(connectTimes, 50).toFixed(1)} ms p99 ${pct(connectTimes, 99).toFixed(1)} ms; ` +
      `echo round trip p50 ${pct(echoTimes, 50).toFixed(1)} ms p99 ${pct(echoTimes, 99).toFixed(1)} ms; ` +
      `sessions per worker ${JSON.stringify(perWorker)}`,
  );
  console.log(
    `[${label}] sticky over the run: connections ${delta('syn')}, by_sid ${delta('by_sid')}, ` +
      `balanced ${delta('balanced')}, sid_unknown ${delta('sid_unknown')}, placed_softirq ${delta('placed_softirq')}, ` +
      `placed_queue ${delta('placed_queue')}, learned ${delta('learned')}, learn_known ${delta('learn_known')}; ` +
      `now sessions ${after.sessions}, learned_sessions ${after.learned_sessions}`,
  );
  if (errors.length) console.log(`[${label}] first errors:\n  ${errors.join('\n  ')}`);
  return { tally, delta, after, sockets, seconds };
}

module.exports = { pollingLoad };
