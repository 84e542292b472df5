/* The native core's shared declarations (see minictr_init.c). */
#ifndef MINICTR_INIT_H
#define MINICTR_INIT_H

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <grp.h>
#include <limits.h>
#include <time.h>
#include <unistd.h>

/* Numbers for the calls newer than some systems' headers (mount_setattr came with Linux 5.12,
 * close_range with 5.9; glibc names a call only where it and the kernel headers both know it;
 * musl's list lags too). From 424 on a call has one number on every architecture but alpha
 * (the kernel's common table since 5.1), so one fallback serves them all. The branches are
 * dead code where we build, which is how four broken ones once went unseen:
 * MINICTR_FORCE_FALLBACKS drops the system's numbers first, so that a build with it
 * (ci/native-checks) compiles exactly what a system without them does. */
#ifdef MINICTR_FORCE_FALLBACKS
#undef SYS_open_tree
#undef SYS_pidfd_open
#undef SYS_close_range
#undef SYS_mount_setattr
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifdef MINICTR_FORCE_FALLBACKS  /* and where the kernel headers know a number, ours is it */
#define SAME_NUMBER(call) _Static_assert(SYS_##call == __NR_##call, "SYS_" #call)
SAME_NUMBER(open_tree);
SAME_NUMBER(pidfd_open);
SAME_NUMBER(close_range);
SAME_NUMBER(mount_setattr);
#endif
#define OPEN_TREE_CLONE_ 1
#define AT_RECURSIVE_ 0x8000
#define MOUNT_ATTR_IDMAP_ 0x00100000ULL
#define CLOSE_RANGE_CLOEXEC_ 4
#ifndef TIOCGPTPEER  /* Linux 4.13; asm-generic's number (x86_64 and aarch64 alike) */
#define TIOCGPTPEER 0x5441
#endif
#define MAX_FDS 32  /* the container's five, and up to eight namespaces an exec helper joins */

typedef struct json {
    char type;            /* n(ull) b(ool) i(nt) s(tring) a(rray) o(bject) */
    long long num;
    char *str;
    int count;
    struct json **items;  /* array items; object: key (string), value, key, value... */
} json;

typedef struct { char *name; long long value, extra; } slot;

typedef struct { int stdin_, stdout_, stderr_, setup, status; } child_fds;

typedef struct {
    const char *type;       /* ContainerSetupError, CommandNotFoundError */
    char step[512];         /* the step, or the sub-step inside it, that failed */
    char message[2048];
    int errnum;             /* 0: none */
} failure;

#define NONE LLONG_MIN

typedef struct { json **args; int count; long long result; int has_result; } call;
#define ARG(i) (c->args[i])
#define STR(i) (c->args[i]->str)
#define NUM(i) number(c->args[i])
#define RETURN(value) do { c->result = (value); c->has_result = 1; return 0; } while (0)
#define SUB(step, expression) do { if ((expression) < 0) return fail(step, errno); } while (0)

extern failure failed;
extern child_fds fds;
extern int parent_pidfd;
extern const char *failed_phase;
extern sigset_t waited_signals;

void skip_space(const char **p);
json *new_json(char type);
void put_utf8(char **out, unsigned code);
char *parse_string(const char **p);
json *parse_list(const char **p, char type, char close);
json *parse_value(const char **p);
void free_json(json *v);
const char *ref_of(const json *v);
void write_json_string(FILE *out, const char *s);
void write_line(int fd, const char *text, size_t length);
int fail(const char *step, int errnum);
int fail_with(const char *type, const char *step, int errnum, const char *format, ...)
    __attribute__((format(printf, 4, 5)));
void report_failure(int fd, const char *phase);
slot *find_slot(const char *name);
void save_slot(const char *name, long long value, long long extra);
long long number(const json *v);
int carry_out(json *step);
int run_plan(json *plan);
int write_file(const char *path, const char *text);
int arm_parent_death_signal(int pidfd);
int compare_ints(const void *a, const void *b);
void close_fds_except(int *keep, int count);
int set_link_up(const char *name);
void write_status(int fd, const char *key, long long value);
int set_rlimit(const char *name, long long soft, long long hard);
char *layer_path(long long layer_fd, char *buffer, size_t size);
int mount_tmpfs(const char *target, const char *options, unsigned long extra);
unsigned long statvfs_mount_flags(const char *path);
int mount_point(const char *container_path, int is_dir, char *path, size_t size);
int bind_read_only(const char *path);
int measure_filesystem(const char *path, long long *size);
int mount_tmp_at(const char *target, long long size);
int restrict_mount_tree(const char *top, unsigned long extra);
int find_program(const char *name, const char *search, char *found, size_t size);
int exec_failure(const char *program, int errnum);
pid_t spawn_command(json *argv_json, json *env_json, int terminal);
void report_end(int status_fd, int wait_status);
int reap_until(pid_t command);
void print_actions(void);

/* The plan's actions, one name each: container.executor.ACTIONS has the same set (a test
 * compares them). X(name) stands for the action `name` and its function do_name; the
 * declarations below and executor.c's table are made from this one list. */
#define MINICTR_ACTIONS(X) \
    X(write_file) X(unshare) X(setns) X(set_dumpable) X(set_link_up) X(take_loopback_down) \
    X(set_hostname) X(chdir) X(nothing) X(open_low_ports_and_ping) X(own_network) \
    X(map_own_ids) X(wait_for_id_maps) X(fork_init_under_keeper) X(enter_user_namespace) \
    X(arm_parent_death_signal) X(install_signal_proxy) X(watch_host_mounts) \
    X(make_mounts_private) X(mount_stage) X(enter_stage) X(mount_proc) X(mount_dev) \
    X(mask_proc) X(open_host_path) X(lock_layer) X(size_stage) X(measure_layer) \
    X(measure_filesystem) X(idmapped) X(make_layer_dirs) X(chown_layer) X(mount_overlay) \
    X(move_into_root) X(mount_tmp) X(make_root_read_only) X(mount_user_tmpfs) \
    X(bind_user_mount) X(close_fds) X(enter_root) X(set_rlimits) X(join_new_session_keyring) \
    X(drop_capabilities) X(switch_ids) X(install_seccomp_filter) X(open_terminal) \
    X(run_command_as_init) X(run_command_beside) X(renew_stage_if_stale) X(bind_text_file)

#define DECLARE_ACTION(name) int do_##name(call *c);
MINICTR_ACTIONS(DECLARE_ACTION)
#undef DECLARE_ACTION

#endif
