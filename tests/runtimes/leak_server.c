/* A server that leaks a socket for every client that hangs up, for cwreap's incident tests
 * (tests/it/incident.rs), and the client that feeds it.
 *
 *     leak_server [--listen HOST:PORT] [--fill-to N] [--on-term exit|count] [--quiet]
 *                 [--heartbeat SECS] [--lower-hard-at N --lower-to H [--lower-after-ms MS]]
 *     leak_server client HOST:PORT RATE
 *
 * Server. One thread, one epoll loop. It accepts every connection as it comes (so it leaks
 * at whatever rate clients arrive), reads and discards what they send, and when read()
 * returns 0 it takes the fd out of its epoll set and keeps it: the socket stays in
 * CLOSE_WAIT and the fd slot stays taken until EMFILE. When accept() hits a limit it says so
 * and keeps serving. Run it under `prlimit --nofile=SOFT:HARD` to choose its limits.
 *
 *   --fill-to N        at start, open /dev/null until N fds are open (to start near a limit)
 *   --on-term count    handle SIGTERM: say `signal 15 fds=N` and go on (default: die of it)
 *   --quiet            no `accepted`/`eof` lines (for many clients)
 *   --heartbeat SECS   every SECS write one byte to every connection it holds, and close
 *                      the connections where that fails (EPIPE once the socket was shut
 *                      down from outside): an app that learns of a dead connection only on
 *                      its next heartbeat
 *   --lower-hard-at N  once N fds are open (checked at each accept), lower its own hard
 *   --lower-to H       RLIMIT_NOFILE to H (the soft limit to min(soft, H)), MS ms later
 *   --lower-after-ms MS
 *                      (with --lower-to alone, only the `lower` command lowers it)
 *
 * stdout, one line per event, flushed:
 *   listen ADDR | ready | accepted FD | eof FD | released FD
 *   accept error: STRERROR (N times)       at the first failure, then at most once a second
 *   signal SIG fds=N                       with --on-term count
 *   crossed fds=N at=T                     --lower-hard-at reached (T: wall clock, s)
 *   lowered soft=S hard=H saw soft=S0 hard=H0 at=T   S0/H0: the limits it read just before
 *   filled N | fds N | limits soft=S hard=H | error TEXT
 * stdin, one command a line: `fill N` (open /dev/null until N fds are open), `fds`,
 * `limits`, `lower` (lower the hard limit to --lower-to now).
 *
 * Client. Every 1/RATE s it connects to HOST:PORT and half-closes the connection at once
 * (shutdown SHUT_WR), keeping its end open; it reads and discards what the server sends and
 * closes a connection the server ended. It never makes up for a missed tick in a burst.
 * stdout: `ready`, `error connect: TEXT` (the first failure). stdin: `stats` prints `stats
 * connected=N ended=M failed=F`, `pause` stops connecting (`paused connected=N`); it exits
 * when stdin ends.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 65536

enum state { FREE = 0, OPEN, AT_EOF };

static enum state conns[MAX_FD];
static int ep;
static int sig_pipe[2] = {-1, -1};

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* An fd kept open so that counting works also at EMFILE: closed to count, then reopened. */
static int spare = -1;

/* Open fds of this process, as /proc/PID/fd shows them (the spare one included). */
static int count_fds(void)
{
    if (spare >= 0)
        close(spare);
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (e->d_name[0] != '.')
                n++;
        closedir(d);
        n -= 1; /* the directory's own fd */
    } else {
        n = -1;
    }
    spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return n < 0 ? n : n + (spare >= 0);
}

static void fill_to(int n)
{
    for (int have = count_fds(); have < n; have++) {
        if (open("/dev/null", O_RDONLY | O_CLOEXEC) < 0) {
            say("error fill: %s", strerror(errno));
            return;
        }
    }
    say("filled %d", count_fds());
}

static int parse_addr(const char *text, struct sockaddr_in *a)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host)
        return -1;
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

static void watch(int fd, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    /* stdin may be a file (/dev/null), which epoll refuses: then there are no commands. */
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0 && !(fd == 0 && errno == EPERM))
        say("error epoll_ctl add %d: %s", fd, strerror(errno));
}

static int timer(double first_s, double every_s)
{
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct itimerspec it = {0};
    it.it_value.tv_sec = (time_t)first_s;
    it.it_value.tv_nsec = (long)((first_s - (double)(time_t)first_s) * 1e9);
    if (it.it_value.tv_sec == 0 && it.it_value.tv_nsec == 0)
        it.it_value.tv_nsec = 1;
    it.it_interval.tv_sec = (time_t)every_s;
    it.it_interval.tv_nsec = (long)((every_s - (double)(time_t)every_s) * 1e9);
    if (fd < 0 || timerfd_settime(fd, 0, &it, NULL) < 0) {
        say("error timerfd: %s", strerror(errno));
        exit(1);
    }
    watch(fd, EPOLLIN);
    return fd;
}

static void drain(int fd)
{
    uint64_t n;
    while (read(fd, &n, sizeof n) > 0)
        ;
}

static void on_term(int sig)
{
    unsigned char b = (unsigned char)sig;
    int saved = errno;
    if (write(sig_pipe[1], &b, 1) < 0) {
        /* The pipe is full: the signals already queued there say enough. */
    }
    errno = saved;
}

/* Stdin commands, a line at a time. */
static char cmd_buf[256];
static size_t cmd_len;

/* The client stops connecting (`pause`). */
static int paused;
/* --lower-to, for the `lower` command (-1: none given). */
static long long lower_to_cmd = -1;
static void lower_hard(rlim_t to);

static void command(const char *line, int is_client, long long connected, long long ended,
                    long long failed)
{
    if (is_client) {
        if (strcmp(line, "stats") == 0) {
            say("stats connected=%lld ended=%lld failed=%lld", connected, ended, failed);
        } else if (strcmp(line, "pause") == 0) {
            paused = 1;
            say("paused connected=%lld", connected);
        }
        return;
    }
    if (strncmp(line, "fill ", 5) == 0) {
        fill_to(atoi(line + 5));
    } else if (strcmp(line, "fds") == 0) {
        say("fds %d", count_fds());
    } else if (strcmp(line, "limits") == 0) {
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        say("limits soft=%llu hard=%llu", (unsigned long long)rl.rlim_cur,
            (unsigned long long)rl.rlim_max);
    } else if (strcmp(line, "lower") == 0 && lower_to_cmd >= 0) {
        lower_hard((rlim_t)lower_to_cmd);
    } else if (line[0]) {
        say("error unknown command %s", line);
    }
}

/* Read stdin; false at its end. */
static int read_commands(int is_client, long long connected, long long ended, long long failed)
{
    char buf[256];
    ssize_t n = read(0, buf, sizeof buf);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
        return 0;
    for (ssize_t i = 0; i < n; i++) {
        if (buf[i] == '\n') {
            cmd_buf[cmd_len] = 0;
            command(cmd_buf, is_client, connected, ended, failed);
            cmd_len = 0;
        } else if (cmd_len + 1 < sizeof cmd_buf) {
            cmd_buf[cmd_len++] = buf[i];
        }
    }
    return 1;
}

/* Wall-clock time, to set a line beside the daemon's log timestamps. */
static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void lower_hard(rlim_t to)
{
    struct rlimit old, rl;
    getrlimit(RLIMIT_NOFILE, &old);
    rl.rlim_max = to;
    rl.rlim_cur = old.rlim_cur < to ? old.rlim_cur : to;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
        say("error setrlimit: %s", strerror(errno));
        return;
    }
    say("lowered soft=%llu hard=%llu saw soft=%llu hard=%llu at=%.6f",
        (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max,
        (unsigned long long)old.rlim_cur, (unsigned long long)old.rlim_max, wall_s());
}

static int server(int argc, char **argv)
{
    const char *listen_at = "127.0.0.1:0";
    int fill = 0, count_term = 0, quiet = 0, lower_at = 0, lower_after_ms = 0;
    double heartbeat = 0;
    long long lower_to = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--quiet") == 0) {
            quiet = 1;
            continue;
        }
        if (!v) {
            say("error %s needs a value", a);
            return 2;
        }
        i++;
        if (strcmp(a, "--listen") == 0)
            listen_at = v;
        else if (strcmp(a, "--fill-to") == 0)
            fill = atoi(v);
        else if (strcmp(a, "--on-term") == 0)
            count_term = strcmp(v, "count") == 0;
        else if (strcmp(a, "--heartbeat") == 0)
            heartbeat = atof(v);
        else if (strcmp(a, "--lower-hard-at") == 0)
            lower_at = atoi(v);
        else if (strcmp(a, "--lower-to") == 0)
            lower_to = atoll(v);
        else if (strcmp(a, "--lower-after-ms") == 0)
            lower_after_ms = atoi(v);
        else {
            say("error unknown option %s", a);
            return 2;
        }
    }
    if (lower_at > 0 && lower_to < 0) {
        say("error --lower-hard-at needs --lower-to");
        return 2;
    }
    lower_to_cmd = lower_to;
    ep = epoll_create1(EPOLL_CLOEXEC);
    spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (pipe2(sig_pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
        say("error pipe: %s", strerror(errno));
        return 1;
    }
    watch(sig_pipe[0], EPOLLIN);
    if (count_term) {
        struct sigaction sa = {0};
        sa.sa_handler = on_term;
        sa.sa_flags = SA_RESTART;
        sigaction(SIGTERM, &sa, NULL);
    }
    struct sockaddr_in addr;
    if (parse_addr(listen_at, &addr) < 0) {
        say("error bad listen address %s", listen_at);
        return 2;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    socklen_t al = sizeof addr;
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(lfd, 512) < 0 || getsockname(lfd, (struct sockaddr *)&addr, &al) < 0) {
        say("error listen %s: %s", listen_at, strerror(errno));
        return 1;
    }
    watch(lfd, EPOLLIN);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    watch(0, EPOLLIN);
    int hb = heartbeat > 0 ? timer(heartbeat, heartbeat) : -1;
    int lower_timer = -1, lower_armed = 0;
    if (fill > 0)
        fill_to(fill);
    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &addr.sin_addr, host, sizeof host);
    say("listen %s:%d", host, ntohs(addr.sin_port));
    say("ready");

    long long accept_errors = 0;
    double last_error_said = -1e9;
    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno == EINTR)
            continue;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == sig_pipe[0]) {
                unsigned char b;
                while (read(sig_pipe[0], &b, 1) == 1)
                    say("signal %d fds=%d", b, count_fds());
            } else if (fd == 0) {
                if (!read_commands(0, 0, 0, 0))
                    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
            } else if (fd == hb) {
                drain(hb);
                for (int c = 0; c < MAX_FD; c++) {
                    if (conns[c] == FREE)
                        continue;
                    if (send(c, "\n", 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 && errno != EAGAIN &&
                        errno != EWOULDBLOCK && errno != EINTR) {
                        if (conns[c] == OPEN)
                            epoll_ctl(ep, EPOLL_CTL_DEL, c, NULL);
                        close(c);
                        conns[c] = FREE;
                        say("released %d", c);
                    }
                }
            } else if (fd == lower_timer) {
                drain(lower_timer);
                epoll_ctl(ep, EPOLL_CTL_DEL, lower_timer, NULL);
                close(lower_timer);
                lower_timer = -1;
                lower_hard((rlim_t)lower_to);
            } else if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) {
                        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                            break;
                        accept_errors++;
                        double t = now_s();
                        if (accept_errors == 1 || t - last_error_said >= 1.0) {
                            say("accept error: %s (%lld times)", strerror(errno), accept_errors);
                            last_error_said = t;
                        }
                        /* The listener stays readable: do not spin on it. */
                        usleep(20000);
                        break;
                    }
                    if (c >= MAX_FD) {
                        say("error fd %d too large", c);
                        close(c);
                        continue;
                    }
                    conns[c] = OPEN;
                    watch(c, EPOLLIN);
                    if (!quiet)
                        say("accepted %d", c);
                    int open_now = lower_at > 0 && !lower_armed ? count_fds() : 0;
                    if (lower_at > 0 && !lower_armed && open_now >= lower_at) {
                        lower_armed = 1;
                        say("crossed fds=%d at=%.6f", open_now, wall_s());
                        if (lower_after_ms > 0)
                            lower_timer = timer(lower_after_ms / 1000.0, 0);
                        else
                            lower_hard((rlim_t)lower_to);
                    }
                }
            } else if (fd >= 0 && fd < MAX_FD && conns[fd] == OPEN) {
                char buf[4096];
                ssize_t r = read(fd, buf, sizeof buf);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    /* The leak: out of the loop, never closed. */
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    conns[fd] = AT_EOF;
                    if (!quiet)
                        say("eof %d", fd);
                }
            }
        }
    }
}

static int client(int argc, char **argv)
{
    struct sockaddr_in to;
    if (argc < 4 || parse_addr(argv[2], &to) < 0 || atof(argv[3]) <= 0) {
        say("error usage: leak_server client HOST:PORT RATE");
        return 2;
    }
    double every = 1.0 / atof(argv[3]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    ep = epoll_create1(EPOLL_CLOEXEC);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    watch(0, EPOLLIN);
    int tick = timer(every, every);
    long long connected = 0, ended = 0, failed = 0;
    say("ready");
    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno == EINTR)
            continue;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == 0) {
                if (!read_commands(1, connected, ended, failed))
                    return 0;
            } else if (fd == tick) {
                drain(tick);
                if (paused)
                    continue;
                int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
                struct timeval tv = {.tv_sec = 2};
                setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
                if (s < 0 || connect(s, (struct sockaddr *)&to, sizeof to) < 0 ||
                    shutdown(s, SHUT_WR) < 0) {
                    if (failed++ == 0)
                        say("error connect: %s", strerror(errno));
                    if (s >= 0)
                        close(s);
                    continue;
                }
                fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
                watch(s, EPOLLIN);
                connected++;
            } else {
                char buf[4096];
                ssize_t r = read(fd, buf, sizeof buf);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    close(fd);
                    ended++;
                }
            }
        }
    }
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc > 1 && strcmp(argv[1], "client") == 0)
        return client(argc, argv);
    return server(argc, argv);
}
