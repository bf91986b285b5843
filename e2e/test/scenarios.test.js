'use strict';

// Socket.IO clients through a real `sticky run` with 3 workers, for each
// balancing method: every transport combination, reconnections, a 1 MB
// binary message, CORS preflight, and no live worker at all.
//
// sticky runs with --learn off (E2E_LEARN): the workers' registration routes.
// Worker languages: E2E_SCENARIO_LANGS (comma-separated, default
// "node,python,rust"; a language whose worker is missing is skipped).

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const h = require('../lib/harness');

const LANGS = (process.env.E2E_SCENARIO_LANGS || 'node,python,rust').split(',').map((s) => s.trim()).filter(Boolean);

for (const lang of LANGS) {
  const worker = h.workerFor(lang);
  for (const balance of h.BALANCES) {
    describe(`${lang} workers, --balance ${balance}`, { skip: worker.skip }, () => {
      let sticky;
      const open = new Set();
      const track = (conn) => {
        open.add(conn.socket);
        return conn;
      };

      before(async () => {
        sticky = await h.startSticky({ balance, command: worker.command });
      });
      after(async () => {
        for (const s of open) s.disconnect();
        await h.stopSticky(sticky);
      });

      test('polling, then upgrade to WebSocket', async () => {
        const { socket, hello, initialTransport, upgraded } = track(await h.connectClient(sticky.url));
        assert.equal(hello.lang, lang);
        assert.equal(initialTransport, 'polling');
        assert.equal(await upgraded, 'websocket');
        assert.equal(socket.io.engine.transport.name, 'websocket');
        assert.deepEqual(await h.emitAck(socket, 'echo', { n: 1, s: 'after upgrade' }), { n: 1, s: 'after upgrade' });
        const me = await h.emitAck(socket, 'whoami');
        assert.equal(me.worker, hello.worker);
        assert.equal(me.pid, hello.pid);
        socket.disconnect();
      });

      test('polling only', async () => {
        const { socket, hello } = track(await h.connectClient(sticky.url, { transports: ['polling'] }));
        const t0 = performance.now();
        for (let i = 0; i < 20; i++) {
          assert.deepEqual(await h.emitAck(socket, 'echo', { i }), { i });
        }
        const ms = performance.now() - t0;
        const me = await h.emitAck(socket, 'whoami');
        assert.equal(me.worker, hello.worker, 'every request of the session reached its owner');
        assert.equal(socket.io.engine.transport.name, 'polling');
        console.log(`[${lang} ${balance}] polling only: 20 echoes in ${ms.toFixed(1)} ms, worker ${hello.worker}`);
        socket.disconnect();
      });

      test('WebSocket only', async () => {
        const { socket, hello } = track(await h.connectClient(sticky.url, { transports: ['websocket'] }));
        assert.equal(socket.io.engine.transport.name, 'websocket');
        assert.deepEqual(await h.emitAck(socket, 'echo', 'ws only'), 'ws only');
        assert.equal((await h.emitAck(socket, 'whoami')).worker, hello.worker);
        socket.disconnect();
      });

      test('three disconnect / reconnect cycles', async () => {
        const { socket, hello } = track(await h.connectClient(sticky.url));
        const seen = [hello.worker];
        let sid = socket.io.engine.id;
        for (let cycle = 1; cycle <= 3; cycle++) {
          socket.disconnect();
          assert.equal(socket.connected, false);
          const helloAgain = new Promise((resolve, reject) => {
            socket.once('hello', resolve);
            socket.once('connect_error', reject);
          });
          socket.connect();
          const again = await helloAgain;
          assert.notEqual(socket.io.engine.id, sid, 'a new Engine.IO session');
          sid = socket.io.engine.id;
          assert.deepEqual(await h.emitAck(socket, 'echo', { cycle }), { cycle });
          assert.equal((await h.emitAck(socket, 'whoami')).worker, again.worker);
          seen.push(again.worker);
        }
        console.log(`[${lang} ${balance}] reconnect cycles: workers ${seen.join(' -> ')}`);
        socket.disconnect();
      });

      test('1 MB binary message echoed, over polling and over WebSocket', async () => {
        const payload = crypto.randomBytes(1_000_000);
        for (const transports of [['polling'], ['websocket']]) {
          const { socket } = track(await h.connectClient(sticky.url, { transports }));
          const t0 = performance.now();
          const back = await h.emitAck(socket, 'echo', payload, 20000);
          const ms = performance.now() - t0;
          assert.ok(Buffer.isBuffer(back), `binary preserved over ${transports[0]}`);
          assert.equal(Buffer.compare(back, payload), 0, `1 MB intact over ${transports[0]}`);
          console.log(`[${lang} ${balance}] 1 MB echo over ${transports[0]}: ${ms.toFixed(1)} ms`);
          socket.disconnect();
        }
      });

      test('CORS preflight answered by the workers', async () => {
        const origin = 'http://app.example';
        // Preflights of a handshake (no sid) and of a live session's requests.
        const { sid } = await h.handshakeRaw(sticky.port);
        const sids = [sid];
        try {
          for (const target of [h.EIO, `${h.EIO}&sid=${sid}`]) {
            for (const method of ['GET', 'POST']) {
              const res = await h.rawRequest(sticky.port, 'OPTIONS', target, {
                headers: {
                  Origin: origin,
                  'Access-Control-Request-Method': method,
                  'Access-Control-Request-Headers': 'content-type',
                },
              });
              const what = `preflight ${method} ${target.includes('sid=') ? 'with' : 'without'} sid`;
              assert.ok(res.status === 204 || res.status === 200, `${what}: status ${res.status}`);
              const allow = res.headers['access-control-allow-origin'];
              assert.ok(allow === '*' || allow === origin, `${what}: Access-Control-Allow-Origin: ${allow}`);
              const methods = (res.headers['access-control-allow-methods'] || '').toUpperCase().split(/\s*,\s*/);
              assert.ok(methods.includes(method), `${what}: Access-Control-Allow-Methods: ${methods}`);
            }
          }
          // And the actual cross-origin request carries the allow header.
          const res = await h.rawRequest(sticky.port, 'GET', h.EIO, { headers: { Origin: origin } });
          assert.equal(res.status, 200);
          sids.push(JSON.parse(res.body.slice(1)).sid);
          const allow = res.headers['access-control-allow-origin'];
          assert.ok(allow === '*' || allow === origin, `Access-Control-Allow-Origin: ${allow}`);
        } finally {
          for (const s of sids) await h.closeRaw(sticky.port, s);
        }
      });

      test("a killed worker: sticky restarts it, its clients reconnect, the others' are undisturbed", async () => {
        const opts = { transports: ['polling'], reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 500 };
        const conns = [];
        for (let i = 0; i < 3; i++) conns.push(track(await h.connectClient(sticky.url, opts)));
        const victim = conns[0].hello;
        const others = conns.filter((c) => c.hello.worker !== victim.worker);
        const sidsBefore = others.map((c) => c.socket.io.engine.id);
        const rehello = new Promise((resolve) => conns[0].socket.once('hello', resolve));
        const t0 = performance.now();
        process.kill(victim.pid, 'SIGKILL');
        const again = await rehello;
        const ms = performance.now() - t0;
        assert.notEqual(again.pid, victim.pid);
        assert.deepEqual(await h.emitAck(conns[0].socket, 'echo', 'back'), 'back');
        assert.equal((await h.emitAck(conns[0].socket, 'whoami')).pid, again.pid);
        for (const [i, c] of others.entries()) {
          assert.equal(c.socket.io.engine.id, sidsBefore[i], 'other sessions kept');
          assert.equal((await h.emitAck(c.socket, 'whoami')).pid, c.hello.pid);
        }
        await h.waitFor(`worker ${victim.worker} restarted`, async () => {
          const w = String((await h.stats(sticky))[`worker${victim.worker}`] || '');
          return w.startsWith('pid:') && !w.startsWith(`pid:${victim.pid},`);
        });
        console.log(
          `[${lang} ${balance}] killed worker ${victim.worker} (pid ${victim.pid}); its client back on ` +
            `worker ${again.worker} (pid ${again.pid}) in ${ms.toFixed(0)} ms`,
        );
        for (const c of conns) c.socket.disconnect();
      });

      test('new sessions are spread by the balancing method', async () => {
        // Quiesce: earlier sessions unregister when they close.
        await h.waitFor('sessions=0', async () => (await h.stats(sticky)).sessions === 0);
        const conns = [];
        for (let i = 0; i < 6; i++) {
          conns.push(track(await h.connectClient(sticky.url, { transports: ['polling'] })));
        }
        const perWorker = [0, 0, 0];
        for (const c of conns) perWorker[c.hello.worker]++;
        console.log(`[${lang} ${balance}] 6 sessions per worker: ${perWorker.join(' / ')}`);
        if (balance !== 'random') {
          assert.deepEqual(perWorker, [2, 2, 2], `${balance} spreads 6 sessions evenly`);
        }
        const st = await h.stats(sticky);
        assert.equal(st.sessions, 6, 'sticky holds the 6 live sessions');
        for (const c of conns) c.socket.disconnect();
        await h.waitFor('all sessions unregistered', async () => (await h.stats(sticky)).sessions === 0);
      });
    });
  }
}

// No live worker: independent of the worker language.
for (const balance of h.BALANCES) {
  describe(`no live worker, --balance ${balance}`, () => {
    let sticky;
    before(async () => {
      // Workers that exit at once: sticky restarts them with a growing
      // backoff; wait until each has exited 3 times (next restart in
      // >= 800 ms) and the supervisor counts no live worker.
      sticky = await h.startSticky({ balance, command: ['/bin/sh', '-c', 'exit 0'] });
      await h.waitFor('workers in backoff', () => (sticky.stderr().match(/restarting in/g) || []).length >= 9, {
        timeout: 15000,
      });
      await h.waitFor('live_workers=0', async () => (await h.stats(sticky)).live_workers === 0);
    });
    after(() => h.stopSticky(sticky));

    test('a client gets connect_error', async () => {
      const socket = h.ioClient(sticky.url, { reconnection: false, forceNew: true, timeout: 5000 });
      const err = await new Promise((resolve, reject) => {
        socket.once('connect', () => reject(new Error('connected with no live worker')));
        socket.once('connect_error', resolve);
      });
      socket.disconnect();
      console.log(`[${balance}] no worker: connect_error "${err.message}" (${err.description ?? ''})`);
      assert.equal(err.description, 503);
    });

    test('a raw GET gets HTTP 503', async () => {
      const res = await h.rawRequest(sticky.port, 'GET', h.EIO);
      assert.equal(res.status, 503);
      assert.equal(res.closed, true, 'and the connection is closed');
      const st = await h.stats(sticky);
      assert.ok(st.rejected >= 2, `rejected=${st.rejected}`);
    });
  });
}
