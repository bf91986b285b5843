'use strict';

// Issue 13: two hosts. Each host is a network namespace with its own
// address (veth pair), running its own `sticky run` with 2 unmodified Node
// app workers that use the official Redis adapter
// (@socket.io/redis-adapter) on one real redis-server (started here, on
// the hosts' gateway addresses and a free port). HAProxy in front
// (deploy/haproxy-hosts.cfg) gives each browser a host by cookie. Two
// browser contexts (two users: own cookies, own connection pools) of 4
// tabs each, one per host: every echo answered by the session's worker,
// zero 4xx/5xx, zero disconnects, every tab receives every tab's
// broadcast. Then one host's sticky is stopped: its tabs reconnect to the
// other host within the client's reconnection delay, the other host's
// tabs see no disconnect, broadcasts keep reaching everyone.

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const { startSticky, waitFor, sleep } = require('../lib/harness');
const { browserMissing, launchBrowser, appFor } = require('../lib/browser');
const { proxyMissing, startProxy, freePort } = require('../lib/proxies');
const { hostsMissing, createHosts } = require('../lib/hosts');

const REDIS = process.env.REDIS_SERVER || '/usr/bin/redis-server';
const TABS_PER_HOST = 4;
const ECHOES = Number(process.env.E2E_BROWSER_ECHOES || 20);
// socket.io-client's defaults: first reconnection attempt after
// reconnectionDelay (1 s) +- randomizationFactor (0.5); later ones back
// off up to reconnectionDelayMax (5 s).
const RECONNECTION_DELAY_MAX_MS = 5000;

const skip =
  browserMissing() ||
  proxyMissing('haproxy') ||
  hostsMissing() ||
  (fs.existsSync(REDIS) ? false : `${REDIS} is missing (apt-get install redis-server)`);

/** redis-server on `addrs`, a free port, no persistence; resolves {url(addr), stop()}. */
async function startRedis(addrs) {
  const port = await freePort(addrs[0]);
  const proc = spawn(REDIS, ['--bind', ...addrs, '--port', String(port), '--save', '', '--appendonly', 'no', '--protected-mode', 'no'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  proc.stdout.on('data', (d) => (output += d));
  proc.stderr.on('data', (d) => (output += d));
  await waitFor(
    `redis-server on ${addrs[0]}:${port}`,
    () =>
      new Promise((resolve) => {
        if (proc.exitCode !== null) throw new Error(`redis-server exited:\n${output}`);
        const s = net.createConnection({ host: addrs[0], port }, () => {
          s.destroy();
          resolve(true);
        });
        s.on('error', () => resolve(false));
      }),
  );
  return {
    url: (addr) => `redis://${addr}:${port}`,
    stop: async () => {
      if (proc.exitCode === null) {
        proc.kill('SIGTERM');
        await new Promise((r) => proc.once('exit', r));
      }
    },
  };
}

const result = (page) => page.evaluate(() => window.__result);

describe('two hosts behind HAProxy with cookie affinity, Redis adapter', { skip }, () => {
  let hosts;
  let redis;
  const stickies = [];
  let front;
  let browser;
  before(async () => {
    hosts = createHosts(2);
    redis = await startRedis(hosts.hosts.map((h) => h.gateway));
    const app = appFor('node-plain');
    for (const [i, h] of hosts.hosts.entries()) {
      stickies.push(
        await startSticky({
          workers: 2,
          learn: 'on',
          listen: `${h.addr}:0`,
          netns: h.name,
          command: app.command,
          env: { ...app.env, APP_HOST: `host${i}`, APP_REDIS_URL: redis.url(h.gateway) },
        }),
      );
    }
    front = await startProxy('haproxy', 'haproxy-hosts.cfg', {
      vars: { HOST0: `${hosts.hosts[0].addr}:${stickies[0].port}`, HOST1: `${hosts.hosts[1].addr}:${stickies[1].port}` },
    });
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
    await front?.stop();
    for (const s of stickies) await s.stop();
    await redis?.stop();
    hosts?.remove();
  });

  test('every tab gets every broadcast; a stopped host\'s tabs move to the other', async () => {
    const users = [];
    const tabs = [];
    const url = (u, t) => `${front.url}/?tab=u${u}t${t}&echoes=${ECHOES}`;
    const connected = (p) =>
      waitFor('a tab connected', async () => ((await result(p))?.sessions || []).length > 0, { timeout: 15000 });
    const firstHost = async (p) => (await result(p)).sessions[0].host;
    try {
      // Users arrive one tab each until one is on each host: HAProxy's
      // answer to the page sets the user's host cookie (round robin, so
      // the second user normally gets the other host; a user that got the
      // same host as the first is closed, as if it had left).
      for (let attempt = 0; users.length < 2; attempt++) {
        assert.ok(attempt < 6, 'HAProxy never sent a new user to the second host');
        const ctx = await browser.createBrowserContext();
        const p = await ctx.newPage();
        await p.goto(url(users.length, 0));
        await connected(p);
        if (users.length === 1 && (await firstHost(p)) === (await firstHost(tabs[0][0]))) {
          await ctx.close();
          continue;
        }
        users.push(ctx);
        tabs.push([p]);
      }
      await Promise.all(
        users.map(async (ctx, u) => {
          for (let t = 1; t < TABS_PER_HOST; t++) tabs[u].push(await ctx.newPage());
          await Promise.all(tabs[u].slice(1).map((p, t) => p.goto(url(u, t + 1))));
        }),
      );
      const all = tabs.flat();
      await Promise.all(all.map((p) => waitFor('the tab\'s echoes', async () => (await result(p)).done, { timeout: 45000 })));
      let results = await Promise.all(all.map(result));
      const hostOf = (r) => r.sessions[r.sessions.length - 1].host;
      const userHosts = tabs.map((ps) => [...new Set(ps.map((p) => hostOf(results[all.indexOf(p)])))]);
      const echoes = results.reduce((n, r) => n + r.echoes, 0);
      const disconnects = results.reduce((n, r) => n + r.disconnects.length, 0);
      const badEcho = results.flatMap((r) => [...r.echoFailures, ...r.wrongWorker.map((w) => JSON.stringify(w))]);
      console.log(
        `# [two hosts] users' hosts ${JSON.stringify(userHosts)}, echoes ${echoes}/${all.length * ECHOES}, ` +
          `disconnects ${disconnects}, echo failures ${badEcho.length}`,
      );
      assert.deepEqual(userHosts.map((h) => h.length), [1, 1], 'each user (cookie) stays on one host');
      assert.notEqual(userHosts[0][0], userHosts[1][0], 'round robin put the two users on different hosts');
      assert.equal(echoes, all.length * ECHOES, badEcho.slice(0, 5).join('\n'));
      assert.equal(disconnects, 0);

      // Broadcasts: every tab shouts once; every tab hears all of them.
      const shoutRound = async (round) => {
        const started = Date.now();
        await Promise.all(all.map((p) => p.evaluate((r) => window.__shout(r), round)));
        await waitFor(
          `round ${round} heard by every tab`,
          async () => (await Promise.all(all.map(result))).every((r) => r.shouts.filter((s) => s.round === round).length >= all.length),
          { timeout: 10000 },
        ).catch(() => {});
        const heard = (await Promise.all(all.map(result))).map((r) => new Set(r.shouts.filter((s) => s.round === round).map((s) => s.tab)).size);
        console.log(`# [two hosts] broadcast round ${round}: distinct senders heard per tab ${JSON.stringify(heard)} of ${all.length}, ${Date.now() - started} ms`);
        return heard;
      };
      assert.deepEqual(await shoutRound(1), all.map(() => all.length), 'every tab hears every tab, across hosts');

      // Stop the host of user 0.
      const gone = userHosts[0][0];
      const goneIndex = Number(gone.slice(4));
      const stoppedAt = Date.now();
      await stickies[goneIndex].stop();
      await Promise.all(
        tabs[0].map((p) =>
          waitFor('a moved tab reconnected to the other host', async () => hostOf(await result(p)) !== gone, { timeout: 20000 }),
        ),
      );
      results = await Promise.all(all.map(result));
      const moved = tabs[0].map((p) => results[all.indexOf(p)]);
      const stayed = tabs[1].map((p) => results[all.indexOf(p)]);
      const reconnectMs = moved.map((r) => r.sessions[r.sessions.length - 1].at - stoppedAt);
      console.log(
        `# [two hosts] stopped ${gone}: its tabs back on ${[...new Set(moved.map(hostOf))]} after ${JSON.stringify(reconnectMs)} ms ` +
          `(disconnects ${JSON.stringify(moved.map((r) => r.disconnects))}); other host's tabs disconnects ${stayed.reduce((n, r) => n + r.disconnects.length, 0)}`,
      );
      for (const ms of reconnectMs) assert.ok(ms <= RECONNECTION_DELAY_MAX_MS, `reconnected after ${ms} ms`);
      assert.equal(stayed.reduce((n, r) => n + r.disconnects.length, 0), 0, "the other host's tabs saw no disconnect");
      assert.deepEqual(await shoutRound(2), all.map(() => all.length), 'broadcasts still reach every tab');
    } finally {
      for (const ctx of users) await ctx.close().catch(() => {});
    }
  });
});
