'use strict';

// The broadcast scenario of test/cluster.test.js, for any worker that
// implements workers/cluster-app.js's events: 30 socket.io clients over 3
// workers (a third long-polling only, a third WebSocket only, a third
// polling then upgrade), then io.emit to everyone, a room broadcast,
// binary payloads, fetchSockets() and serverSideEmit with acks, each
// asserted exactly; then a worker SIGKILLed, its clients reconnected once
// sticky restarted it, and everything again.

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const h = require('./harness');

const CLIENTS = 30;
const TRANSPORTS = [
  { name: 'polling', options: { transports: ['polling'] } },
  { name: 'websocket', options: { transports: ['websocket'] } },
  { name: 'upgrade', options: { transports: ['polling', 'websocket'] } },
];
const ROOM = 'red';
/** How long a client that must not get a message is watched after the others got it. */
const QUIET_MS = 300;

async function connectAll(url, indices) {
  return Promise.all(
    indices.map(async (i) => {
      const t = TRANSPORTS[i % TRANSPORTS.length];
      // 20 s: on a loaded 2-CPU machine, 30 handshakes to freshly started
      // Python workers can take longer than the harness's default 10 s.
      const c = await h.connectClient(url, t.options, 20000);
      return { index: i, transport: t.name, ...c, worker: c.hello.worker, pid: c.hello.pid };
    }),
  );
}

/** Resolves with the first `event` payload each client gets after `trigger`. */
async function collect(clients, event, trigger, timeoutMs = 10000) {
  const got = new Map();
  const listeners = [];
  const all = new Promise((resolve) => {
    for (const c of clients) {
      const onEvent = (payload) => {
        if (!got.has(c.index)) got.set(c.index, payload);
        if (got.size === clients.length) resolve();
      };
      c.socket.on(event, onEvent);
      listeners.push(() => c.socket.off(event, onEvent));
    }
  });
  const started = performance.now();
  await trigger();
  await Promise.race([all, h.sleep(timeoutMs)]);
  const ms = performance.now() - started;
  return { got, ms, done: () => listeners.forEach((off) => off()) };
}

function samePayload(a, b) {
  return a && b && a.n === b.n && Buffer.isBuffer(a.bin) && Buffer.compare(a.bin, b.bin) === 0;
}

/** One full round over `clients`; returns its figures. */
async function round(clients, caps, label) {
  const workers = new Set(clients.map((c) => c.pid));
  assert.equal(workers.size, 3, `${label}: clients on ${workers.size} workers, expected 3`);
  const byWorker = new Map();
  for (const c of clients) if (!byWorker.has(c.pid)) byWorker.set(c.pid, c);
  const senders = [...byWorker.values()];
  const figures = { label, emits: 0, delivered: 0, roomDelivered: 0, roomLeaks: 0 };

  // io.emit from a client of each worker: everyone gets it, binary intact.
  for (const [k, sender] of senders.entries()) {
    const payload = { n: k, bin: crypto.randomBytes(1024 + k) };
    const r = await collect(clients, 'shout', () => h.emitAck(sender.socket, 'shout', payload));
    r.done();
    const ok = clients.filter((c) => samePayload(r.got.get(c.index), payload));
    figures.emits += 1;
    figures.delivered += ok.length;
    assert.equal(ok.length, clients.length,
      `${label}: io.emit from worker ${sender.worker}: ${ok.length}/${clients.length} clients got it intact ` +
        `(missing: ${clients.filter((c) => !ok.includes(c)).map((c) => `${c.index}@w${c.worker}/${c.transport}`).join(' ')})`);
  }

  // A room over every worker, broadcast from a worker by a non-member.
  // Every other client of each worker: the room spans every worker.
  const seen = new Map();
  const members = clients.filter((c) => {
    const k = (seen.get(c.pid) || 0) + 1;
    seen.set(c.pid, k);
    return k % 2 === 1;
  });
  // A room of this round's own: the clients that joined an earlier round's
  // room stay in it, and after a restart the members are other clients.
  const room = `${ROOM}-${label}`;
  await Promise.all(members.map((c) => h.emitAck(c.socket, 'join', room)));
  assert.equal(new Set(members.map((c) => c.pid)).size, 3, `${label}: the room spans every worker`);
  const others = clients.filter((c) => !members.includes(c));
  const outsider = others[0];
  const payload = { n: 99, bin: crypto.randomBytes(512) };
  const r = await collect(members, 'shout-room', () => outsider.socket.timeout(10000).emitWithAck('shout-room', room, payload));
  r.done();
  let leaks = 0;
  const onLeak = () => (leaks += 1);
  for (const c of others) c.socket.on('shout-room', onLeak);
  await h.sleep(QUIET_MS);
  for (const c of others) c.socket.off('shout-room', onLeak);
  figures.roomDelivered = members.filter((c) => samePayload(r.got.get(c.index), payload)).length;
  figures.roomLeaks = leaks;
  assert.equal(figures.roomDelivered, members.length, `${label}: room members that got the room broadcast`);
  assert.equal(leaks, 0, `${label}: clients outside the room that got the room broadcast`);

  if (caps.fetchSockets) {
    figures.counts = [];
    for (const s of senders) {
      const { count, error } = await h.emitAck(s.socket, 'count');
      assert.equal(error, undefined, `${label}: fetchSockets on worker ${s.worker}: ${error}`);
      figures.counts.push(count);
      assert.equal(count, clients.length, `${label}: fetchSockets() on worker ${s.worker}`);
    }
  }
  if (caps.serverSideEmit) {
    figures.answers = [];
    for (const s of senders) {
      const { error, answers } = await h.emitAck(s.socket, 'ask-others');
      assert.equal(error, null, `${label}: serverSideEmit from worker ${s.worker}: ${error}`);
      const pids = answers.map((a) => a.pid).sort();
      const expected = [...workers].filter((p) => p !== s.pid).sort();
      assert.deepEqual(pids, expected, `${label}: serverSideEmit from worker ${s.worker} answered by every other worker`);
      figures.answers.push(answers.length);
    }
  }
  return figures;
}

/**
 * The whole scenario against a running sticky (3 workers).
 * @param {{fetchSockets: boolean, serverSideEmit: boolean}} caps what the
 *   worker's library offers across workers
 */
async function scenario(sticky, caps, name) {
  const log = (line) => console.log(`# ${name}: ${line}`);
  let clients = await connectAll(sticky.url, [...Array(CLIENTS).keys()]);
  try {
    const spread = {};
    for (const c of clients) spread[`w${c.worker}`] = (spread[`w${c.worker}`] || 0) + 1;
    log(`${clients.length} clients connected, per worker ${JSON.stringify(spread)}`);
    const t0 = performance.now();
    const before = await round(clients, caps, `${name} before kill`);
    log(`before kill: ${JSON.stringify(before)} in ${(performance.now() - t0).toFixed(0)} ms`);

    // SIGKILL one worker; sticky restarts it; its clients reconnect.
    const victim = clients[0];
    const lost = clients.filter((c) => c.pid === victim.pid);
    const kept = clients.filter((c) => c.pid !== victim.pid);
    process.kill(victim.pid, 'SIGKILL');
    const killedAt = performance.now();
    await h.waitFor(`worker ${victim.worker} restarted`, async () => {
      const st = await h.stats(sticky);
      const m = /pid:(\d+)/.exec(st[`worker${victim.worker}`] || '');
      return m && Number(m[1]) !== victim.pid;
    }, { timeout: 15000 });
    for (const c of lost) c.socket.disconnect();
    // Reconnect until they land on all three workers again (balancing
    // spreads new sessions; the restarted worker has none yet).
    const again = await connectAll(sticky.url, lost.map((c) => c.index));
    clients = [...kept, ...again].sort((a, b) => a.index - b.index);
    log(`worker ${victim.worker} (pid ${victim.pid}) SIGKILLed, restarted; ${lost.length} clients reconnected ` +
      `in ${(performance.now() - killedAt).toFixed(0)} ms, per worker ${JSON.stringify(countBy(clients))}`);
    const after = await round(clients, caps, `${name} after restart`);
    log(`after restart: ${JSON.stringify(after)}`);
    const st = await h.stats(sticky);
    log(`relay counters: ${Object.entries(st).filter(([k]) => k.startsWith('relay_')).map(([k, v]) => `${k}=${v}`).join(' ')}`);
    return { before, after, stats: st };
  } finally {
    for (const c of clients) c.socket.disconnect();
  }
}

function countBy(clients) {
  const out = {};
  for (const c of clients) out[`w${c.worker}`] = (out[`w${c.worker}`] || 0) + 1;
  return out;
}

module.exports = { scenario, CLIENTS };
