'use strict';

// "Hosts" for the multi-host tests: network namespaces with their own
// addresses, each joined to this (root) namespace by a veth pair. The
// test creates them and removes them; only the addresses made here are
// used. Host i gets 172.31.N.(4i+2)/30, its peer here 172.31.N.(4i+1),
// with N chosen per run among subnets no route uses yet.

const { execFileSync } = require('node:child_process');

const ip = (...args) => execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

/** Why namespaces cannot be made here, or false. */
function hostsMissing() {
  if (process.getuid && process.getuid() !== 0) return 'needs root (ip netns add)';
  try {
    ip('netns', 'list');
    return false;
  } catch (err) {
    return `ip netns does not work here: ${err.message.split('\n')[0]}`;
  }
}

/** A /24 of 172.31.0.0/16 that no route of this namespace touches. */
function freeSubnet() {
  const routes = ip('-4', 'route', 'show', 'table', 'all');
  for (let tries = 0; tries < 50; tries++) {
    const n = 1 + ((process.pid + tries * 37) % 250);
    if (!routes.includes(`172.31.${n}.`)) return n;
  }
  throw new Error('no free 172.31.N.0/24 for the test hosts');
}

/**
 * Creates `count` hosts. Resolves [{name, addr, gateway}] plus remove(),
 * which deletes the namespaces (their veth pairs go with them).
 */
function createHosts(count) {
  const subnet = freeSubnet();
  const tag = `${process.pid % 100000}`;
  const hosts = [];
  const remove = () => {
    for (const h of hosts) {
      try {
        ip('netns', 'del', h.name);
      } catch {}
    }
  };
  try {
    for (let i = 0; i < count; i++) {
      const name = `sticky-h${i}-${tag}`;
      const outer = `stk${tag}h${i}`.slice(0, 15);
      const gateway = `172.31.${subnet}.${4 * i + 1}`;
      const addr = `172.31.${subnet}.${4 * i + 2}`;
      ip('netns', 'add', name);
      hosts.push({ name, addr, gateway, outer });
      ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', name);
      ip('addr', 'add', `${gateway}/30`, 'dev', outer);
      ip('link', 'set', outer, 'up');
      ip('-n', name, 'addr', 'add', `${addr}/30`, 'dev', 'eth0');
      ip('-n', name, 'link', 'set', 'eth0', 'up');
      ip('-n', name, 'link', 'set', 'lo', 'up');
      ip('-n', name, 'route', 'add', 'default', 'via', gateway);
    }
  } catch (err) {
    remove();
    throw err;
  }
  process.once('exit', remove);
  return { hosts, remove };
}

module.exports = { hostsMissing, createHosts };
