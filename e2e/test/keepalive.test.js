'use strict';

// Keep-alive connections and sessions. sticky places a TCP connection by
// the sid of its first request; a keep-alive connection opened by session A
// and reused by session B would bring B's requests to A's worker
// ("Session ID unknown"). So workers answer Engine.IO HTTP requests with
// `Connection: close`. Shown here with raw sockets and with a keep-alive
// http.Agent limited to one socket, for every worker language; plus the
// counterfactual (Node.js worker with the header turned off) showing the
// failure the header prevents.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const h = require('../lib/harness');

/** One request through an http.Agent; resolves {status, headers, body, reusedSocket}. */
function agentRequest(agent, port, method, target, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        agent,
        host: '127.0.0.1',
        port,
        method,
        path: target,
        headers: body === undefined ? {} : { 'Content-Type': 'text/plain;charset=UTF-8' },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d) => (text += d));
        res.on('end', () =>
          resolve({ status: res.statusCode, headers: res.headers, body: text, reusedSocket: req.reusedSocket }),
        );
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/**
 * Opens a Socket.IO session by hand over long-polling and learns its owner
 * from the worker's `hello`. Every request goes on a new connection.
 */
async function rawSession(port) {
  const { sid } = await h.handshakeRaw(port);
  const post = await h.rawRequest(port, 'POST', `${h.EIO}&sid=${sid}`, { body: '40' });
  assert.equal(post.status, 200, `socket.io CONNECT: ${post.body}`);
  let hello = null;
  for (let i = 0; i < 5 && !hello; i++) {
    const get = await h.rawRequest(port, 'GET', `${h.EIO}&sid=${sid}`, { timeout: 30000 });
    assert.equal(get.status, 200, get.body);
    for (const p of h.packets(get.body)) {
      if (p.startsWith('42')) {
        const [event, data] = JSON.parse(p.slice(2));
        if (event === 'hello') hello = data;
      }
    }
  }
  assert.ok(hello, 'hello received');
  return { sid, owner: hello.worker, pid: hello.pid };
}

/** Two sessions owned by different workers (round-robin makes that quick). */
async function twoSessionsOnTwoWorkers(port) {
  const a = await rawSession(port);
  const extra = [];
  for (let i = 0; i < 8; i++) {
    const b = await rawSession(port);
    if (b.owner !== a.owner) return { a, b, extra };
    extra.push(b);
  }
  throw new Error('could not get two sessions on two different workers');
}

/** The `whoami` ack packet (`43<id>[...]`) in a polling payload. */
function ackOf(body, id) {
  for (const p of h.packets(body)) {
    if (p.startsWith(`43${id}[`)) return JSON.parse(p.slice(2 + String(id).length))[0];
  }
  return null;
}

for (const lang of ['node', 'python', 'rust']) {
  const worker = h.workerFor(lang);
  describe(`keep-alive and sessions, ${lang} workers`, { skip: worker.skip }, () => {
    let sticky;
    const opened = [];
    before(async () => {
      sticky = await h.startSticky({ balance: 'round-robin', command: worker.command });
    });
    after(async () => {
      for (const sid of opened) await h.closeRaw(sticky.port, sid).catch(() => {});
      await h.stopSticky(sticky);
    });

    test('long-polling answers carry Connection: close and the server closes the connection', async () => {
      const hs = await h.handshakeRaw(sticky.port);
      opened.push(hs.sid);
      const checks = {
        'handshake GET': hs.response,
        'POST (socket.io CONNECT)': await h.rawRequest(sticky.port, 'POST', `${h.EIO}&sid=${hs.sid}`, { body: '40' }),
        // A poll answers once the CONNECT ack is queued: slow on a loaded machine.
        'GET (poll)': await h.rawRequest(sticky.port, 'GET', `${h.EIO}&sid=${hs.sid}`, { timeout: 30000 }),
      };
      for (const [what, res] of Object.entries(checks)) {
        assert.equal(res.status, 200, `${what}: ${res.body}`);
        assert.match(res.headers.connection || '', /close/i, `${what}: Connection: ${res.headers.connection}`);
        assert.equal(res.closed, true, `${what}: the server closed the connection`);
      }
      console.log(`[${lang}] handshake, POST and GET answers: Connection: close, connection closed by the worker`);
    });

    test('CORS preflight and error answers carry Connection: close too', async () => {
      const hs = await h.handshakeRaw(sticky.port);
      opened.push(hs.sid);
      const checks = {
        'OPTIONS preflight': await h.rawRequest(sticky.port, 'OPTIONS', `${h.EIO}&sid=${hs.sid}`, {
          headers: { Origin: 'http://app.example', 'Access-Control-Request-Method': 'POST' },
        }),
        'unknown sid (400)': await h.rawRequest(sticky.port, 'GET', `${h.EIO}&sid=unknownunknownunknown`),
      };
      const bad = [];
      for (const [what, res] of Object.entries(checks)) {
        const ok = /close/i.test(res.headers.connection || '') && res.closed;
        console.log(
          `[${lang}] ${what}: HTTP ${res.status}, Connection: ${res.headers.connection ?? '(none)'}, ` +
            `closed by server: ${res.closed}`,
        );
        if (!ok) bad.push(what);
      }
      // A browser shares its connection pool between tabs: a kept-alive
      // preflight of session A may carry the next POST of session B.
      assert.deepEqual(bad, [], `answers without Connection: close: ${bad.join(', ')}`);
    });

    test('a keep-alive agent: the next session\'s request reaches its own owner', async () => {
      const { a, b, extra } = await twoSessionsOnTwoWorkers(sticky.port);
      opened.push(a.sid, b.sid, ...extra.map((s) => s.sid));
      let socketsCreated = 0;
      const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
      const create = agent.createConnection.bind(agent);
      agent.createConnection = (...args) => {
        socketsCreated++;
        return create(...args);
      };
      try {
        const steps = [
          ['POST', a, '421["whoami"]'],
          ['POST', b, '422["whoami"]'],
          ['GET', b],
          ['GET', a],
        ];
        const got = {};
        for (const [method, s, body] of steps) {
          const res = await agentRequest(agent, sticky.port, method, `${h.EIO}&sid=${s.sid}`, body);
          assert.equal(res.status, 200, `${method} sid=${s.sid}: HTTP ${res.status} ${res.body}`);
          assert.match(res.headers.connection || '', /close/i);
          assert.equal(res.reusedSocket, false, 'no request rides a connection of an earlier one');
          if (method === 'GET') got[s.sid] = ackOf(res.body, s === a ? 1 : 2);
        }
        assert.equal(socketsCreated, steps.length, 'one connection per request');
        assert.equal(got[a.sid]?.worker, a.owner, `A's whoami answered by its owner (worker ${a.owner})`);
        assert.equal(got[b.sid]?.worker, b.owner, `B's whoami answered by its owner (worker ${b.owner})`);
        console.log(
          `[${lang}] keep-alive agent (maxSockets 1): A on worker ${a.owner}, B on worker ${b.owner}; ` +
            `${steps.length} requests on ${socketsCreated} connections, each reached its session's owner`,
        );
      } finally {
        agent.destroy();
      }
    });
  });
}

// Without the integrations' Connection: close, and with sticky's own check
// off (--foreign-requests off; by default it resets such a connection:
// tests/tests/foreign.rs), what the kept-alive connection does.
describe('counterfactual: Node.js workers without Connection: close, --foreign-requests off', { skip: h.workerFor('node').skip }, () => {
  let sticky;
  before(async () => {
    sticky = await h.startSticky({
      balance: 'round-robin',
      command: h.workerFor('node').command,
      env: { NODE_WORKER_KEEPALIVE: '1' },
      extraArgs: ['--foreign-requests', 'off'],
    });
  });
  after(() => h.stopSticky(sticky));

  test("session B's request on session A's kept-alive connection reaches A's worker", async () => {
    const { a, b } = await twoSessionsOnTwoWorkers(sticky.port);
    const sock = await h.connectRaw(sticky.port);
    try {
      sock.write(h.httpRequestText('POST', `${h.EIO}&sid=${a.sid}`, { body: '421["whoami"]' }));
      const first = await h.readResponse(sock);
      assert.equal(first.status, 200);
      assert.doesNotMatch(first.headers.connection || '', /close/i);
      sock.write(h.httpRequestText('POST', `${h.EIO}&sid=${b.sid}`, { body: '422["whoami"]' }));
      const second = await h.readResponse(sock);
      console.log(
        `[counterfactual] A on worker ${a.owner}, B on worker ${b.owner}; B's POST on A's kept-alive ` +
          `connection: HTTP ${second.status} ${second.body}`,
      );
      assert.equal(second.status, 400);
      assert.match(second.body, /Session ID unknown/);
    } finally {
      sock.destroy();
    }
  });
});
