/* A deliberately leaky TCP echo server in C, for cwreap's tests.
 *
 *     leaky-c [--listen ADDR]... [--dead-leader] [--drop]
 *
 * ADDR is HOST:PORT, IPv6 as [HOST]:PORT (default 127.0.0.1:0). stdout, one event per line:
 * `listen ADDR` per listener, `ready`, `accepted FD LOCAL REMOTE`, `eof FD` (the peer
 * half-closed), `released FD` (we closed FD), `error TEXT`.
 *
 * One thread, one level-triggered epoll loop, echoing. When read() returns 0 the fd stays
 * registered (with an empty event mask) and is never closed: the socket stays in CLOSE_WAIT.
 * epoll always reports EPOLLHUP/EPOLLERR, whatever the mask: when the socket is shut down
 * from outside, the loop deletes and closes the fd and says `released FD`; ignoring a
 * level-triggered EPOLLHUP would spin. Writes use MSG_NOSIGNAL: no SIGPIPE.
 *
 * --drop: when read() returns 0, the loop forgets the connection instead: it deletes the fd
 * from the epoll set and clears its record, but never closes the fd (the bug of a
 * `del_conn()` that frees everything but the fd). Nothing watches the socket any more, so
 * nothing notices a shutdown from outside either: no `released` line.
 *
 * --dead-leader: the main thread starts two threads, the event loop and one that only
 * sleeps, and ends with pthread_exit(). The process lives on with a zombie thread-group
 * leader, the way some servers end main() once their workers run: /proc/PID/fd is then
 * empty, and pidfd_getfd through the process's pidfd fails with ESRCH. The loop thread
 * says `ready` once it has joined the main thread.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_LISTEN 8
#define MAX_FD 65536

enum state { FREE = 0, OPEN, EOF_LEAKED };

struct conn {
    enum state state;
    char *out; /* bytes not yet echoed */
    size_t out_len;
};

static struct conn conns[MAX_FD];
static int is_listener[MAX_FD];
static int ep;
static int drop_at_eof;

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void fmt_addr(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        port = ntohs(a->sin_port);
        snprintf(buf, len, "%s:%d", host, port);
    } else {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        port = ntohs(a->sin6_port);
        snprintf(buf, len, "[%s]:%d", host, port);
    }
}

static int open_listener(const char *text)
{
    char host[128];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) {
        say("error bad listen address %s", text);
        exit(2);
    }
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    int port = atoi(colon + 1);
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        host[hl - 1] = 0;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) != 1) {
            say("error bad IPv6 address %s", text);
            exit(2);
        }
        sl = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
            say("error bad IPv4 address %s", text);
            exit(2);
        }
        sl = sizeof *a;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&ss, sl) < 0 || listen(fd, 128) < 0) {
        say("error listen %s: %s", text, strerror(errno));
        exit(1);
    }
    return fd;
}

static void set_events(int fd, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0)
        say("error epoll_ctl mod %d: %s", fd, strerror(errno));
}

static void release(int fd)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(conns[fd].out);
    memset(&conns[fd], 0, sizeof conns[fd]);
    say("released %d", fd);
}

static void accept_all(int lfd)
{
    for (;;) {
        struct sockaddr_storage peer, local;
        socklen_t pl = sizeof peer, ll = sizeof local;
        int fd = accept4(lfd, (struct sockaddr *)&peer, &pl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                say("error accept: %s", strerror(errno));
            return;
        }
        if (fd >= MAX_FD) {
            say("error fd %d too large", fd);
            close(fd);
            continue;
        }
        getsockname(fd, (struct sockaddr *)&local, &ll);
        char l[80], r[80];
        fmt_addr(&local, l, sizeof l);
        fmt_addr(&peer, r, sizeof r);
        say("accepted %d %s %s", fd, l, r);
        conns[fd].state = OPEN;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            say("error epoll_ctl add %d: %s", fd, strerror(errno));
    }
}

/* Send what is pending (stops at EAGAIN); returns -1 if the connection is dead. */
static int flush_out(int fd)
{
    struct conn *c = &conns[fd];
    while (c->out_len > 0) {
        ssize_t n = send(fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            say("error send fd %d: %s", fd, strerror(errno));
            return -1;
        }
        memmove(c->out, c->out + n, c->out_len - n);
        c->out_len -= n;
    }
    return 0;
}

/* The interest mask for the connection's state: reading while open, writing while output
 * waits. A leaked fd at EOF with nothing to send gets an empty mask (still registered). */
static void update_events(int fd)
{
    struct conn *c = &conns[fd];
    uint32_t events = (c->state == OPEN ? EPOLLIN | EPOLLRDHUP : 0) | (c->out_len > 0 ? EPOLLOUT : 0);
    set_events(fd, events);
}

static void on_conn(int fd, uint32_t events)
{
    struct conn *c = &conns[fd];
    if (events & (EPOLLHUP | EPOLLERR)) {
        /* Shut down from outside (or reset): nothing more can happen on it. */
        release(fd);
        return;
    }
    if (c->state == OPEN && (events & (EPOLLIN | EPOLLRDHUP))) {
        char buf[65536];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n > 0) {
            char *grown = realloc(c->out, c->out_len + n);
            if (!grown) {
                say("error out of memory");
                exit(1);
            }
            c->out = grown;
            memcpy(c->out + c->out_len, buf, n);
            c->out_len += n;
        } else if (n == 0) {
            if (drop_at_eof) {
                /* The leak: forget the connection, but not by close(). */
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                free(c->out);
                memset(c, 0, sizeof *c);
                say("eof %d", fd);
                return;
            }
            /* The leak: keep the fd, registered, never close it. */
            c->state = EOF_LEAKED;
            say("eof %d", fd);
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            say("error read fd %d: %s", fd, strerror(errno));
            release(fd);
            return;
        }
    }
    if (flush_out(fd) < 0) {
        release(fd);
        return;
    }
    update_events(fd);
}

static void run_loop(void)
{
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            say("error epoll_wait: %s", strerror(errno));
            exit(1);
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (is_listener[fd])
                accept_all(fd);
            else if (conns[fd].state != FREE)
                on_conn(fd, evs[i].events);
        }
    }
}

static pthread_t main_thread;

static void *loop_thread(void *arg)
{
    (void)arg;
    int err = pthread_join(main_thread, NULL);
    if (err != 0) {
        say("error pthread_join main: %s", strerror(err));
        exit(1);
    }
    say("ready");
    run_loop();
    return NULL;
}

static void *idle_thread(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    const char *addrs[MAX_LISTEN];
    int n_addrs = 0;
    int dead_leader = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc && n_addrs < MAX_LISTEN) {
            addrs[n_addrs++] = argv[++i];
        } else if (strcmp(argv[i], "--drop") == 0) {
            drop_at_eof = 1;
        } else if (strcmp(argv[i], "--dead-leader") == 0) {
            dead_leader = 1;
        } else {
            fprintf(stderr, "usage: leaky-c [--listen ADDR]... [--dead-leader] [--drop]\n");
            return 2;
        }
    }
    if (n_addrs == 0)
        addrs[n_addrs++] = "127.0.0.1:0";
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        say("error epoll_create1: %s", strerror(errno));
        return 1;
    }
    int lfds[MAX_LISTEN];
    for (int i = 0; i < n_addrs; i++) {
        lfds[i] = open_listener(addrs[i]);
        is_listener[lfds[i]] = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, lfds[i], &ev);
    }
    for (int i = 0; i < n_addrs; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        char text[80];
        getsockname(lfds[i], (struct sockaddr *)&ss, &sl);
        fmt_addr(&ss, text, sizeof text);
        say("listen %s", text);
    }
    if (dead_leader) {
        pthread_t idle, loop;
        main_thread = pthread_self();
        int err = pthread_create(&idle, NULL, idle_thread, NULL);
        if (err == 0)
            err = pthread_create(&loop, NULL, loop_thread, NULL);
        if (err != 0) {
            say("error pthread_create: %s", strerror(err));
            return 1;
        }
        pthread_exit(NULL);
    }
    say("ready");
    run_loop();
    return 0;
}
