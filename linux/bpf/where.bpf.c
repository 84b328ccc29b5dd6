// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * `cwreap explain --where`: the user stack of the read that returned EOF on a TCP socket,
 * and of the connect or accept that opened it. Built by `make bpf` into where.bpf.o
 * (checked in, embedded by the Rust crate); the user-space half, and the record layout it
 * parses, are in linux/src/bpf/where_*.rs.
 *
 * Four programs, attached only while the command runs:
 * - tp_btf/sock_recv_length (Linux 6.3+): a TCP read that returned 0 without MSG_PEEK, for
 *   a non-zero length where the syscall shows it: the EOF read. Kept by socket cookie.
 * - tp_btf/inet_sock_set_state to SYN_SENT: tcp_v4_connect/tcp_v6_connect run in the
 *   connecting task, so its user stack is the connect's. Kept by socket cookie.
 * - tp_btf/sys_exit for accept(2) and accept4(2) that returned an fd: the accepting task.
 *   Kept by (tgid, fd); user space joins it with the fd that holds the socket.
 * - tp_btf/tcp_destroy_sock: a socket kept by cookie is freed (it did not leak): forgotten.
 *
 * What is kept per socket (when, which thread, which stack) stays in kernel maps, and user
 * space looks up only the sockets it reports: a busy server's sockets that close normally
 * cost no record to user space. The ring buffer carries stacks, each with the frame-pointer
 * stack (bpf_get_stack, BPF_F_USER_STACK), the user registers, and a copy of the top of the
 * user stack for a CFI unwinder in user space. In a process whose stacks user space can
 * tell apart by hash (frame pointers it trusts, cw_where_trusted; or a layout of return
 * addresses for the call site, cw_where_layouts), a stack already sent for the same
 * (tgid, kind, hash) is not sent again: the kept record names it by its hash.
 * Self-contained like cwreap.bpf.c: no libbpf or kernel headers.
 */
#include "vmlinux.h"

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) __typeof__(val) *name
#define __always_inline inline __attribute__((always_inline))

/* include/uapi/linux/bpf.h */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_RINGBUF 27
#define BPF_NOEXIST 1
#define BPF_F_USER_STACK (1ULL << 8)
#define BPF_RB_NO_WAKEUP 1
#define BPF_RB_FORCE_WAKEUP 2
#define BPF_RB_AVAIL_DATA 0
#define BPF_RB_RING_SIZE 1

#define IPPROTO_TCP 6
#define TCP_SYN_SENT 2
#define TCP_LISTEN 10
#define MSG_PEEK 2

/* x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl). */
#define NR_READ 0
#define NR_RECVFROM 45
#define NR_ACCEPT 43
#define NR_ACCEPT4 288

struct pt_regs {
	unsigned long bp;
	unsigned long dx;
	unsigned long orig_ax;
	unsigned long ip;
	unsigned long sp;
} __attribute__((preserve_access_index));

static void *(*const bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*const bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static long (*const bpf_map_update_elem)(void *map, const void *key, const void *value,
					  __u64 flags) = (void *)2;
static __u64 (*const bpf_get_current_pid_tgid)(void) = (void *)14;
static long (*const bpf_get_current_comm)(void *buf, __u32 size) = (void *)16;
static __u64 (*const bpf_get_socket_cookie)(void *sk) = (void *)46;
static long (*const bpf_get_stack)(void *ctx, void *buf, __u32 size, __u64 flags) = (void *)67;
static long (*const bpf_probe_read_user)(void *dst, __u32 size, const void *src) = (void *)112;
static __u64 (*const bpf_ktime_get_boot_ns)(void) = (void *)125;
static long (*const bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size,
					__u64 flags) = (void *)130;
static __u64 (*const bpf_ringbuf_query)(void *ringbuf, __u64 flags) = (void *)134;
static struct task_struct *(*const bpf_get_current_task_btf)(void) = (void *)158;
static struct pt_regs *(*const bpf_task_pt_regs)(struct task_struct *task) = (void *)175;

/* Record kinds. */
#define CW_WHERE_EOF 1
#define CW_WHERE_CONNECT 2
#define CW_WHERE_ACCEPT 3

/* Record flags. */
#define CW_WHERE_FULL 1       /* frames, registers and stack bytes follow the header (always) */
#define CW_WHERE_REMEMBERED 2 /* its hash names it from now on: records kept later may refer
			       * to it without sending it again */

#define CW_WHERE_FRAMES 64
/* The whole record stays within the per-CPU map value limit (32768 bytes). */
#define CW_WHERE_STACK_MAX 16384

/*
 * One ring-buffer record: a stack (parsed in linux/src/bpf/where_record.rs; keep both in
 * step). The 88-byte header, then the frames and `stack_len` bytes of stack, so a record
 * is 88 + 512 + stack_len bytes.
 */
struct cw_where {
	__u8 kind;      /* CW_WHERE_* */
	__u8 flags;     /* CW_WHERE_FULL */
	__u16 nframes;  /* frame-pointer frames in `frames` (full records) */
	__u32 tgid;
	__u32 tid;
	__u32 fd;       /* accept: the returned fd; else 0 */
	__u64 cookie;   /* eof, connect: socket cookie; accept: 0 */
	__u64 ts_ns;    /* CLOCK_BOOTTIME */
	__u64 hash;     /* names the stack within (tgid, kind): what kept records refer to */
	char comm[16];
	__u64 ip;       /* user registers at the syscall */
	__u64 sp;
	__u64 bp;
	__u32 stack_len; /* bytes of stack copied from sp (full records) */
	__u32 _pad;
	__u64 frames[CW_WHERE_FRAMES];
	__u8 stack[CW_WHERE_STACK_MAX];
};
#define CW_WHERE_HEADER 88
#define CW_WHERE_FIXED (CW_WHERE_HEADER + 8 * CW_WHERE_FRAMES)
_Static_assert(__builtin_offsetof(struct cw_where, frames) == CW_WHERE_HEADER, "header");
_Static_assert(sizeof(struct cw_where) <= 32768, "per-CPU map value limit");

struct cw_where_key {
	__u32 tgid;
	__u32 kind;
	__u64 hash;
};

/* Scratch for building a record (too large for the BPF stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cw_where);
} cw_where_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
} cw_where_events SEC(".maps");

/* Stacks already sent. A plain hash, not LRU: when full, new stacks are sent whole and
 * counted (CW_COUNT_SEEN_FULL) rather than old ones forgotten silently. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct cw_where_key);
	__type(value, __u8);
} cw_where_seen SEC(".maps");

/* One record kept in the kernel: when, which thread, and which stack (the ring record of
 * (tgid, kind, hash)). Read by user space (linux/src/bpf/where_load.rs; keep in step). */
struct cw_where_at {
	__u64 ts_ns; /* CLOCK_BOOTTIME; 0: none */
	__u64 hash;
	__u32 tgid;
	__u32 tid;
};

/* The EOF read and the connect of a socket, until it is freed (a socket that did not leak
 * is forgotten then). A plain hash, not LRU: when full, a socket not kept is counted
 * (CW_COUNT_SOCKS_FULL), never one kept forgotten silently. */
struct cw_where_sock {
	struct cw_where_at eof;
	struct cw_where_at connect;
};

#define CW_WHERE_SOCKS 131072
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CW_WHERE_SOCKS);
	__type(key, __u64);
	__type(value, struct cw_where_sock);
} cw_where_socks SEC(".maps");

/* The last accept that returned each (tgid, fd): a later accept into the same fd number
 * replaces it; user space forgets the entries of processes gone. */
struct cw_where_fd {
	__u32 tgid;
	__u32 fd;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct cw_where_fd);
	__type(value, struct cw_where_at);
} cw_where_accepts SEC(".maps");

/* Processes whose frame-pointer stacks user space checked against CFI (tgid → 1): only
 * their stacks are deduplicated. In a binary without frame pointers, the frame pointer
 * register holds data, and a stale chain left on a reused thread stack can hash two
 * different paths alike. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} cw_where_trusted SEC(".maps");

/*
 * Where the return addresses are, for a process without trusted frame pointers: user space
 * unwinds one stack taken at the instruction pointer `ip` with CFI and stores the offsets
 * from sp of its first return addresses. The frame sizes along a path are fixed by its
 * code, so the words at these offsets are that path's return addresses whenever the first
 * ones match: their hash tells paths apart, and a stack whose hash was sent before is not
 * sent again.
 */
#define CW_WHERE_LAYOUT_DEPTH 16
/* The outermost offset a layout may have: the words are read in one span this long. */
#define CW_WHERE_LAYOUT_SPAN 4096
struct cw_where_layout_key {
	__u32 tgid;
	__u32 _pad;
	__u64 ip;
};

struct cw_where_layout {
	__u32 n;
	__u32 off[CW_WHERE_LAYOUT_DEPTH];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cw_where_layout_key);
	__type(value, struct cw_where_layout);
} cw_where_layouts SEC(".maps");

/* Only these processes (tgid → 1) when cw_where_filter is set. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} cw_where_pids SEC(".maps");

/* Counters, per CPU. */
#define CW_COUNT_LOST 0         /* stacks the ring buffer had no room for */
#define CW_COUNT_SEEN_FULL 1    /* stacks not remembered: cw_where_seen was full */
#define CW_COUNT_NO_STACK 2     /* stacks whose bytes could not be read */
#define CW_COUNT_FULL 3         /* stacks sent */
#define CW_COUNT_SHORT 4        /* records kept whose stack was sent before */
#define CW_COUNT_SOCKS_FULL 5   /* EOF reads and connects not kept: cw_where_socks was full */
#define CW_COUNT_ACCEPTS_FULL 6 /* accepts not kept: cw_where_accepts was full */
#define CW_COUNTERS 7
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CW_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} cw_where_counts SEC(".maps");

/* Set by the loader (read-only afterwards). */
volatile const __u8 cw_where_filter = 0;      /* 1: only tgids in cw_where_pids */
volatile const __u32 cw_where_copy = 16384;   /* stack bytes to copy, at most CW_WHERE_STACK_MAX */

char LICENSE[] SEC("license") = "Dual MIT/GPL";

static __always_inline void cw_count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&cw_where_counts, &which);

	if (n)
		*n += 1;
}

/* Waking the reader at every record costs the traced thread a wakeup per syscall hooked:
 * wake it only once an eighth of the ring is full (it also polls on its own). */
static __always_inline __u64 cw_wakeup(void)
{
	__u64 avail = bpf_ringbuf_query(&cw_where_events, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&cw_where_events, BPF_RB_RING_SIZE);

	return avail > size / 8 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline int cw_wanted(__u32 tgid)
{
	if (!cw_where_filter)
		return 1;
	return bpf_map_lookup_elem(&cw_where_pids, &tgid) != 0;
}

/* Keep what thread `r` did to the socket `cookie` (eof, connect) or to the fd `fd` it
 * accepted into, naming its stack by r->hash. */
static __always_inline void cw_keep(struct cw_where *r, __u8 kind, __u64 cookie, __u32 fd)
{
	struct cw_where_at at = { .ts_ns = r->ts_ns, .hash = r->hash, .tgid = r->tgid, .tid = r->tid };

	if (kind == CW_WHERE_ACCEPT) {
		struct cw_where_fd key = { .tgid = r->tgid, .fd = fd };

		if (bpf_map_update_elem(&cw_where_accepts, &key, &at, 0 /* BPF_ANY */))
			cw_count(CW_COUNT_ACCEPTS_FULL);
		return;
	}
	/* Most sockets have no entry yet (a server's EOF read, a client's connect): one
	 * insert. Else the other half is kept already: write this one in place. */
	struct cw_where_sock fresh = {};

	if (kind == CW_WHERE_EOF)
		fresh.eof = at;
	else
		fresh.connect = at;
	if (bpf_map_update_elem(&cw_where_socks, &cookie, &fresh, BPF_NOEXIST) == 0)
		return;
	struct cw_where_sock *s = bpf_map_lookup_elem(&cw_where_socks, &cookie);

	if (!s) {
		cw_count(CW_COUNT_SOCKS_FULL);
		return;
	}
	if (kind == CW_WHERE_EOF)
		s->eof = at;
	else
		s->connect = at;
}

/* Send the stack in `r` (its header filled in): false when the ring buffer had no room. */
static __always_inline int cw_send(struct cw_where *r, __u32 len)
{
	if (len > CW_WHERE_STACK_MAX)
		return 0;
	if (bpf_ringbuf_output(&cw_where_events, r, CW_WHERE_FIXED + len, cw_wakeup())) {
		cw_count(CW_COUNT_LOST);
		return 0;
	}
	cw_count(CW_COUNT_FULL);
	return 1;
}

static __always_inline int cw_record(void *ctx, struct pt_regs *regs, __u8 kind, __u64 cookie,
				     __u32 fd)
{
	__u32 zero = 0;
	struct cw_where *r = bpf_map_lookup_elem(&cw_where_scratch, &zero);
	__u64 id = bpf_get_current_pid_tgid();

	if (!r)
		return 0;
	r->kind = kind;
	r->tgid = id >> 32;
	r->tid = (__u32)id;
	r->fd = fd;
	r->cookie = cookie;
	r->ts_ns = bpf_ktime_get_boot_ns();
	r->_pad = 0;
	r->ip = regs->ip;
	r->sp = regs->sp;
	r->bp = regs->bp;

	/* A call site whose layout user space has set: its hash needs no frame walk, and a
	 * stack sent before is kept as its hash alone. */
	struct cw_where_layout_key lk = { .tgid = r->tgid, ._pad = 0, .ip = r->ip };
	struct cw_where_layout *lay = bpf_map_lookup_elem(&cw_where_layouts, &lk);
	int laid = 0;
	__u8 one = 1;
	struct cw_where_key key = { .tgid = r->tgid, .kind = kind, .hash = 0 };

	if (lay) {
		__u64 h = (0xcbf29ce484222325ULL ^ r->ip) * 0x100000001b3ULL;
		__u32 last = 0;

		/* One read of the words up to the outermost offset (a read costs more than the
		 * bytes it copies); the stack was readable that far when the layout was made. */
		for (int i = 0; i < CW_WHERE_LAYOUT_DEPTH; i++) {
			if (i >= lay->n)
				break;
			if (lay->off[i] > last)
				last = lay->off[i];
		}
		__u32 span = (last & (CW_WHERE_LAYOUT_SPAN - 1) & ~7U) + 8;

		if (last >= CW_WHERE_LAYOUT_SPAN ||
		    bpf_probe_read_user(r->stack, span, (void *)r->sp) != 0)
			goto walk;
		for (int i = 0; i < CW_WHERE_LAYOUT_DEPTH; i++) {
			if (i >= lay->n)
				break;
			__u32 off = lay->off[i] & (CW_WHERE_LAYOUT_SPAN - 1) & ~7U;

			h = (h ^ *(__u64 *)&r->stack[off]) * 0x100000001b3ULL;
		}
		key.hash = (h ^ kind ^ 0x4c41594f5554ULL) * 0x100000001b3ULL;
		laid = 1;
		if (bpf_map_lookup_elem(&cw_where_seen, &key)) {
			r->hash = key.hash;
			cw_keep(r, kind, cookie, fd);
			cw_count(CW_COUNT_SHORT);
			return 0;
		}
	}

walk:;
	long got = bpf_get_stack(ctx, r->frames, sizeof(r->frames), BPF_F_USER_STACK);
	__u32 n = got > 0 ? (__u32)got / 8 : 0;

	if (n > CW_WHERE_FRAMES)
		n = CW_WHERE_FRAMES;
	r->nframes = n;

	int trusted = laid || (n >= 3 && bpf_map_lookup_elem(&cw_where_trusted, &key.tgid) != 0);

	if (!laid) {
		/* FNV-1a over the frames and the word at sp (the return address into the caller
		 * of a libc wrapper, which frame pointers skip). */
		__u64 hash = 0xcbf29ce484222325ULL, at_sp = 0;

		bpf_probe_read_user(&at_sp, sizeof(at_sp), (void *)r->sp);
		hash = (hash ^ at_sp) * 0x100000001b3ULL;
		for (__u32 i = 0; i < CW_WHERE_FRAMES; i++) {
			if (i >= n)
				break;
			hash = (hash ^ r->frames[i]) * 0x100000001b3ULL;
		}
		hash = (hash ^ kind) * 0x100000001b3ULL;
		/* Untrusted frame pointers may hash two paths alike: such a stack gets a name
		 * of its own (thread and time), sent with it. */
		if (!trusted)
			hash = ((hash ^ r->ts_ns) * 0x100000001b3ULL ^ id) * 0x100000001b3ULL;
		key.hash = hash;
	}
	r->hash = key.hash;
	cw_keep(r, kind, cookie, fd);
	if (trusted && bpf_map_lookup_elem(&cw_where_seen, &key)) {
		cw_count(CW_COUNT_SHORT);
		return 0;
	}
	bpf_get_current_comm(r->comm, sizeof(r->comm));

	/* The stack mapping may end before sp + copy (a shallow thread). It ends on a page
	 * boundary: retry at the page boundaries below sp + copy, the largest first. */
	__u32 len = cw_where_copy;

	if (len > CW_WHERE_STACK_MAX)
		len = CW_WHERE_STACK_MAX;
	__u32 first = 4096 - (r->sp & 4095);
	long err = bpf_probe_read_user(r->stack, len, (void *)r->sp);

	for (int i = CW_WHERE_STACK_MAX / 4096 - 1; err != 0 && i >= 0; i--) {
		__u32 try = first + (__u32)i * 4096;

		if (try >= len)
			continue;
		err = bpf_probe_read_user(r->stack, try, (void *)r->sp);
		if (err == 0)
			len = try;
	}
	if (err != 0) {
		len = 0;
		cw_count(CW_COUNT_NO_STACK);
	}
	r->stack_len = len;
	r->flags = trusted ? CW_WHERE_FULL | CW_WHERE_REMEMBERED : CW_WHERE_FULL;
	if (cw_send(r, len) && trusted &&
	    bpf_map_update_elem(&cw_where_seen, &key, &one, BPF_NOEXIST))
		cw_count(CW_COUNT_SEEN_FULL);
	return 0;
}

/* sock_recv_length(struct sock *sk, int ret, int flags) */
SEC("tp_btf/sock_recv_length")
int cw_where_eof(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	int ret = (int)ctx[1];
	int flags = (int)ctx[2];

	if (ret != 0 || (flags & MSG_PEEK))
		return 0;
	if (sk->sk_protocol != IPPROTO_TCP || sk->__sk_common.skc_state == TCP_LISTEN)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();

	if (!cw_wanted(id >> 32))
		return 0;

	struct pt_regs *regs = bpf_task_pt_regs(bpf_get_current_task_btf());

	/* A read of zero bytes also returns 0: skip it where the syscall shows the length. */
	unsigned long nr = regs->orig_ax;

	if ((nr == NR_READ || nr == NR_RECVFROM) && regs->dx == 0)
		return 0;
	return cw_record(ctx, regs, CW_WHERE_EOF, bpf_get_socket_cookie(sk), 0);
}

/* inet_sock_set_state(const struct sock *sk, int oldstate, int newstate) */
SEC("tp_btf/inet_sock_set_state")
int cw_where_connect(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	int newstate = (int)ctx[2];

	if (newstate != TCP_SYN_SENT || sk->sk_protocol != IPPROTO_TCP)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();

	if (!cw_wanted(id >> 32))
		return 0;
	struct pt_regs *regs = bpf_task_pt_regs(bpf_get_current_task_btf());

	return cw_record(ctx, regs, CW_WHERE_CONNECT, bpf_get_socket_cookie(sk), 0);
}

/* sys_exit(struct pt_regs *regs, long ret) */
SEC("tp_btf/sys_exit")
int cw_where_accept(__u64 *ctx)
{
	struct pt_regs *regs = (struct pt_regs *)ctx[0];
	long ret = (long)ctx[1];

	if (ret < 0)
		return 0;
	unsigned long nr = regs->orig_ax;

	if (nr != NR_ACCEPT && nr != NR_ACCEPT4)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();

	if (!cw_wanted(id >> 32))
		return 0;
	return cw_record(ctx, regs, CW_WHERE_ACCEPT, 0, (__u32)ret);
}

/* tcp_destroy_sock(struct sock *sk): a socket is freed, so it was closed: forget it. */
SEC("tp_btf/tcp_destroy_sock")
int cw_where_closed(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];

	/* A socket whose cookie was never asked for was never kept. */
	if (sk->__sk_common.skc_cookie.counter == 0)
		return 0;
	__u64 cookie = bpf_get_socket_cookie(sk);

	bpf_map_delete_elem(&cw_where_socks, &cookie);
	return 0;
}
