'use strict';

// The client side of `cargo xtask soak`: N socket.io-client sessions (a
// third long-polling only, a third WebSocket only, a third polling then
// upgrade) against one sticky address, each sending a sequence-numbered
// `echo` with an ack every --interval-ms while connected, reconnecting by
// itself when its worker goes away. Prints `SOAK_PROGRESS {json}` every
// 10 s and `SOAK_RESULT {json}` at the end.
//
// With --lifetime-ms MIN-MAX (`cargo xtask deploy`) each session ends by
// itself after a random lifetime in that range and a new one takes its
// place, like page views: N sessions stay open, and `cut` counts the
// sessions that ended any other way (their server went away).
//
// usage: node e2e/soak/client.js --url http://127.0.0.1:PORT --sessions N
//          --seconds S [--interval-ms 2000] [--ack-timeout-ms 10000]
//          [--lifetime-ms MIN-MAX]

const { io } = require('socket.io-client');

function options(argv) {
  const o = { sessions: 2000, seconds: 600, intervalMs: 2000, ackTimeoutMs: 10000, url: null, lifetimeMs: null };
  for (let i = 2; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (k === '--url') o.url = v;
    else if (k === '--sessions') o.sessions = Number(v);
    else if (k === '--seconds') o.seconds = Number(v);
    else if (k === '--interval-ms') o.intervalMs = Number(v);
    else if (k === '--ack-timeout-ms') o.ackTimeoutMs = Number(v);
    else if (k === '--lifetime-ms') o.lifetimeMs = v.split('-').map(Number);
    else throw new Error(`unknown argument ${k}`);
  }
  if (!o.url) throw new Error('--url is required');
  return o;
}

const TRANSPORTS = [['polling'], ['websocket'], ['polling', 'websocket']];

function main() {
  const o = options(process.argv);
  const t0 = Date.now();
  const now = () => (Date.now() - t0) / 1000;
  const tally = {
    sessions: o.sessions,
    sent: 0,
    acked: 0,
    lost: 0,
    wrongEcho: 0,
    otherWorker: 0,
    connects: 0,
    reconnects: 0,
    connectErrors: 0,
    sessionIdUnknown: 0,
    connectedNow: 0,
    disconnects: {},
    // sessions ended by their own lifetime (--lifetime-ms), and the others
    ended: 0,
    cut: 0,
    // second of the run -> sessions cut then
    cutAt: {},
    // second of the run -> messages lost (ack timed out) that were sent then
    lostAt: {},
  };
  let sending = true;
  let outstanding = 0;
  const sockets = [];

  function session(i) {
    let ending = false;
    let mine = 0; // this session's echoes awaiting their ack
    const transports = TRANSPORTS[i % TRANSPORTS.length];
    const socket = io(o.url, {
      transports,
      forceNew: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 3000,
      timeout: 20000,
    });
    sockets.push(socket);
    let seq = 0;
    let hello = null;
    let everConnected = false;
    socket.on('hello', (me) => {
      hello = me;
    });
    socket.on('connect', () => {
      tally.connects++;
      tally.connectedNow++;
      if (everConnected) tally.reconnects++;
      everConnected = true;
    });
    socket.on('disconnect', (reason) => {
      tally.connectedNow--;
      hello = null;
      tally.disconnects[reason] = (tally.disconnects[reason] || 0) + 1;
      if (!ending && sending) {
        tally.cut++;
        const t = Math.floor(now());
        tally.cutAt[t] = (tally.cutAt[t] || 0) + 1;
      }
    });
    socket.on('connect_error', (err) => {
      tally.connectErrors++;
      const text = `${err && err.message} ${err && err.context && err.context.responseText}`;
      if (/Session ID unknown/.test(text)) tally.sessionIdUnknown++;
    });
    socket.io.on('error', (err) => {
      const text = `${err && err.message} ${err && err.context && err.context.responseText}`;
      if (/Session ID unknown/.test(text)) tally.sessionIdUnknown++;
    });
    const send = () => {
      if (!sending || !socket.connected) return;
      const m = ++seq;
      const sentAt = Math.floor(now());
      const payload = { session: i, seq: m };
      const helloThen = hello;
      tally.sent++;
      outstanding++;
      mine++;
      socket.timeout(o.ackTimeoutMs).emit('echo', payload, (err, back) => {
        outstanding--;
        mine--;
        if (err) {
          tally.lost++;
          tally.lostAt[sentAt] = (tally.lostAt[sentAt] || 0) + 1;
          return;
        }
        tally.acked++;
        if (!back || back.session !== i || back.seq !== m) tally.wrongEcho++;
      });
      // Every 10th message: is this session still on the worker that said
      // hello on this connection?
      if (m % 10 === 0 && helloThen) {
        socket.timeout(o.ackTimeoutMs).emit('whoami', (err, me) => {
          if (!err && socket.connected && hello === helloThen && (me.worker !== hello.worker || me.pid !== hello.pid)) {
            tally.otherWorker++;
          }
        });
      }
    };
    // Spread the sends of all sessions over the interval.
    let sender = null;
    const first = setTimeout(() => {
      send();
      sender = setInterval(send, o.intervalMs);
    }, Math.random() * o.intervalMs);
    if (o.lifetimeMs) {
      const [min, max] = o.lifetimeMs;
      setTimeout(() => {
        if (!sending) return;
        ending = true;
        clearTimeout(first);
        clearInterval(sender);
        tally.ended++;
        // Its last acks arrive, then it closes; a new session takes its place.
        const since = Date.now();
        const close = setInterval(() => {
          if (mine > 0 && Date.now() - since < o.ackTimeoutMs) return;
          clearInterval(close);
          socket.disconnect();
        }, 50);
        session(i);
      }, min + Math.random() * (max - min));
    }
  }

  // Open the sessions over the first 10 s rather than all at once.
  const rampMs = Math.min(10000, (o.seconds * 1000) / 4);
  for (let i = 0; i < o.sessions; i++) setTimeout(() => session(i), (i * rampMs) / o.sessions);

  const snapshot = () => JSON.stringify({ t: now(), ...tally, outstanding });
  const progress = setInterval(() => console.log(`SOAK_PROGRESS ${snapshot()}`), 10000);
  setTimeout(() => {
    sending = false;
    const waitStart = Date.now();
    const done = setInterval(() => {
      if (outstanding === 0 || Date.now() - waitStart > o.ackTimeoutMs + 2000) {
        clearInterval(done);
        clearInterval(progress);
        console.log(`SOAK_RESULT ${snapshot()}`);
        for (const s of sockets) s.disconnect();
        process.exit(0);
      }
    }, 100);
  }, o.seconds * 1000);
}

main();
