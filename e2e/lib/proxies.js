'use strict';

// Front proxies for the tests (Debian's haproxy and nginx): the config
// files of deploy/ with their {{...}} placeholders filled in, run in the
// foreground, stopped by the test.

const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { before, after } = require('node:test');
const { REPO_ROOT, sleep } = require('./harness');

const BINARIES = { haproxy: process.env.HAPROXY || '/usr/sbin/haproxy', nginx: process.env.NGINX || '/usr/sbin/nginx' };

/** Why `kind` cannot run here, or false. */
function proxyMissing(kind) {
  return fs.existsSync(BINARIES[kind]) ? false : `${BINARIES[kind]} is missing (apt-get install ${kind})`;
}

/** A port free on `host` right now (the proxy binds it next). */
function freePort(host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * deploy/<file> with every {{NAME}} replaced by vars[NAME], then `edits`
 * ([from, to] pairs, each of which must match: a counterfactual's one
 * changed line). Throws on a placeholder left unfilled.
 */
function renderConfig(file, vars, edits = []) {
  let text = fs.readFileSync(path.join(REPO_ROOT, 'deploy', file), 'utf8');
  for (const [from, to] of edits) {
    if (!text.includes(from)) throw new Error(`deploy/${file} has no ${JSON.stringify(from)}`);
    text = text.replace(from, to);
  }
  text = text.replace(/\{\{(\w+)\}\}/g, (m, name) => {
    if (vars[name] === undefined) throw new Error(`deploy/${file}: no value for ${m}`);
    return vars[name];
  });
  return text;
}

/**
 * Starts `kind` (haproxy | nginx) with deploy/<file> in front of `upstream`
 * (host:port). Resolves {url, port, stop()} once it accepts connections.
 */
async function startProxy(kind, file, { upstream, edits = [], vars = {}, host = '127.0.0.1', scheme = 'http' } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `sticky-${kind}-`));
  const port = await freePort(host);
  const front = `${host}:${port}`;
  const config = renderConfig(file, { FRONT: front, STICKY: upstream, RUN_DIR: dir, ...vars }, edits);
  const cfg = path.join(dir, file);
  fs.writeFileSync(cfg, config);
  // haproxy: -db stays in the foreground; nginx: `daemon off` in the file.
  const run = kind === 'haproxy' ? ['-db', '-f', cfg] : ['-e', path.join(dir, 'error.log'), '-c', cfg];
  const check = kind === 'haproxy' ? ['-c', '-f', cfg] : ['-t', ...run];
  const checked = spawnSync(BINARIES[kind], check, { encoding: 'utf8' });
  if (checked.status !== 0) throw new Error(`${kind} refused ${cfg}:\n${checked.stdout}${checked.stderr}`);
  const proc = spawn(BINARIES[kind], run, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  proc.stdout.on('data', (d) => (output += d));
  proc.stderr.on('data', (d) => (output += d));
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(timer);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const deadline = Date.now() + 10000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${kind} exited at start:\n${output}`);
    const up = await new Promise((resolve) => {
      const s = net.createConnection({ host, port }, () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (up) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`${kind} did not listen on ${front} within 10 s:\n${output}`);
    }
    await sleep(50);
  }
  return { url: `${scheme}://${front}`, port, output: () => output, stop };
}

/**
 * A self-signed certificate for `ip`, made with openssl in `dir`:
 * {cert, key, pem} (pem: certificate then key, as HAProxy takes it).
 */
function makeCertificate(dir, ip = '127.0.0.1') {
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  const made = spawnSync(
    'openssl',
    ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
      '-subj', `/CN=${ip}`, '-addext', `subjectAltName=IP:${ip}`, '-keyout', key, '-out', cert],
    { encoding: 'utf8' },
  );
  if (made.status !== 0) throw new Error(`openssl could not make a certificate: ${made.error?.message || made.stderr}`);
  const pem = path.join(dir, 'cert+key.pem');
  fs.writeFileSync(pem, fs.readFileSync(cert, 'utf8') + fs.readFileSync(key, 'utf8'));
  return { cert, key, pem };
}

/**
 * Inside a describe: a certificate (makeCertificate's) in a temporary
 * directory, made before its tests and removed after them. Returns the
 * holder whose `certs` the tests use.
 */
function testCertificate() {
  const holder = { certs: undefined };
  let dir;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-tls-'));
    holder.certs = makeCertificate(dir);
  });
  after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });
  return holder;
}

module.exports = { proxyMissing, freePort, renderConfig, startProxy, makeCertificate, testCertificate };
