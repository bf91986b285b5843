'use strict';

// The control client against a fake control socket (a unix stream server
// speaking sticky's line protocol); the client is what is under test.

const { test, describe, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { ControlClient, ControlError, activationFd, workerIndex } = require('..');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * A fake sticky: answers each line with respond(line, conn) (a string, or
 * null for no answer). Records every line received.
 */
function fakeSticky(respond = () => 'ok') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-control-test-'));
  const socketPath = path.join(dir, 'control.sock');
  const fake = { path: socketPath, lines: [], conns: new Set(), connections: 0 };
  const server = net.createServer((conn) => {
    fake.connections++;
    fake.conns.add(conn);
    conn.on('close', () => fake.conns.delete(conn));
    conn.on('error', () => {});
    let buf = '';
    conn.setEncoding('utf8');
    conn.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        fake.lines.push(line);
        const answer = respond(line, conn);
        if (answer !== null && answer !== undefined && !conn.destroyed) conn.write(answer + '\n');
      }
    });
  });
  fake.listen = () => new Promise((resolve) => server.listen(socketPath, resolve));
  fake.stop = () =>
    new Promise((resolve) => {
      for (const c of fake.conns) c.destroy();
      server.close(() => resolve());
    });
  fake.dropAll = () => {
    for (const c of fake.conns) c.destroy();
  };
  fake.cleanup = async () => {
    await fake.stop().catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return fake;
}

const cleanups = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()();
});
function use(fake, client) {
  cleanups.push(async () => {
    if (client) client.destroy();
    await fake.cleanup();
  });
}

describe('ControlClient', () => {
  test('open/close/stats: one line each, answers matched in order', async () => {
    const fake = fakeSticky((line) => (line === 'stats' ? 'ok live_workers=3 sessions=1' : 'ok'));
    await fake.listen();
    const client = new ControlClient(fake.path);
    use(fake, client);
    await client.open('abcDEF123_-');
    assert.equal(await client.stats(), 'live_workers=3 sessions=1');
    await client.close('abcDEF123_-');
    assert.deepEqual(fake.lines, ['open abcDEF123_-', 'stats', 'close abcDEF123_-']);
    assert.equal(fake.connections, 1, 'one persistent connection');
  });

  test('many concurrent requests on one connection, each gets its own answer', async () => {
    // Answers carry the sid, written in order after small random delays.
    const fake = fakeSticky(() => null);
    let chain = Promise.resolve();
    await fake.listen();
    const client = new ControlClient(fake.path);
    use(fake, client);
    await new Promise((r) => client.once('connect', r));
    const conn = [...fake.conns][0];
    // Answer "ok <sid>", or "err bad <sid>" for sids ending in 7.
    conn.removeAllListeners('data');
    let buf = '';
    conn.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const sid = line.split(' ')[1];
        chain = chain.then(async () => {
          await sleep(Math.random() * 2);
          conn.write(sid.endsWith('7') ? `err bad ${sid}\n` : `ok ${sid}\n`);
        });
      }
    });
    const results = await Promise.allSettled(
      Array.from({ length: 200 }, (_, i) => client.request(`open s${i}`)),
    );
    results.forEach((r, i) => {
      if (String(i).endsWith('7')) {
        assert.equal(r.status, 'rejected');
        assert.ok(r.reason instanceof ControlError);
        assert.equal(r.reason.message, `open s${i}: bad s${i}`);
        assert.equal(r.reason.line, `open s${i}`);
      } else {
        assert.equal(r.status, 'fulfilled');
        assert.equal(r.value, `s${i}`);
      }
    });
    assert.equal(fake.connections, 1);
  });

  test('err answers reject with the reason', async () => {
    const fake = fakeSticky((line) =>
      line.startsWith('open') ? 'err sid owned by another worker' : 'ok',
    );
    await fake.listen();
    const client = new ControlClient(fake.path);
    use(fake, client);
    await assert.rejects(client.open('x'), { name: 'ControlError', message: 'open x: sid owned by another worker' });
    await client.close('x'); // the connection is still usable
  });

  test('requests made before the socket exists wait, then go through', async () => {
    const fake = fakeSticky();
    const client = new ControlClient(fake.path, { timeout: 3000, backoffMin: 20, backoffMax: 50 });
    use(fake, client);
    const pending = client.open('early');
    await sleep(150); // a few failed connection attempts (ENOENT)
    assert.equal(client.connected, false);
    await fake.listen();
    await pending;
    assert.deepEqual(fake.lines, ['open early']);
  });

  test('reconnects after a drop; a request whose answer was lost is sent again', async () => {
    let dropNext = true;
    const fake = fakeSticky((line, conn) => {
      if (line === 'open lost' && dropNext) {
        dropNext = false;
        conn.destroy(); // the answer never comes
        return null;
      }
      return 'ok';
    });
    await fake.listen();
    const client = new ControlClient(fake.path, { backoffMin: 10, backoffMax: 40 });
    use(fake, client);
    let disconnects = 0;
    client.on('disconnect', () => disconnects++);
    await client.open('before');
    await client.open('lost');
    await client.open('after');
    assert.deepEqual(fake.lines, ['open before', 'open lost', 'open lost', 'open after']);
    assert.equal(disconnects, 1);
    assert.equal(client.reconnections, 1);
    assert.equal(fake.connections, 2);
  });

  test('"err ... reconnect" answers make the client reconnect and retry', async () => {
    let first = true;
    const fake = fakeSticky(() => {
      if (first) {
        first = false;
        return 'err worker restarted; reconnect';
      }
      return 'ok';
    });
    await fake.listen();
    const client = new ControlClient(fake.path, { backoffMin: 10 });
    use(fake, client);
    await client.open('s1');
    assert.deepEqual(fake.lines, ['open s1', 'open s1']);
    assert.equal(fake.connections, 2);
  });

  test('while sticky is away requests wait; the client is back within one max backoff', async () => {
    const fake = fakeSticky();
    await fake.listen();
    const client = new ControlClient(fake.path, { backoffMin: 20, backoffMax: 80, timeout: 5000 });
    use(fake, client);
    await client.open('a');
    await fake.stop(); // sticky gone: connection refused / ENOENT from now on
    fs.rmSync(fake.path, { force: true });
    const t0 = Date.now();
    const pending = client.open('b');
    await sleep(300);
    await fake.listen();
    await pending;
    const waited = Date.now() - t0;
    assert.ok(waited >= 300, `waited ${waited} ms`);
    assert.ok(waited < 300 + 80 + 200, `came back within one max backoff (${waited} ms)`);
    assert.deepEqual(fake.lines, ['open a', 'open b']);
  });

  test('a registration times out when sticky stays away', async () => {
    const fake = fakeSticky();
    const client = new ControlClient(fake.path, { timeout: 100, backoffMin: 20 });
    use(fake, client);
    const t0 = Date.now();
    await assert.rejects(client.open('never'), /unreachable for 100 ms/);
    assert.ok(Date.now() - t0 < 500);
    // A later request works once sticky is there, and the timed-out one is not sent.
    await fake.listen();
    await client.open('later');
    assert.deepEqual(fake.lines, ['open later']);
  });

  test('an unanswered request times out without desynchronising later answers', async () => {
    let hold = true;
    const held = [];
    const fake = fakeSticky((line, conn) => {
      if (line === 'open slow' && hold) {
        held.push(conn);
        return null; // answered later, after the timeout
      }
      if (held.length && line === 'open next') {
        conn.write('ok\n'); // the late answer for "slow"
        hold = false;
      }
      return `ok ${line.split(' ')[1]}`;
    });
    await fake.listen();
    const client = new ControlClient(fake.path);
    use(fake, client);
    await assert.rejects(client.request('open slow', { timeout: 50 }), /no answer within 50 ms/);
    assert.equal(await client.request('open next'), 'next');
  });

  test('destroy rejects pending requests and lets the process exit', async () => {
    const fake = fakeSticky(() => null);
    await fake.listen();
    const client = new ControlClient(fake.path);
    use(fake, client);
    const pending = client.open('x');
    await sleep(20);
    client.destroy();
    await assert.rejects(pending, /destroyed/);
    await assert.rejects(client.open('y'), /destroyed/);
  });

  test('rejects lines containing a newline', async () => {
    const fake = fakeSticky();
    await fake.listen();
    const client = new ControlClient(fake.path);
    use(fake, client);
    await assert.rejects(client.request('open a\nclose b'), TypeError);
  });
});

describe('socket activation', () => {
  test('fd 3 only when LISTEN_PID is this process', () => {
    assert.equal(activationFd({ LISTEN_FDS: '1', LISTEN_PID: String(process.pid) }), 3);
    assert.equal(activationFd({ LISTEN_FDS: '1', LISTEN_PID: '1' }), null);
    assert.equal(activationFd({ LISTEN_FDS: '0', LISTEN_PID: String(process.pid) }), null);
    assert.equal(activationFd({}), null);
  });
  test('STICKY_WORKER', () => {
    assert.equal(workerIndex({ STICKY_WORKER: '2' }), 2);
    assert.equal(workerIndex({ STICKY_WORKER: '' }), null);
    assert.equal(workerIndex({ STICKY_WORKER: 'x' }), null);
    assert.equal(workerIndex({}), null);
  });
});
