/*
 * rseq_spin: a single-threaded TCP listener whose only thread spends nearly all its time
 * inside an rseq critical section, for tests/inject_rseq.rs. It uses the rseq area glibc
 * (>= 2.35) registers for every thread.
 *
 *   rseq_spin STATE_FILE
 *
 * STATE_FILE (created by the test, at least 64 bytes) is mapped shared; its u64 slots:
 *   [0] epoch           written by the test while the process is stopped
 *   [1] commits         sections that committed
 *   [2] aborts          sections the kernel (or an injector) sent to the abort handler
 *   [3] crossed         committed sections that saw the epoch change between their first
 *                       and their last instruction: a commit across a stop, the hazard
 *   [4] aborted_across  aborted sections that had started before an epoch change
 *
 * Every 16 sections it accepts one pending connection (non-blocking) and prints
 * `accepted FD PEERPORT`. It never reads or closes a connection, so a half-closed one
 * stays in CLOSE_WAIT. stdout also gets `listen 127.0.0.1:PORT`, `ready`, `error TEXT`.
 *
 *   rseq_spin STATE_FILE --block
 *
 * breaks the rules of rseq instead: it accepts one connection (blocking), then runs
 * sections that block in read(0) inside them, printing `committed N` or `aborted` after
 * each, so its thread sits in a system call inside a critical section.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/rseq.h>
#include <sys/socket.h>
#include <unistd.h>

enum { EPOCH, COMMITS, ABORTS, CROSSED, ABORTED_ACROSS, SLOTS };

/* About 30-100 us of spinning: a stop almost always lands inside the section. */
static const uint64_t spins = 100000;

static struct rseq *rseq_area(void) {
    char *tp;
    __asm__("movq %%fs:0, %0" : "=r"(tp));
    return (struct rseq *)(tp + __rseq_offset);
}

/*
 * One critical section: read the epoch, spin, read it again, and commit (a single store)
 * the difference. Returns 1 if it was aborted instead. The abort handler is preceded by
 * glibc's registered signature (RSEQ_SIG), as the kernel requires.
 */
static int section(struct rseq *rs, volatile uint64_t *epoch, uint64_t *out) {
    __asm__ __volatile__ goto(
        ".pushsection __rseq_cs, \"aw\"\n\t"
        ".balign 32\n\t"
        "3:\n\t"
        ".long 0x0, 0x0\n\t"         /* version, flags */
        ".quad 1f, (2f - 1f), 4f\n\t" /* start_ip, post_commit_offset, abort_ip */
        ".popsection\n\t"
        "leaq 3b(%%rip), %%rax\n\t"
        "movq %%rax, (%[cs])\n\t"
        "1:\n\t"
        "movq (%[epoch]), %%rcx\n\t"
        "movq %[spins], %%rdx\n\t"
        "5:\n\t"
        "decq %%rdx\n\t"
        "jnz 5b\n\t"
        "movq (%[epoch]), %%rax\n\t"
        "subq %%rcx, %%rax\n\t"
        "movq %%rax, (%[out])\n\t" /* the commit */
        "2:\n\t"
        ".pushsection __rseq_failure, \"ax\"\n\t"
        ".byte 0x0f, 0xb9, 0x3d\n\t"
        ".long 0x53053053\n\t"
        "4:\n\t"
        "jmp %l[aborted]\n\t"
        ".popsection\n\t"
        :
        : [cs] "r"(&rs->rseq_cs), [epoch] "r"(epoch), [spins] "r"(spins), [out] "r"(out)
        : "memory", "cc", "rax", "rcx", "rdx"
        : aborted);
    return 0;
aborted:
    return 1;
}

/* A section that blocks in read(0, buf, 1) and commits read's result. */
static int blocking_section(struct rseq *rs, char *buf, uint64_t *out) {
    __asm__ __volatile__ goto(
        ".pushsection __rseq_cs, \"aw\"\n\t"
        ".balign 32\n\t"
        "3:\n\t"
        ".long 0x0, 0x0\n\t"
        ".quad 1f, (2f - 1f), 4f\n\t"
        ".popsection\n\t"
        "leaq 3b(%%rip), %%rax\n\t"
        "movq %%rax, (%[cs])\n\t"
        "1:\n\t"
        "xorl %%eax, %%eax\n\t" /* SYS_read */
        "xorl %%edi, %%edi\n\t" /* fd 0 */
        "movq %[buf], %%rsi\n\t"
        "movl $1, %%edx\n\t"
        "syscall\n\t"
        "movq %%rax, (%[out])\n\t" /* the commit */
        "2:\n\t"
        ".pushsection __rseq_failure, \"ax\"\n\t"
        ".byte 0x0f, 0xb9, 0x3d\n\t"
        ".long 0x53053053\n\t"
        "4:\n\t"
        "jmp %l[aborted]\n\t"
        ".popsection\n\t"
        :
        : [cs] "r"(&rs->rseq_cs), [buf] "r"(buf), [out] "r"(out)
        : "memory", "cc", "rax", "rcx", "rdx", "rsi", "rdi", "r11"
        : aborted);
    return 0;
aborted:
    return 1;
}

static int block_mode(struct rseq *rs, int ls) {
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    int fl = fcntl(ls, F_GETFL);
    fcntl(ls, F_SETFL, fl & ~O_NONBLOCK);
    int fd = accept(ls, (struct sockaddr *)&peer, &plen);
    if (fd < 0) {
        printf("error accept: %s\n", strerror(errno));
        return 1;
    }
    printf("accepted %d %d\n", fd, ntohs(peer.sin_port));
    fflush(stdout);
    char buf[1];
    uint64_t out = 0;
    for (;;) {
        if (blocking_section(rs, buf, &out)) {
            printf("aborted\n");
        } else {
            printf("committed %lld\n", (long long)(int64_t)out);
            if ((int64_t)out <= 0)
                return 0;
        }
        fflush(stdout);
    }
}

int main(int argc, char **argv) {
    int block = argc == 3 && strcmp(argv[2], "--block") == 0;
    if (argc != 2 && !block) {
        fprintf(stderr, "usage: rseq_spin STATE_FILE [--block]\n");
        return 2;
    }
    int sf = open(argv[1], O_RDWR);
    if (sf < 0) {
        printf("error open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    volatile uint64_t *st = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, sf, 0);
    if (st == MAP_FAILED) {
        printf("error mmap: %s\n", strerror(errno));
        return 1;
    }
    struct rseq *rs = rseq_area();
    if (__rseq_size == 0 || (int32_t)rs->cpu_id < 0) {
        printf("error rseq is not registered (__rseq_size %u)\n", __rseq_size);
        return 1;
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(ls, 64) != 0 ||
        getsockname(ls, (struct sockaddr *)&addr, &len) != 0) {
        printf("error listen: %s\n", strerror(errno));
        return 1;
    }
    printf("listen 127.0.0.1:%d\nready\n", ntohs(addr.sin_port));
    fflush(stdout);
    if (block)
        return block_mode(rs, ls);
    uint64_t out = 0;
    for (unsigned long i = 0;; i++) {
        if (i % 16 == 0) {
            struct sockaddr_in peer;
            socklen_t plen = sizeof peer;
            int fd = accept4(ls, (struct sockaddr *)&peer, &plen, 0);
            if (fd >= 0) {
                printf("accepted %d %d\n", fd, ntohs(peer.sin_port));
                fflush(stdout);
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                printf("error accept: %s\n", strerror(errno));
                fflush(stdout);
            }
        }
        uint64_t start = st[EPOCH];
        if (section(rs, &st[EPOCH], &out)) {
            st[ABORTS]++;
            if (st[EPOCH] != start)
                st[ABORTED_ACROSS]++;
        } else {
            st[COMMITS]++;
            if (out != 0)
                st[CROSSED]++;
        }
    }
}
