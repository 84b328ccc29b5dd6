/* A process whose command line cannot be read: anyone reading /proc/PID/cmdline (or
 * environ, or maps) waits in the kernel until this process lets go.
 *
 * The kernel reads a command line under the process's mmap lock. Here one thread holds that
 * lock for reading without end: it reads, through /proc/self/mem, a page of a file on a FUSE
 * mount whose server never answers a READ. A second thread then asks for the lock for
 * writing (mmap), and from then on every new reader queues behind it.
 *
 * (Trapping the argv page itself no longer works: since Linux 4.17 a command line is read
 * from anonymous memory only, and a remote read of an unserved userfaultfd page fails at
 * once instead of waiting.)
 *
 * The FUSE server is a child process that dies with this one (PR_SET_PDEATHSIG); its end
 * aborts the connection, the READ fails, and the lock is released. The mount lives in a mount
 * namespace of its own. Needs root (/dev/fuse, mount).
 *
 * Prints "stalled" once a reader would block, then waits until killed. When the trap does not
 * arm (the writer got the lock: the reading thread was not holding it while it waited, as a
 * fault may drop the lock to wait for I/O and then never retake it), it prints "unarmed" and
 * exits with status 3: the caller starts another.
 *
 * With --connect HOST:PORT (IPv4) it first opens a TCP connection there and holds it, never
 * reading it, and prints "connected FD": when the peer closes, the process holds a CLOSE_WAIT
 * socket, so `cwreap explain` has a reason to read its memory map.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <unistd.h>

#define FILE_NODE 2
#define FILE_SIZE (1 << 20)

static int fuse_fd = -1;

static void die(const char *what) {
    fprintf(stderr, "stall_mm: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void reply(uint64_t unique, int error, const void *body, size_t len) {
    struct fuse_out_header out = {
        .len = (uint32_t)(sizeof out + len), .error = error, .unique = unique};
    struct iovec iov[2] = {{&out, sizeof out}, {(void *)body, len}};
    if (writev(fuse_fd, iov, body ? 2 : 1) < 0 && errno != ENOENT)
        fprintf(stderr, "stall_mm: reply: %s\n", strerror(errno));
}

static void attr_of(uint64_t node, struct fuse_attr *a) {
    memset(a, 0, sizeof *a);
    a->ino = node;
    a->nlink = 1;
    a->blksize = 4096;
    if (node == FUSE_ROOT_ID) {
        a->mode = S_IFDIR | 0755;
    } else {
        a->mode = S_IFREG | 0644;
        a->size = FILE_SIZE;
        a->blocks = FILE_SIZE / 512;
    }
}

/* Answers what a lookup, open and mmap of the one file need, never a READ; writes one byte
 * to `seen` when the first READ arrives. */
static void serve(int seen) {
    static char buf[FUSE_MIN_READ_BUFFER + (1 << 20)];
    int told = 0;
    for (;;) {
        ssize_t n = read(fuse_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT)
                continue;
            _exit(0); /* unmounted or aborted */
        }
        if ((size_t)n < sizeof(struct fuse_in_header))
            continue;
        struct fuse_in_header *in = (struct fuse_in_header *)buf;
        void *arg = buf + sizeof *in;
        switch (in->opcode) {
        case FUSE_INIT: {
            struct fuse_init_in *init = arg;
            struct fuse_init_out out = {
                .major = FUSE_KERNEL_VERSION,
                .minor = FUSE_KERNEL_MINOR_VERSION,
                .max_readahead = init->max_readahead,
                .max_write = 4096,
                .max_background = 16,
                .congestion_threshold = 12,
                .time_gran = 1,
            };
            reply(in->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_LOOKUP: {
            if (strcmp((char *)arg, "page") != 0) {
                reply(in->unique, -ENOENT, NULL, 0);
                break;
            }
            struct fuse_entry_out out = {
                .nodeid = FILE_NODE, .entry_valid = 3600, .attr_valid = 3600};
            attr_of(FILE_NODE, &out.attr);
            reply(in->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_GETATTR: {
            struct fuse_attr_out out = {.attr_valid = 3600};
            attr_of(in->nodeid, &out.attr);
            reply(in->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_OPEN:
        case FUSE_OPENDIR: {
            struct fuse_open_out out = {.fh = 1};
            reply(in->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_READ: /* the trap: never answered */
            if (!told) {
                told = 1;
                if (write(seen, "r", 1) != 1)
                    _exit(1);
            }
            break;
        case FUSE_FORGET: /* these take no answer */
        case FUSE_BATCH_FORGET:
        case FUSE_INTERRUPT:
            break;
        case FUSE_FLUSH:
        case FUSE_RELEASE:
        case FUSE_RELEASEDIR:
            reply(in->unique, 0, NULL, 0);
            break;
        default:
            reply(in->unique, -ENOSYS, NULL, 0);
        }
    }
}

static char *page_addr;

/* Reads the FUSE page through /proc/self/mem: the kernel holds the mmap lock for reading
 * while it waits for the READ. */
static void *hold_read(void *unused) {
    (void)unused;
    int mem = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
    if (mem < 0)
        die("/proc/self/mem");
    char c;
    (void)pread(mem, &c, 1, (off_t)(uintptr_t)page_addr);
    return NULL; /* only once the server is gone */
}

static pid_t writer_tid;
static int writer_done;
static int go[2];

/* Asks for the mmap lock for writing once told to: it queues behind the reader. Started
 * beforehand, as starting a thread maps its stack and would queue the main thread instead. */
static void *want_write(void *unused) {
    (void)unused;
    __atomic_store_n(&writer_tid, (pid_t)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
    char c;
    if (read(go[0], &c, 1) != 1)
        return NULL;
    (void)mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    __atomic_store_n(&writer_done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* The state letter of thread `tid` of this process. */
static char thread_state(pid_t tid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return '?';
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return '?';
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' ? p[2] : '?';
}

/* Connect to HOST:PORT and keep the socket; returns its fd. */
static int connect_to(const char *text) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) {
        fprintf(stderr, "stall_mm: bad address %s\n", text);
        exit(2);
    }
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "stall_mm: bad IPv4 address %s\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("connect");
    return fd;
}

int main(int argc, char **argv) {
    /* stdout's buffer now, not once the mmap lock is wanted by the writer. */
    static char outbuf[256];
    setvbuf(stdout, outbuf, _IOLBF, sizeof outbuf);
    if (argc == 3 && strcmp(argv[1], "--connect") == 0) {
        printf("connected %d\n", connect_to(argv[2]));
        fflush(stdout);
    } else if (argc != 1) {
        fprintf(stderr, "usage: stall_mm [--connect HOST:PORT]\n");
        return 2;
    }
    if (unshare(CLONE_NEWNS) < 0)
        die("unshare(CLONE_NEWNS)");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        die("making / private");
    char dir[] = "/tmp/stall_mm.XXXXXX";
    if (!mkdtemp(dir))
        die("mkdtemp");
    fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0)
        die("/dev/fuse");
    char opts[128];
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0", fuse_fd);
    if (mount("stall_mm", dir, "fuse", MS_NOSUID | MS_NODEV, opts) < 0)
        die("mount fuse");
    int seen[2];
    if (pipe2(seen, O_CLOEXEC) < 0)
        die("pipe");
    pid_t parent = getpid();
    pid_t server = fork();
    if (server < 0)
        die("fork");
    if (server == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        close(seen[0]);
        serve(seen[1]);
    }
    /* Only the server holds the device now: its end aborts the connection. */
    close(fuse_fd);
    close(seen[1]);
    char path[64];
    snprintf(path, sizeof path, "%s/page", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open the FUSE file");
    page_addr = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
    if (page_addr == MAP_FAILED)
        die("mmap the FUSE file");
    close(fd);
    rmdir(dir); /* a mount point in this namespace only; the host's directory goes */
    pthread_t reader, writer;
    if (pipe2(go, O_CLOEXEC) < 0)
        die("pipe");
    if (pthread_create(&writer, NULL, want_write, NULL) != 0)
        die("pthread_create");
    if (pthread_create(&reader, NULL, hold_read, NULL) != 0)
        die("pthread_create");
    char r;
    if (read(seen[0], &r, 1) != 1) {
        fprintf(stderr, "stall_mm: the FUSE server never saw the READ\n");
        return 1;
    }
    if (write(go[1], "w", 1) != 1)
        die("waking the writer");
    /* The writer is queued once it sleeps in the kernel (D: a killable wait for the lock).
     * From here on, nothing may map memory: printf's buffer was set up before. */
    for (;;) {
        pid_t tid = __atomic_load_n(&writer_tid, __ATOMIC_SEQ_CST);
        if (tid && thread_state(tid) == 'D')
            break;
        if (__atomic_load_n(&writer_done, __ATOMIC_SEQ_CST)) {
            printf("unarmed\n");
            fflush(stdout);
            _exit(3);
        }
        usleep(1000);
    }
    printf("stalled\n");
    fflush(stdout);
    for (;;)
        pause();
}
