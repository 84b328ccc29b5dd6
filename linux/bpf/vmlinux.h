/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Kernel types read by cwreap.bpf.c, trimmed by hand to the fields it touches.
 *
 * Every struct under the preserve_access_index pragma is relocated by CO-RE against the
 * running kernel's BTF (/sys/kernel/btf/vmlinux) when the object is loaded, so the offsets
 * below need not match any kernel: only the type names, field names, field types and the
 * nesting through anonymous unions must. The nesting mirrors Linux 6.x so the relocation
 * paths are the ones a full dump would give.
 *
 * The iterator context is different: the verifier checks accesses to it by offset against
 * the iterator's fixed argument layout (one 8-byte slot per argument), so it is declared
 * as laid out, outside the pragma.
 */
#ifndef CWREAP_VMLINUX_H
#define CWREAP_VMLINUX_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef __u16 __be16;
typedef __u32 __be32;
typedef int pid_t;

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be16 u6_addr16[8];
		__be32 u6_addr32[4];
	} in6_u;
};

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

typedef struct {
	long long counter;
} atomic64_t;

struct sock_common {
	union {
		struct {
			__be32 skc_daddr;
			__be32 skc_rcv_saddr;
		};
	};
	union {
		struct {
			__be16 skc_dport;
			__u16 skc_num;
		};
	};
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	atomic64_t skc_cookie; /* 0 until the cookie is first asked for */
};

/* sk_protocol and sk_type are plain u16 since Linux 5.6 (bitfields before); cwreap needs
 * 5.12 for socket cookies in tp_btf anyway. */
struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
	__u16 sk_type;
};

struct socket {
	struct sock *sk;
};

struct inode {
	unsigned long i_ino;
};

struct qstr {
	const unsigned char *name;
};

struct dentry {
	struct qstr d_name;
};

struct vfsmount;

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
};

/* f_path is const inside an anonymous union since Linux 6.12. */
struct file {
	union {
		const struct path f_path;
		struct path __f_path;
	};
	struct inode *f_inode;
};

struct files_struct;

struct task_struct {
	pid_t pid;
	pid_t tgid;
	__u64 start_boottime;
	struct task_struct *group_leader;
	struct files_struct *files;
};

#pragma clang attribute pop

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
};

#endif
