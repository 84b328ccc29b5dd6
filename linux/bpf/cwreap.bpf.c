// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * cwreap's kernel side: which sockets enter and leave CLOSE_WAIT, when, and which fds hold
 * sockets. Built by `make bpf` into cwreap.bpf.o (checked in, embedded by the Rust crate);
 * the user-space half, and the record layouts it parses, are in linux/src/bpf/.
 *
 * Self-contained on purpose: no libbpf or kernel headers, so the object depends only on
 * this directory and the pinned clang, and rebuilds byte for byte.
 */
#include "vmlinux.h"

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) __typeof__(val) *name
#define __always_inline inline __attribute__((always_inline))

/* include/uapi/linux/bpf.h */
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_LRU_HASH 9
#define BPF_MAP_TYPE_RINGBUF 27
#define BPF_ANY 0

/* include/uapi/linux/in.h, include/net/tcp_states.h */
#define IPPROTO_TCP 6
#define TCP_CLOSE_WAIT 8

/* Helper numbers from enum bpf_func_id (include/uapi/linux/bpf.h): stable kernel ABI. */
static void *(*const bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*const bpf_map_update_elem)(void *map, const void *key, const void *value,
					  __u64 flags) = (void *)2;
static long (*const bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static __u64 (*const bpf_get_socket_cookie)(void *sk) = (void *)46;
static __u64 (*const bpf_ktime_get_boot_ns)(void) = (void *)125;
static long (*const bpf_seq_write)(struct seq_file *m, const void *data, __u32 len) = (void *)127;
static void *(*const bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*const bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;
static long (*const bpf_probe_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;
static struct socket *(*const bpf_sock_from_file)(struct file *file) = (void *)162;

/* Record kinds of struct cw_event. */
#define CW_ENTERED 1
#define CW_LEFT 2
#define CW_DESTROYED 3

/*
 * One ring-buffer record, the same 64 bytes for every kind (user space parses it in
 * linux/src/bpf/event.rs; keep both in step). Integers are in host order except rport,
 * which is the wire's (network) order as the kernel keeps it.
 */
struct cw_event {
	__u8 kind;     /* CW_ENTERED, CW_LEFT or CW_DESTROYED */
	__u8 family;   /* AF_INET or AF_INET6 (entered only, else 0) */
	__u8 state;    /* TCP state after the change (entered, left), at destruction (destroyed) */
	__u8 _pad0;
	__u16 lport;   /* local port, host order (entered only) */
	__be16 rport;  /* remote port, network order (entered only) */
	__u64 cookie;  /* socket cookie: SO_COOKIE, sock_diag's cookie */
	__u64 ts_ns;   /* CLOCK_BOOTTIME */
	__u32 netns;   /* network namespace inode (entered only) */
	__u32 _pad1;
	__u8 laddr[16]; /* IPv4: first 4 bytes; network order (entered only) */
	__u8 raddr[16];
};
_Static_assert(sizeof(struct cw_event) == 64, "cw_event is 64 bytes in user space too");

/*
 * One iterator record (parsed in linux/src/bpf/iter.rs), 40 bytes: a socket fd, or an
 * epoll fd (kind CW_FD_EPOLL: only tgid, tid, fd and start_ns are set).
 */
struct cw_task_sock {
	__u32 tgid;     /* process */
	__u32 tid;      /* the task whose table holds the fd: tgid, unless the leader is gone */
	__u32 fd;
	__u32 netns;    /* network namespace inode */
	__u64 inode;    /* socket inode, as fstat and /proc/PID/fd show it */
	__u16 family;
	__u16 protocol;
	__u16 type;     /* SOCK_STREAM, SOCK_DGRAM, ... */
	__u8 state;     /* TCP state numbering; meaningful for TCP */
	__u8 kind;      /* CW_FD_SOCKET or CW_FD_EPOLL */
	__u64 start_ns; /* the thread-group leader's start, CLOCK_BOOTTIME ns (field 22 of
			 * /proc/PID/stat is this in clock ticks): tells the process from a
			 * later one that got its pid */
};
_Static_assert(sizeof(struct cw_task_sock) == 40, "cw_task_sock is 40 bytes in user space too");

#define CW_FD_SOCKET 0
#define CW_FD_EPOLL 1

/*
 * The daemon's identity next to its pinned map (written only by user space, never by a
 * program; parsed in linux/src/bpf/pin.rs). A BPF filesystem holds no regular files, so it
 * lives in a one-element array map pinned beside the entry times.
 */
struct cw_daemon {
	__u32 pid;
	__u32 entered_map_id; /* id of the map pinned as `entered` by this daemon */
	__u64 start_ticks;    /* field 22 of /proc/PID/stat */
	__u64 heartbeat_ns;   /* CLOCK_BOOTTIME of the daemon's last cycle */
};

/* Entry time (CLOCK_BOOTTIME ns) into CLOSE_WAIT by socket cookie, from the entry until the
 * socket is destroyed. LRU: when full, the oldest entries go rather than new ones failing. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} cw_entered SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} cw_events SEC(".maps");

/* Records that found the ring buffer full. Per CPU so the count needs no atomics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} cw_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cw_daemon);
} cw_daemon SEC(".maps");

/* Set by the loader before the programs load (read-only afterwards). */
/* Only sockets of this network namespace inode; 0: every namespace. */
volatile const __u32 cw_netns_filter = 0;
/* 1: a destroyed record for every TCP socket; 0: only for sockets in cw_entered. */
volatile const __u8 cw_all_destroys = 0;

/* The kernel lets only programs with a GPL-compatible license call GPL-only helpers
 * (bpf_seq_write is one). MIT-licensed code is compatible; "Dual MIT/GPL" is how the
 * kernel's list of licenses (license_is_gpl_compatible) names it. */
char LICENSE[] SEC("license") = "Dual MIT/GPL";

static __always_inline __u32 cw_netns(const struct sock *sk)
{
	return sk->__sk_common.skc_net.net->ns.inum;
}

static __always_inline int cw_skip_netns(__u32 netns)
{
	return cw_netns_filter != 0 && netns != cw_netns_filter;
}

static __always_inline void cw_count_lost(void)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&cw_lost, &zero);

	if (lost)
		*lost += 1;
}

static __always_inline struct cw_event *cw_reserve(void)
{
	struct cw_event *e = bpf_ringbuf_reserve(&cw_events, sizeof(*e), 0);

	if (!e) {
		cw_count_lost();
		return 0;
	}
	/* Reserved memory is not zeroed: every byte is written before submit. */
	__builtin_memset(e, 0, sizeof(*e));
	return e;
}

static __always_inline void cw_fill_addrs(struct cw_event *e, const struct sock *sk)
{
	const struct sock_common *c = &sk->__sk_common;

	e->family = c->skc_family;
	e->lport = c->skc_num;
	e->rport = c->skc_dport;
	if (e->family == 2 /* AF_INET */) {
		__be32 l = c->skc_rcv_saddr, r = c->skc_daddr;

		__builtin_memcpy(e->laddr, &l, 4);
		__builtin_memcpy(e->raddr, &r, 4);
	} else {
		struct in6_addr l = c->skc_v6_rcv_saddr, r = c->skc_v6_daddr;

		__builtin_memcpy(e->laddr, &l, 16);
		__builtin_memcpy(e->raddr, &r, 16);
	}
}

/* inet_sock_set_state(const struct sock *sk, int oldstate, int newstate) */
SEC("tp_btf/inet_sock_set_state")
int cw_state(__u64 *ctx)
{
	const struct sock *sk = (const struct sock *)ctx[0];
	int oldstate = (int)ctx[1];
	int newstate = (int)ctx[2];

	if (newstate != TCP_CLOSE_WAIT && oldstate != TCP_CLOSE_WAIT)
		return 0;
	/* The tracepoint also fires for other inet protocols (SCTP, MPTCP subflows' parent). */
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	__u32 netns = cw_netns(sk);

	if (cw_skip_netns(netns))
		return 0;

	__u64 cookie = bpf_get_socket_cookie((void *)sk);
	__u64 now = bpf_ktime_get_boot_ns();

	if (newstate == TCP_CLOSE_WAIT)
		bpf_map_update_elem(&cw_entered, &cookie, &now, BPF_ANY);

	struct cw_event *e = cw_reserve();

	if (!e)
		return 0;
	e->kind = newstate == TCP_CLOSE_WAIT ? CW_ENTERED : CW_LEFT;
	e->state = newstate;
	e->cookie = cookie;
	e->ts_ns = now;
	if (newstate == TCP_CLOSE_WAIT) {
		e->netns = netns;
		cw_fill_addrs(e, sk);
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* tcp_destroy_sock(struct sock *sk): the end of every full TCP socket, also of one that
 * reached CLOSE while an fd still held it (closing that fd changes no state). */
SEC("tp_btf/tcp_destroy_sock")
int cw_destroy(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];

	if (cw_skip_netns(cw_netns(sk)))
		return 0;

	__u64 cookie = bpf_get_socket_cookie(sk);
	int tracked = bpf_map_delete_elem(&cw_entered, &cookie) == 0;

	if (!tracked && !cw_all_destroys)
		return 0;

	struct cw_event *e = cw_reserve();

	if (!e)
		return 0;
	e->kind = CW_DESTROYED;
	e->state = sk->__sk_common.skc_state;
	e->cookie = cookie;
	e->ts_ns = bpf_ktime_get_boot_ns();
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* An epoll instance's file is an anonymous inode's, named "[eventpoll]" (/proc/PID/fd shows
 * "anon_inode:[eventpoll]"). */
static __always_inline int cw_is_epoll(struct file *file)
{
	static const char want[12] = "[eventpoll]";
	char name[12];
	const unsigned char *n = file->f_path.dentry->d_name.name;

	if (bpf_probe_read_kernel(name, sizeof(name), n) != 0)
		return 0;
	for (int i = 0; i < 12; i++)
		if (name[i] != want[i])
			return 0;
	return 1;
}

/* One record per socket fd and epoll fd of every process, in one pass over the task list. */
SEC("iter/task_file")
int cw_task_file(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;

	/* The final call, after the last task, has neither. */
	if (!task || !file)
		return 0;
	/* A thread sharing its leader's table would list the same fds again. A thread whose
	 * leader has exited (the leader's table is gone) still lists its own. */
	if (task->pid != task->tgid && task->files == task->group_leader->files)
		return 0;

	struct cw_task_sock r;

	__builtin_memset(&r, 0, sizeof(r));
	r.tgid = task->tgid;
	r.tid = task->pid;
	r.fd = ctx->fd;
	r.start_ns = task->group_leader->start_boottime;

	struct socket *sock = bpf_sock_from_file(file);

	if (!sock) {
		if (!cw_is_epoll(file))
			return 0;
		r.kind = CW_FD_EPOLL;
		bpf_seq_write(seq, &r, sizeof(r));
		return 0;
	}
	struct sock *sk = sock->sk;

	/* A socket being released has no sock any more. */
	if (!sk)
		return 0;
	r.kind = CW_FD_SOCKET;
	r.netns = cw_netns(sk);
	r.inode = file->f_inode->i_ino;
	r.family = sk->__sk_common.skc_family;
	r.protocol = sk->sk_protocol;
	r.type = sk->sk_type;
	r.state = sk->__sk_common.skc_state;
	bpf_seq_write(seq, &r, sizeof(r));
	return 0;
}
