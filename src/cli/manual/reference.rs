//! The reference part of cwreap(8) that no clap definition holds: outcomes, exit status,
//! JSON fields, signals, the audit log's records, the metrics, files and environment. Plain
//! roff: fonts with \fB...\fR, never Markdown.

pub const CWREAP_8_TAIL: &str = r#".SH OUTCOMES
Each socket \fBreap\fR or the daemon acts on ends with one outcome: the OUTCOME column,
\fBoutcome\fR in JSON, the audit log and the daemon's log.
.TP
.B reaped
Verified and shut down (\fB--destroy\fR: reset with SOCK_DESTROY; \fB--close\fR: closed
inside the process).
.TP
.B dry_run
Verified, which proves the permission, and left alone (\fB--dry-run\fR, \fBdry_run: true\fR).
.TP
.B gone
The process exited or closed the fd first.
.TP
.B changed
The fd now holds another file, or the socket left CLOSE_WAIT: left alone.
.TP
.B skipped
The action cannot reach it (a shutdown of a connection never accepted), or \fB--close\fR
refused the fd (a \fBrefused_*\fR reason).
.TP
.B error
A system call failed, for example for lack of permission.
.TP
.B logged
Daemon only: the target's action is \fBlog\fR, which reports and never acts.
.PP
Why, as a code: \fBreason\fR (\fBnull\fR when reaped), for example \fBinode_changed\fR,
\fBcookie_changed\fR, \fBstate_changed\fR, \fBprocess_exited\fR, \fBfd_closed\fR,
\fBpermission_denied\fR, \fBunaccepted\fR; in words: \fBerror\fR.
.SH "EXIT STATUS"
.TP
.B 0
Success, also when nothing matched.
.TP
.B 1
Some socket failed (outcome \fBerror\fR), or \fB--close\fR was refused for some fd.
.TP
.B 2
Usage error (a bad regex, port or duration, a missing selector or \fB--older-than\fR),
configuration error, or missing privilege: the message names the capability and the
setcap line that grants it.
.SH "JSON OUTPUT"
With \fB--json\fR, one object per line on stdout; summaries and warnings go to stderr.
Addresses are ip:port, IPv6 [ip]:port; a value that is not known is \fBnull\fR.
.PP
\fBscan\fR and \fBreap\fR, one object per socket:
.TP
.B pid, fd, comm
The owner and its fd (\fBfd\fR is \fBnull\fR for a connection never accepted).
.TP
.B holders
Every {pid, fd} holding the socket (several after fork).
.TP
.B inode, cookie, netns, uid
The socket's inode, SO_COOKIE, network namespace inode and owning uid.
.TP
.B local, remote
The addresses (\fBremote\fR is \fBnull\fR for a dead held socket).
.TP
.B direction
\fBin\fR for a server's end, \fBout\fR for a client's.
.TP
.B state
CLOSE_WAIT, or CLOSE for a dead held socket (the connection ended, the fd is still held).
.TP
.B age_ms, age_max_ms, age_source
The age's lower bound, its upper bound or \fBnull\fR, and how it is known: \fBevent\fR
(exact), \fBfirst_seen\fR (the daemon's first sight) or \fBlast_ack\fR (tcp_info).
.TP
.B keepalive
A keepalive timer is armed: the peer's answers reset the lower bound.
.TP
.B recv_q, send_q
Bytes queued; the peer's FIN counts 1 in \fBrecv_q\fR.
.TP
.B unaccepted, listener_fd
Still in a listener's accept queue, and that listener's fd.
.PP
\fBreap\fR adds \fBaction\fR (shutdown, destroy or close), \fBoutcome\fR, \fBreason\fR and
\fBerror\fR (see OUTCOMES).
.PP
\fBexplain\fR, one object per process: \fBpid\fR, \fBcomm\fR, \fBruntime\fR and
\fBruntime_clue\fR, \fBgc\fR, \fBclose_wait\fR, \fBpatterns\fR (each pattern with its
count), \fBleak_per_min\fR, \fBemfile_in_s\fR, \fBopen_fds\fR, \fBfd_limit\fR,
\fBtop_remotes\fR, \fBtop_local_ports\fR, \fBarrivals\fR, \fBfd_growth\fR, \fBwindow_s\fR,
\fBsamples\fR and \fBsockets\fR (one object each: \fBfd\fR, \fBinode\fR, \fBlocal\fR,
\fBremote\fR, \fBdirection\fR, \fBrecv_q\fR, \fBwatched\fR, \fBpattern\fR,
\fBgc_may_close\fR).
.SH SIGNALS
.TP
.B SIGHUP
\fBcwreap run\fR reads the policy again (an invalid one is logged and the old one kept) and
reopens the audit log, as logrotate needs (\fBsystemctl reload cwreap\fR sends it; without
systemd, \fBkill -HUP "$(cat PATH)"\fR with \fBrun --pid-file PATH\fR). The
\fBconfig reloaded\fR line gives the effective \fBdry_run\fR and the number of
\fBtargets\fR.
.TP
.B SIGTERM, SIGINT
\fBcwreap run\fR stops within a second, whatever it is doing. \fBscan --watch\fR and
\fBexplain --for\fR stop on SIGINT (Ctrl-C). \fBreap --close\fR runs each injection in a
helper that blocks the terminal's and the service manager's signals, so an interrupted
cwreap never leaves a process half-way through one.
.SH "AUDIT LOG"
With \fBaudit_log\fR in the policy, \fBcwreap run\fR appends one JSON object per line, each
with \fBts\fR (Unix seconds) and \fBevent\fR:
.TP
.B intent
Before a cycle changes any socket, one per socket it will act on, on the disk before the
action: \fBtarget, pid, fd, unaccepted, netns, comm, inode, local, remote, age_ms,
age_max_ms, age_source, action\fR. No action without a record (\fBon_audit_failure\fR).
.TP
.B action
One per action, the fields of \fBintent\fR and \fBoutcome, dry_run, reason, error\fR.
.TP
.B fd_release
After a shutdown, whether the owner closed its fd: \fBtarget, pid, fd, comm, inode,
result\fR (\fBreleased\fR, \fBstill_held\fR or \fBgone\fR) and \fBwaited_ms\fR.
.TP
.B escalation
A raised fd limit or a signal: \fBtarget, pid, comm, kind, outcome, dry_run\fR and the
limits before and after, or the signal.
.PP
Lines are whole: a torn last line is cut off. Lost records count in
\fBcwreap_audit_write_errors_total\fR.
.SH METRICS
\fBcwreap run\fR serves Prometheus metrics on \fBmetrics.listen\fR (default
127.0.0.1:9814, GET /metrics only):
.TP
.B cwreap_close_wait_sockets{target}
CLOSE_WAIT sockets the target selects now.
.TP
.B cwreap_close_wait_oldest_seconds{target}
Age (lower bound) of the oldest of them.
.TP
.B cwreap_close_wait_new_total{target}
CLOSE_WAIT sockets that appeared.
.TP
.B cwreap_reaped_total{target,action,outcome}
Actions taken, by outcome.
.TP
.B cwreap_fd_released_total{target,result}
After a shutdown, whether the owner closed its fd.
.TP
.B cwreap_dead_sockets_held{target}
Dead held sockets: connections that ended whose fd a process still holds.
.TP
.B cwreap_actions_skipped_unrecorded_total
Actions not taken because their intent records could not be written.
.TP
.B cwreap_escalations_total{target,kind}
Fd-limit raises and signals.
.TP
.B cwreap_escalations_deferred_total
Escalations deferred by limits.max_escalations_per_minute.
.TP
.B cwreap_process_open_fds{target}, cwreap_process_fd_limit{target}, cwreap_process_fd_usage_ratio{target}
Open fds, soft RLIMIT_NOFILE, and the highest usage ratio of the target's processes.
.TP
.B cwreap_cycle_duration_seconds, cwreap_last_cycle_timestamp_seconds, cwreap_cycle_errors_total{kind}
Wall time per cycle, when the last one finished, failed cycle steps.
.TP
.B cwreap_discovery_mode{mode}, cwreap_bpf_events_lost_total, cwreap_discovery_reconciles_total
How sockets are found (events or poll), events lost, full dumps to reconcile.
.TP
.B cwreap_detection_latency_seconds
Events mode: from a socket's entry into CLOSE_WAIT (the kernel's time) to the daemon knowing its owner, per new socket a target holds.
.TP
.B cwreap_audit_write_errors_total, cwreap_audit_torn_lines_total
Audit records that did not reach the file; partial lines cut off.
.TP
.B cwreap_log_lines_dropped_total, cwreap_notify_dropped_total
Log lines and sd_notify messages dropped because nobody was reading.
.TP
.B cwreap_metrics_refused_connections_total, cwreap_metrics_connections_evicted_total
Metrics connections closed unserved, and idle ones closed to make room.
.TP
.B cwreap_emfile_forecast_seconds{target}
Seconds until the first of the target's processes runs out of fds (EMFILE) at the growth of
its open fds over the last minute (the estimator of \fBexplain\fR); the smallest over its
processes. No series while none of them grows.
.TP
.B cwreap_fd_usage_warning{target}
1 while a process of the target is above 80% of its fd limit and has not fallen below 70%
since (hysteresis computed by cwreap, one log line per crossing), else 0.
.TP
.B cwreap_build_info{version}
Always 1.
.PP
/usr/share/doc/cwreap/cwreap.rules.yml (config/cwreap.rules.yml) alerts on them:
\fBCwreapEmfileSoon\fR (forecast under an hour for 5 minutes), \fBCwreapFdUsageHigh\fR (the
fullest process over 90%), \fBCwreapFdUsageWarning\fR (the warning gauge),
\fBCwreapEscalated\fR (an escalation in the last 15 minutes), and others.
.SH FILES
.TP
.B /etc/cwreap/cwreap.yaml
The policy: read by \fBrun\fR (again on SIGHUP) and \fBcheck\fR; see cwreap.yaml(5).
.TP
.B /var/log/cwreap/audit.jsonl
The audit log of the shipped policy, written by \fBrun\fR (under the shipped unit's
DynamicUser=, systemd keeps the directory in /var/log/private/cwreap).
/etc/logrotate.d/cwreap rotates it.
.TP
.B /run/cwreap/ages
Written by \fBrun\fR after each cycle: its first sight of each socket, read by \fBscan\fR,
\fBreap\fR and \fBexplain\fR while the daemon lives.
.TP
.B /sys/fs/bpf/cwreap
The daemon's pinned BPF maps (event discovery): exact entry times, read by the commands
unless \fB--no-bpf\fR.
.TP
.B /proc/PID/fd, fdinfo, comm, cmdline, exe, status, limits, cgroup, ns/net
Read to attribute sockets to processes; sockets themselves are read over NETLINK_SOCK_DIAG,
never /proc/net/tcp.
.TP
.B PID files
Named by \fBpid_file\fR or \fBscan\fR/\fBreap --pid-file\fR: read, never written.
\fBrun --pid-file PATH\fR writes the daemon's own pid there (mode 0644, through a new file
renamed over PATH, in a directory only root or cwreap's user may write) once SIGHUP is
handled, and removes it at a clean exit if it still holds that pid.
.TP
.B /lib/systemd/system/cwreap.service, /usr/share/cwreap/drop-ins/
The unit and its opt-in drop-ins (installed, never enabled by the package).
.PP
A purge of the package removes /var/log/cwreap, /var/log/private/cwreap, /run/cwreap and
/sys/fs/bpf/cwreap.
.SH ENVIRONMENT
.TP
.B CWREAP_RUN_DIR
Where the daemon publishes and the commands read its first sights (default /run/cwreap).
.TP
.B CWREAP_BPF_DIR
Where the daemon pins its BPF maps (default /sys/fs/bpf/cwreap).
.TP
.B NO_COLOR
Set and not empty: no colours on a terminal.
.TP
.B JOURNAL_STREAM
Set by systemd to the device and inode of the journal stream. When it names stderr,
\fBrun\fR logs through journald's native protocol: every field of an event is a journal
field in upper case (\fBOUTCOME\fR, \fBACTION\fR, \fBPID\fR, \fBFD\fR, \fBDRY_RUN\fR, ...),
the policy target is \fBCWREAP_TARGET\fR (\fBTARGET\fR is the module path), a field named as
one the journal reserves gets a \fBCWREAP_\fR prefix, and each entry has \fBMESSAGE\fR,
\fBPRIORITY\fR, \fBCODE_FILE\fR, \fBCODE_LINE\fR and \fBSYSLOG_IDENTIFIER\fR=cwreap:
\fBjournalctl -u cwreap CWREAP_TARGET=api OUTCOME=reaped\fR.
.TP
.B NOTIFY_SOCKET
systemd's notification socket (Type=notify): READY=1, STATUS=, WATCHDOG=1.
.SH PRIVILEGES
Reading another user's /proc/PID/fd and pidfd_getfd need CAP_SYS_PTRACE (and
CAP_DAC_READ_SEARCH without root); SOCK_DESTROY needs CAP_NET_ADMIN; entering other network
namespaces needs CAP_SYS_ADMIN; event discovery needs CAP_BPF and CAP_PERFMON.
.SH "SEE ALSO"
cwreap.yaml(5), ss(8), systemd.service(5)
"#;
