/*
 * strict_holder: accepts one TCP connection, then enters seccomp strict mode (only read,
 * write, _exit and sigreturn allowed) and echoes what it reads on stdin, for
 * tests/inject.rs: an injected close() would kill it, so cwreap must refuse.
 *
 * stdout: `listen 127.0.0.1:PORT`, `ready`, `accepted FD PEERPORT`, `strict`, then
 * `read N` for each chunk of N bytes read from stdin; it exits when stdin ends.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static void say(const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

int main(void) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(ls, 4) != 0 ||
        getsockname(ls, (struct sockaddr *)&addr, &len) != 0) {
        printf("error listen\n");
        return 1;
    }
    printf("listen 127.0.0.1:%d\nready\n", ntohs(addr.sin_port));
    fflush(stdout);
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    int fd = accept(ls, (struct sockaddr *)&peer, &plen);
    if (fd < 0) {
        printf("error accept\n");
        return 1;
    }
    printf("accepted %d %d\n", fd, ntohs(peer.sin_port));
    fflush(stdout);
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0) != 0) {
        printf("error strict\n");
        return 1;
    }
    say("strict\n", 7);
    char buf[64];
    char line[32];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0)
            break;
        /* No snprintf: it may touch more than read and write. */
        int i = (int)sizeof line;
        line[--i] = '\n';
        do {
            line[--i] = (char)('0' + n % 10);
            n /= 10;
        } while (n > 0 && i > 0);
        say("read ", 5);
        say(line + i, sizeof line - (size_t)i);
    }
    syscall(SYS_exit, 0);
    return 0;
}
