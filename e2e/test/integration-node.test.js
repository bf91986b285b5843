'use strict';

// @sticky/socket.io's setupWorker with a real socket.io server in this
// process and a fake control socket (no sticky): the registration happens
// before the handshake answer, unregistration on close, refusal when the
// control socket is unreachable, Connection: close, and plain listen(port)
// when not socket-activated.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { Server } = require('socket.io');
const { setupWorker } = require('../../integrations/node');
const h = require('../lib/harness');

const REGISTER_DELAY = 150; // ms the fake sticky takes to answer an open

function fakeControl(socketPath, { delay = 0, answer = () => 'ok' } = {}) {
  const events = [];
  const server = net.createServer((conn) => {
    let buf = '';
    conn.setEncoding('utf8');
    conn.on('error', () => {});
    conn.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        events.push({ line, at: performance.now() });
        setTimeout(() => conn.write(answer(line) + '\n'), line.startsWith('open') ? delay : 0);
      }
    });
  });
  return {
    events,
    listen: () => new Promise((r) => server.listen(socketPath, r)),
    close: () => new Promise((r) => server.close(r)),
  };
}

function makeServer(env, options = {}) {
  const httpServer = http.createServer((req, res) => {
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, { cors: { origin: '*', methods: ['GET', 'POST'] } });
  io.on('connection', (socket) => {
    socket.on('echo', (p, ack) => ack(p));
  });
  const sticky = setupWorker(io, { env, logger: false, ...options });
  return { httpServer, io, sticky };
}

describe('setupWorker with a fake control socket', () => {
  let dir, fake, srv, port;
  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-int-'));
    const control = path.join(dir, 'control.sock');
    fake = fakeControl(control, { delay: REGISTER_DELAY });
    await fake.listen();
    srv = makeServer({ STICKY_CONTROL: control });
    assert.equal(srv.sticky.activated, false);
    const address = await srv.sticky.listen(0, '127.0.0.1');
    port = address.port;
  });
  after(async () => {
    srv.sticky.close();
    srv.io.close();
    await fake.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('open <sid> is answered before the handshake response leaves', async () => {
    const t0 = performance.now();
    const hs = await h.handshakeRaw(port);
    const elapsed = performance.now() - t0;
    const open = fake.events.find((e) => e.line === `open ${hs.sid}`);
    assert.ok(open, `open ${hs.sid} sent`);
    assert.ok(open.at < t0 + elapsed, 'sent before the answer arrived');
    assert.ok(elapsed >= REGISTER_DELAY - 5, `the handshake waited for ok (${elapsed.toFixed(0)} ms)`);
    console.log(`[integration] handshake with a ${REGISTER_DELAY} ms registration: ${elapsed.toFixed(0)} ms`);
    await h.closeRaw(port, hs.sid);
    await h.waitFor('close <sid>', () => fake.events.some((e) => e.line === `close ${hs.sid}`));
  });

  test('a socket.io client session: open, then close on disconnect', async () => {
    const socket = h.ioClient(`http://127.0.0.1:${port}`, { reconnection: false, forceNew: true });
    await new Promise((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('connect_error', reject);
    });
    const sid = socket.io.engine.id;
    assert.deepEqual(await h.emitAck(socket, 'echo', 'x'), 'x');
    assert.ok(fake.events.some((e) => e.line === `open ${sid}`));
    socket.disconnect();
    await h.waitFor('close <sid>', () => fake.events.some((e) => e.line === `close ${sid}`));
  });

  test('Connection: close on polling GET and POST answers, not on the WebSocket upgrade', async () => {
    const hs = await h.handshakeRaw(port);
    assert.match(hs.response.headers.connection, /close/i);
    assert.equal(hs.response.closed, true);
    const post = await h.rawRequest(port, 'POST', `${h.EIO}&sid=${hs.sid}`, { body: '40' });
    assert.equal(post.status, 200);
    assert.match(post.headers.connection, /close/i);
    assert.equal(post.closed, true);
    const get = await h.rawRequest(port, 'GET', `${h.EIO}&sid=${hs.sid}`);
    assert.equal(get.status, 200);
    assert.match(get.headers.connection, /close/i);
    assert.equal(get.closed, true);
    await h.closeRaw(port, hs.sid);
    // The upgrade answer keeps "Connection: Upgrade".
    const sock = await h.connectRaw(port);
    try {
      sock.write(
        h.httpRequestText('GET', '/socket.io/?EIO=4&transport=websocket', {
          headers: {
            Connection: 'Upgrade',
            Upgrade: 'websocket',
            'Sec-WebSocket-Version': '13',
            'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==',
          },
        }),
      );
      const head = await new Promise((resolve) => {
        let text = '';
        sock.setEncoding('latin1');
        sock.on('data', (d) => {
          text += d;
          if (text.includes('\r\n\r\n')) resolve(text.slice(0, text.indexOf('\r\n\r\n')));
        });
      });
      assert.match(head, /^HTTP\/1\.1 101 /);
      assert.match(head, /\r\nConnection: Upgrade/i);
      assert.doesNotMatch(head, /Connection: close/i);
    } finally {
      sock.destroy();
    }
  });

  test('other routes of the same HTTP server are left alone', async () => {
    const res = await h.rawRequest(port, 'GET', '/elsewhere');
    assert.equal(res.status, 404);
    assert.equal(res.headers.connection, 'keep-alive');
  });
});

describe('setupWorker when the control socket is unreachable', () => {
  let srv, port;
  before(async () => {
    srv = makeServer(
      { STICKY_CONTROL: path.join(os.tmpdir(), `sticky-nowhere-${process.pid}.sock`) },
      { registerTimeout: 200, controlOptions: { backoffMin: 20, backoffMax: 100 } },
    );
    port = (await srv.sticky.listen(0, '127.0.0.1')).port;
  });
  after(() => {
    srv.sticky.close();
    srv.io.close();
  });

  test('a polling handshake is refused (HTTP 400) after registerTimeout', async () => {
    const t0 = performance.now();
    const res = await h.rawRequest(port, 'GET', h.EIO);
    const ms = performance.now() - t0;
    assert.equal(res.status, 400);
    assert.ok(ms >= 190, `waited ${ms.toFixed(0)} ms`);
  });

  test('a WebSocket-only session is served unregistered', async () => {
    const { socket } = await new Promise((resolve, reject) => {
      const socket = h.ioClient(`http://127.0.0.1:${port}`, {
        transports: ['websocket'],
        reconnection: false,
        forceNew: true,
      });
      socket.once('connect', () => resolve({ socket }));
      socket.once('connect_error', reject);
    });
    assert.deepEqual(await h.emitAck(socket, 'echo', 1), 1);
    socket.disconnect();
  });
});

describe('setupWorker without sticky', () => {
  test('no STICKY_CONTROL: sessions are not registered, listen(port) binds normally', async () => {
    const srv = makeServer({});
    assert.equal(srv.sticky.control, null);
    assert.equal(srv.sticky.worker, null);
    const address = await srv.sticky.listen(0, '127.0.0.1');
    try {
      const socket = h.ioClient(`http://127.0.0.1:${address.port}`, { reconnection: false, forceNew: true });
      await new Promise((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('connect_error', reject);
      });
      assert.deepEqual(await h.emitAck(socket, 'echo', { a: 1 }), { a: 1 });
      socket.disconnect();
    } finally {
      srv.sticky.close();
      srv.io.close();
    }
  });

  test('the e2e worker runs alone on $PORT', async () => {
    const { spawn } = require('node:child_process');
    const child = spawn(process.execPath, [path.join(__dirname, '../workers/node-worker.js')], {
      env: { ...process.env, PORT: '0', LISTEN_FDS: '', LISTEN_PID: '', STICKY_CONTROL: '' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    try {
      const line = await new Promise((resolve, reject) => {
        let out = '';
        child.stdout.on('data', (d) => {
          out += d;
          const m = /listening on 127\.0\.0\.1:(\d+)/.exec(out);
          if (m) resolve(Number(m[1]));
        });
        child.once('exit', (code) => reject(new Error(`worker exited ${code}`)));
      });
      const { socket, hello } = await h.connectClient(`http://127.0.0.1:${line}`);
      assert.equal(hello.lang, 'node');
      assert.equal(hello.pid, child.pid);
      socket.disconnect();
    } finally {
      child.kill('SIGKILL');
    }
  });
});
