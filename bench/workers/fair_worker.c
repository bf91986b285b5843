/*
 * The fair-floor worker of `sticky-bench core`: one thread, epoll, a few
 * microseconds per request, so that what differs between placements is
 * placement. Socket activation like any sticky worker: its listener is
 * fd 3, STICKY_WORKER its index, STICKY_CONTROL the control socket.
 *
 *   GET /register?sid=S        "open S" on the control socket, then 200
 *   GET /register-many?n=N&prefix=P
 *                              "open P0" .. "open P<N-1>", pipelined; 200
 *                              with the number of "ok" answers
 *   GET /socket.io/?...        (no sid) an Engine.IO v4 open packet with a
 *                              fresh 20-character sid, for the learner
 *   anything else              200 "ok"
 *
 * Every answer names the worker (X-Sticky-Worker). HTTP/1.1 keep-alive
 * unless the request says `Connection: close`. Requests must fit in one
 * read of BUF bytes (the bench's do).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define LISTENER 3
#define BUF 16384

static int worker;
static int control = -1;
static unsigned long long rng;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static int control_socket(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const char *path = getenv("STICKY_CONTROL");

	if (control >= 0)
		return control;
	if (!path || strlen(path) >= sizeof(sa.sun_path))
		return -1;
	strcpy(sa.sun_path, path);
	control = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (control < 0 || connect(control, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(control);
		control = -1;
	}
	return control;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			usleep(50);
			continue;
		}
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* Reads `lines` answers from the control socket; returns how many were ok. */
static long read_answers(int fd, long lines)
{
	static char buf[65536];
	static size_t have;
	long oks = 0;

	while (lines > 0) {
		char *nl;

		while ((nl = memchr(buf, '\n', have)) != NULL) {
			size_t len = (size_t)(nl - buf) + 1;

			oks += len >= 3 && memcmp(buf, "ok", 2) == 0;
			memmove(buf, nl + 1, have - len);
			have -= len;
			if (--lines == 0)
				return oks;
		}
		ssize_t r = read(fd, buf + have, sizeof(buf) - have);

		if (r <= 0)
			return -1;
		have += (size_t)r;
	}
	return oks;
}

/* The value of query parameter `name` (with its '='), copied to out. */
static int param(const char *target, const char *name, char *out, size_t cap)
{
	const char *q = strchr(target, '?');
	size_t n = strlen(name), i = 0;

	while (q) {
		q++;
		if (strncmp(q, name, n) == 0) {
			q += n;
			while (q[i] && q[i] != '&' && q[i] != ' ' && i + 1 < cap) {
				out[i] = q[i];
				i++;
			}
			out[i] = 0;
			return 1;
		}
		q = strchr(q, '&');
	}
	return 0;
}

static long register_many(long n, const char *prefix)
{
	int fd = control_socket();
	char chunk[65536];
	long sent = 0, oks = 0;

	if (fd < 0)
		return -1;
	while (sent < n) {
		size_t len = 0;
		long batch = 0;

		while (sent + batch < n && len + 128 < sizeof(chunk)) {
			len += (size_t)snprintf(chunk + len, sizeof(chunk) - len,
						"open %s%ld\n", prefix, sent + batch);
			batch++;
		}
		if (write_all(fd, chunk, len) < 0)
			return -1;
		long got = read_answers(fd, batch);

		if (got < 0)
			return -1;
		oks += got;
		sent += batch;
	}
	return oks;
}

static char *fresh_sid(char *out)
{
	static const char alphabet[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

	for (int i = 0; i < 20; i++) {
		rng ^= rng >> 12;
		rng ^= rng << 25;
		rng ^= rng >> 27;
		out[i] = alphabet[(rng * 0x2545F4914F6CDD1DULL) >> 58];
	}
	out[20] = 0;
	return out;
}

/* Answers one request; returns 1 to keep the connection open. */
static int answer(int fd, char *req)
{
	char target[1024] = "", body[512], head[256], value[256], sid[21];
	int keep = strstr(req, "\r\nConnection: close\r\n") == NULL;
	int status = 200;

	sscanf(req, "%*15s %1023s", target);
	if (strncmp(target, "/register-many?", 15) == 0 && param(target, "n=", value, sizeof(value))) {
		long n = atol(value);
		char prefix[64] = "";

		param(target, "prefix=", prefix, sizeof(prefix));
		snprintf(body, sizeof(body), "%ld\n", register_many(n, prefix));
	} else if (strncmp(target, "/register?", 10) == 0 && param(target, "sid=", value, sizeof(value))) {
		char line[300];
		int c = control_socket();

		snprintf(line, sizeof(line), "open %s\n", value);
		if (c < 0 || write_all(c, line, strlen(line)) < 0 || read_answers(c, 1) != 1)
			status = 500;
		snprintf(body, sizeof(body), "worker=%d registered=%s\n", worker, value);
	} else if (strncmp(target, "/socket.io/", 11) == 0 && !strstr(target, "sid=")) {
		snprintf(body, sizeof(body),
			 "0{\"sid\":\"%s\",\"upgrades\":[],\"pingInterval\":25000,"
			 "\"pingTimeout\":20000,\"maxPayload\":1000000}",
			 fresh_sid(sid));
	} else {
		snprintf(body, sizeof(body), "ok\n");
	}
	int n = snprintf(head, sizeof(head),
			 "HTTP/1.1 %d %s\r\nX-Sticky-Worker: %d\r\nContent-Length: %zu\r\n%s\r\n",
			 status, status == 200 ? "OK" : "Error", worker, strlen(body),
			 keep ? "" : "Connection: close\r\n");
	char out[1024];

	n = snprintf(out, sizeof(out), "%.*s%s", n, head, body);
	return write_all(fd, out, (size_t)n) == 0 && keep;
}

int main(void)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = LISTENER }, evs[64];
	static char buf[BUF + 1];
	const char *index = getenv("STICKY_WORKER");
	int ep = epoll_create1(EPOLL_CLOEXEC);

	worker = index ? atoi(index) : 0;
	rng = ((unsigned long long)getpid() << 32) ^ (unsigned long long)time(NULL) ^ 1;
	if (ep < 0 || fcntl(LISTENER, F_SETFL, O_NONBLOCK) < 0 ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, LISTENER, &ev) < 0)
		die("fair-worker: fd 3 must be a listening socket");
	for (;;) {
		int n = epoll_wait(ep, evs, 64, -1);

		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == LISTENER) {
				int c;

				while ((c = accept4(LISTENER, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
					struct epoll_event cev = { .events = EPOLLIN, .data.fd = c };

					epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, BUF);

			if (r < 0 && errno == EAGAIN)
				continue;
			buf[r > 0 ? r : 0] = 0;
			if (r <= 0 || !strstr(buf, "\r\n\r\n") || !answer(fd, buf))
				close(fd); /* also drops it from the epoll set */
		}
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
	}
}
