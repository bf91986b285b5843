'use strict';

// Socket activation, the systemd convention sticky follows: the listening
// socket is fd 3 (SD_LISTEN_FDS_START), LISTEN_FDS=1 and LISTEN_PID is the
// pid of the process meant to use it (so a child that merely inherits the
// environment does not take it).

const SD_LISTEN_FDS_START = 3;

/**
 * The inherited listening socket's fd, or null when this process was not
 * socket-activated.
 * @param {NodeJS.ProcessEnv} [env]
 * @param {number} [pid]
 * @returns {number | null}
 */
function activationFd(env = process.env, pid = process.pid) {
  const fds = Number.parseInt(env.LISTEN_FDS ?? '', 10);
  const forPid = Number.parseInt(env.LISTEN_PID ?? '', 10);
  if (!(fds >= 1) || forPid !== pid) return null;
  return SD_LISTEN_FDS_START;
}

/**
 * The worker index sticky gave this process (STICKY_WORKER), or null.
 * @param {NodeJS.ProcessEnv} [env]
 * @returns {number | null}
 */
function workerIndex(env = process.env) {
  const raw = env.STICKY_WORKER;
  if (raw === undefined || raw === '') return null;
  const n = Number(raw);
  return Number.isInteger(n) && n >= 0 ? n : null;
}

module.exports = { activationFd, workerIndex, SD_LISTEN_FDS_START };
